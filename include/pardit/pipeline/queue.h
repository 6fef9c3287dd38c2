#pragma once
// The request queue: many images per job from engines loaded once.
//
// A prompt file is a queue of requests: plain text (one prompt per line) or JSONL (one object per line:
// prompt, prompt_2, negative_prompt, seed, width, height, steps, guidance_scale, true_cfg_scale,
// max_sequence_length, output; a missing field comes from the command line's request). A request's
// index is its number among the file's non-empty lines, from 0; a line without a seed gets the default
// seed + its index, so every image can be made again alone with `pardit generate --prompt ... --seed S`.
//
// runQueue() cuts the job's world into EngineOptions::dataParallelDegree replica groups (each a whole
// layout whose ranks read only their own shard; each encodes its own prompts), checks the whole queue
// before any weight is read, skips the requests whose image exists with the same parameters (read from
// the PNG), deals the others to the groups, and has each group's engine make its requests one after the
// other. Each finished image is a PNG written atomically (temporary + rename) and one line appended to
// OUTPUT_DIR/manifest.jsonl under a lock. With graceful stop on, SIGINT, SIGTERM and SIGUSR1 make every
// group finish the image in flight, take no new request and return (a second SIGINT/SIGTERM ends the
// process at once); running the same command again continues where the job stopped.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/options.h"

namespace pardit::dist {
class Runtime;
}

namespace pardit::pipeline {

struct QueueOptions {
  std::string promptFile;
  std::string outputDir;
  // The PNG's name in outputDir: {index}, {seed}, {width}, {height}, {steps} and {line}, integers with an
  // optional zero-padded width ({index:05}); a line's "output" overrides it.
  std::string outputName = "{index:05}-{seed}.png";
  int shardIndex = 0, shardCount = 1;  // this job makes the requests with index % shardCount == shardIndex
  bool overwrite = false;              // replace an existing output made with other parameters
  // Up to this many queued requests of one shape (size, steps, guidance, true CFG, text length) share one
  // transformer call; each image is the one its request makes alone (its own seed's noise, its own PNG).
  int batchSize = 1;
  bool gracefulStop = true;  // handle SIGINT/SIGTERM/SIGUSR1 between images
};

// "I/N" (0 <= I < N), or "auto": a Slurm array task's SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of
// SLURM_ARRAY_TASK_COUNT (0/1 outside an array job). Throws naming --shard.
std::pair<int, int> parseShard(const std::string& text);

struct QueueItem {
  int64_t index = 0;        // among the file's non-empty lines, from 0
  int64_t line = 0;         // in the file, from 1
  std::string file;         // the PNG, relative to the output directory
  GenerateRequest request;  // request.output = outputDir/file, request.indices = {index}
};

// Reads and checks a whole prompt file against `defaults` (the request every line starts from; its prompt
// fields are ignored). Errors name FILE:LINE (and the field): malformed JSON, an unknown field, a value of
// the wrong type or out of range, two requests with the same output.
std::vector<QueueItem> readQueue(const QueueOptions& q, const GenerateRequest& defaults);

// A file name from an --output-name template. Throws naming --output-name for an unknown field.
std::string formatOutputName(const std::string& tmpl, int64_t index, int64_t line, const GenerateRequest& r);

struct QueueReport {
  int64_t total = 0;      // requests in the file
  int64_t shard = 0;      // of them, this shard's
  int64_t skipped = 0;    // already made with the same parameters (found in the output directory)
  int64_t made = 0;       // made by this job
  int64_t remaining = 0;  // not made because the job was stopped
  int stopSignal = 0;     // the signal that stopped it, or 0
  double seconds = 0.0;   // the job's wall time, checks and loading included
  double imagesPerHour = 0.0;
};

// The exit status of `pardit generate --prompt-file` stopped by a signal before its queue was done
// (EX_TEMPFAIL: run the same command again to continue).
constexpr int kExitStopped = 75;

// Collective over `world`, whose size must be options.worldSize(). Every rank returns the same report.
QueueReport runQueue(const EngineOptions& options, dist::Runtime& world, const QueueOptions& q,
                     const GenerateRequest& defaults);

}  // namespace pardit::pipeline
