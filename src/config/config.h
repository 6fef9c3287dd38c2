#pragma once
// The `pardit` executable's options for every command, and the one option table behind it. This is the
// application's layer (the library takes pipeline::EngineOptions and requests, never a command line):
// engineOptions(), generateRequest() and queueOptions() below turn a parsed command line into them.
//
// Each option is declared once (src/config/config.cpp): its flag, type, default, help text, help group,
// the commands that take it and how it must agree across the ranks of a job. From that table come the
// command line, PARDIT_* environment and INI parsing, `--help`, the provenance map written to HDF5 and
// the cross-rank consistency check, so no option can be left out of any of them. Values come from the
// command line, then PARDIT_* environment variables, then an INI file given with --config (or
// PARDIT_CONFIG), then the defaults, in that order of precedence. Every value is parsed and checked
// here, at parse time, into the types below.

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "pardit/pipeline/options.h"

namespace pardit::pipeline {
struct GenerateRequest;
struct EncodeRequest;
struct QueueOptions;
}  // namespace pardit::pipeline

namespace pardit::config {

enum class Command { kGenerate, kForward, kSynth, kBench, kPlan, kEncode, kQuantize };
// The option types the library owns, under the names the option table uses.
using Dtype = pipeline::Dtype;
using DeviceKind = dist::DeviceKind;
using WeightDtype = pipeline::WeightDtype;
using Offload = memory::Offload;
using StreamSource = memory::StreamSource;
using Schedule = pipeline::Schedule;
using EncoderDevice = pipeline::EncoderDevice;
using VaeTiling = pipeline::VaeTiling;
using Attention = pipeline::Attention;
using Partition = parallel::Partition;
using MemoryBudget = memory::MemoryBudget;
enum class LogLevelOption { kDebug, kInfo, kWarn, kError };
enum class SynthLayout { kDiffusers, kBfl };
enum class SynthFill { kRandom, kZeros };

// Names as the command line spells them ("bf16", "sequential", ...).
template <typename E>
std::string enumName(E value);
// The accepted names of an enum, for help texts and errors.
template <typename E>
std::vector<std::string> enumNames();

// "24GiB", "12GB", "1.5GiB", "512MiB", "4096" (bytes). Errors name `flag`; sizes of 2^64 bytes and
// more are refused.
uint64_t parseSize(const std::string& text, const std::string& flag);

// A command line: the library's EngineOptions (what an engine loads and how; every option of the table that
// sets one of them sets it there) and what only the commands use (requests, outputs, synth, bench, plan).
struct EngineConfig : pipeline::EngineOptions {
  Command command = Command::kGenerate;

  // General
  int threads = 0;  // intra-op threads per rank; 0 = the library default
  LogLevelOption logLevel = LogLevelOption::kInfo;
  bool quiet = false;
  bool unfused = false;  // ATen's compositions instead of pardit's fused passes (to measure them)
  std::string configFile;
  // (model, VAE, text encoders, dtypes, device, layout degrees, memory, attention, metrics, preset: the base)

  // plan
  int worldSize = 0;  // 0: the product of the degrees
  bool json = false;

  // forward
  std::string inputs;
  std::string output;  // forward: the prediction; generate: the PNG image; bench: the JSON report

  // generate, encode: prompts as text, and the text encoders
  std::string prompt;                                // CLIP's prompt (and T5's unless prompt2 is given)
  std::string prompt2;                               // T5's prompt
  std::string negativePrompt;                        // true CFG
  std::string promptFile;                            // a queue: one prompt per line, or JSONL requests
  std::string outputDir;                             // the queue's images and manifest.jsonl
  std::string outputName = "{index:05}-{seed}.png";  // the queue's file names
  std::string shard;                                 // "I/N" or "auto" (a Slurm array task's share of the queue)
  bool overwrite = false;                            // replace queue outputs made with other parameters
  int batchSize = 1;                                 // queued requests of one shape per transformer call
  int64_t maxSequenceLength = 0;  // T5 tokens; 0: 512 for guidance-distilled models (dev), 256 otherwise

  // generate
  std::string promptEmbeds;
  std::string negativePromptEmbeds;
  std::string saveLatents;
  int64_t height = 1024;
  int64_t width = 1024;
  int steps = 28;
  double guidanceScale = 3.5;
  double trueCfgScale = 1.0;
  uint64_t seed = 0;
  Schedule schedule = Schedule::kAuto;

  // synth
  SynthLayout layout = SynthLayout::kDiffusers;
  std::string out;
  SynthFill fill = SynthFill::kRandom;
  int64_t textLen = 0;  // synth: 0 = the preset's default
  uint64_t shardSize = 10'000'000'000ULL;
  int64_t depth = -1;  // overrides of the preset's block counts (-1: keep)
  int64_t depthSingle = -1;

  // bench
  int warmup = 2;
  int iters = 5;
  int64_t batch = 1;
  bool benchComm = false;     // collective micro-benchmark instead of the model
  bool benchDecode = false;   // the VAE decode instead of the transformer
  bool benchProfile = false;  // one more forward under the operator profiler
  bool benchEncode = false;   // the encode stage instead of the transformer
  uint64_t commMaxBytes = 64ULL << 20;
};

// A config with the defaults of `command` (bench and plan differ from generate in a few sizes).
EngineConfig defaults(Command command);

struct ParseResult {
  EngineConfig config;
  bool helpShown = false;  // --help was printed; nothing to run
};

// The commands and their one-line descriptions.
const std::vector<std::pair<std::string, std::string>>& commands();
std::string commandName(Command command);
std::string usage();
// The grouped help of one command: every option with its default, its PARDIT_* name, and examples.
std::string help(Command command);

// Every option of the command with its value, for provenance (the HDF5 "config" attributes).
std::map<std::string, std::string> toMap(const EngineConfig& c);

// The options whose values must be the same on every rank of a job, in table order: the command, every
// option that changes what runs or which collectives run (degrees, sizes, steps, seed, dtype, memory
// options, metrics, outputs, ...), and for input files that may be node-local copies, only whether they
// are given. Per-rank options (threads, log level, the paths of inputs) are left out.
std::vector<std::pair<std::string, std::string>> syncedOptions(const EngineConfig& c);

// The library's view of a command line (src/config/requests.cpp). queueOptions throws naming --shard.
pipeline::EngineOptions engineOptions(const EngineConfig& c);
pipeline::GenerateRequest generateRequest(const EngineConfig& c);  // the one request of --prompt/--prompt-embeds
pipeline::EncodeRequest encodeRequest(const EngineConfig& c);
pipeline::QueueOptions queueOptions(const EngineConfig& c);

// Parses the arguments after the command name. Throws pardit::Error with a one-line message naming the
// flag, environment variable or file and what was expected.
ParseResult parseCommandLine(const std::string& command, const std::vector<std::string>& args);

}  // namespace pardit::config
