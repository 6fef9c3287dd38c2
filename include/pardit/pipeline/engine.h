#pragma once
// pipeline::Engine: the library entry point. It is built once from EngineOptions (what is loaded and how)
// and then serves any number of requests (what is asked: prompt, seed, size, steps, ...), keeping its
// weights, encoders' files and decoder between them. The `pardit` commands (generate, forward, encode,
// bench), the request queue (pipeline/queue.h), the tests and C++ programs go through it; `pardit plan`,
// `synth` and `quantize` read and write checkpoints without running a model and do not.
//
//   dist::Runtime rt(&argc, &argv);                 // or one rank of dist::runInProcess
//   pipeline::EngineOptions options;
//   options.model = "FLUX.1-dev"; options.ulyssesDegree = 2;
//   pipeline::Engine engine(options, rt);           // checks, topology, checkpoint headers
//   pipeline::GenerateRequest request;
//   request.prompt.texts = {"a cat on the moon"};
//   request.output = "cat.png";
//   pipeline::GenerateResult result = engine.generate(request);   // result.latents on every rank
//   request.seed = 7; engine.generate(request);                   // the weights are loaded once
//
// A request goes through the stages in order, every rank together:
//   validate  the request against the model and the layout, and every output destination
//   plan      this rank's weight groups, resident or streamed, under --device-memory-budget
//   encode    the prompts: tokenizers and text encoders (CLIP, T5) on one rank (the one with the most
//             spare memory after its plan, or --text-encoder-rank), T5 streamed block by block when it
//             does not fit; the embeddings broadcast to every rank, the encoders' memory released before
//             the transformer loads. Or prompt embeddings from tensors or files.
//   load      only this rank's byte ranges of the checkpoint (kept for the next run with the same plan)
//   denoise   the one loop (pipeline::denoise) over this layout's Denoiser
//   decode    the latents into images with the VAE, when an image output is asked for: every rank
//             decodes a slab of rows (parallel::decodeParallel), or, when that does not fit the
//             budget, a share of overlapping tiles (parallel::decodeTiledParallel; planDecode)
//   write     outputs from rank 0, atomically (PNG with the run's parameters, latents); then the
//             metrics run (--metrics)
// Every check before loading runs through Runtime::agree(): a bad input on any rank ends every rank
// with dist::CollectiveFailure after one error line. Calls are collective over the runtime's world.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pardit/model/flux.h"
#include "pardit/pipeline/denoise.h"
#include "pardit/pipeline/op_profile.h"
#include "pardit/pipeline/options.h"

namespace pardit::dist {
class Runtime;
}

namespace pardit::pipeline {

// A prompt for the encode stage: text (a batch: one string per image) for the text encoders, or embeddings
// as tensors or in a safetensors file.
struct PromptInput {
  std::vector<std::string> texts;   // CLIP's prompts
  std::vector<std::string> texts2;  // T5's prompts (empty: the same as `texts`)
  std::string textFile;             // one prompt per line (a batch), read by the encode stage
  PromptEmbeddings embeddings;
  std::string embeddingsFile;
  bool isText() const { return !texts.empty() || !textFile.empty(); }
  bool given() const { return isText() || embeddings.promptEmbeds.defined() || !embeddingsFile.empty(); }
};

struct GenerateRequest {
  PromptInput prompt;
  PromptInput negativePrompt;  // optional; used when trueCfgScale > 1
  int64_t height = 1024;
  int64_t width = 1024;
  int steps = 28;
  double guidanceScale = 3.5;
  double trueCfgScale = 1.0;
  uint64_t seed = 0;
  Schedule schedule = Schedule::kAuto;
  std::string saveLatents;        // rank 0 writes the packed latents here (safetensors, tensor 'latents')
  std::string output;             // rank 0 writes the images here as PNG (several: output-0.png, output-1.png, ...)
  bool decode = false;            // decode into GenerateResult::images even without `output`
  int64_t maxSequenceLength = 0;  // T5 tokens; 0: 512 for guidance-distilled models, else 256
  // Several requests of one shape as one batch (a queue's --batch-size): image i has its own seed (its noise
  // from a generator of its own, as a request of batch 1 with that seed makes it), its own PNG, and its own
  // queue index (written into the PNG). Empty: `seed` for the whole batch (one generator, as diffusers'),
  // `output` numbered, no index.
  std::vector<uint64_t> seeds;
  std::vector<std::string> outputs;
  std::vector<int64_t> indices;
  std::map<std::string, double> queueMetrics;  // recorded with this request's --metrics run (group "queue")

  bool writesImages() const { return !output.empty() || !outputs.empty(); }
  // The PNG files of a batch of `images`: `outputs`, else output (output-0.png, ... for several).
  std::vector<std::string> imagePaths(int64_t images) const;

  // Throws naming the option when the request is invalid on its own (no prompt, steps < 1, a size that is
  // not a multiple of 16, true CFG without a negative prompt, ...). Engine::generate checks it again,
  // with what depends on the model and the layout.
  void check() const;
};

// What a run did (the same on every rank unless noted).
struct RunReport {
  double loadSeconds = 0.0;                                             // 0 when the weights were already loaded
  double runSeconds = 0.0;                                              // the denoise loop, or the forward call
  double encodeSeconds = 0.0, decodeSeconds = 0.0, writeSeconds = 0.0;  // generate's other stages
  std::vector<double> stepSeconds;
  uint64_t bytesRead = 0;  // this rank's checkpoint bytes read so far
  std::string metricsRun;  // the id of the run appended to --metrics, if any
};

struct GenerateResult {
  at::Tensor latents;                   // packed [B, S, 64], on every rank
  at::Tensor images;                    // uint8 [B, H, W, 3] on every rank, when decoded
  std::vector<std::string> imagePaths;  // the PNG files written
  RunReport report;
};

// `pardit encode`: what FluxPipeline.encode_prompt makes of the prompts.
struct EncodeRequest {
  PromptInput prompt;
  PromptInput negativePrompt;  // optional
  int64_t maxSequenceLength = 0;
  std::string output;  // rank 0 writes prompt_embeds, pooled_prompt_embeds (and negative_*) here
};

struct EncodeResult {
  PromptEmbeddings positive;
  std::optional<PromptEmbeddings> negative;
  RunReport report;
};

// The PNG files of `count` images for --output `path`: path itself for one image, else path-0.png, ...
std::vector<std::string> imagePaths(const std::string& path, int64_t count);

struct ForwardResult {
  at::Tensor output;  // [B, L, outChannels], on every rank
  RunReport report;
};

// `pardit bench`: timed transformer forwards (or, with PipeFusion, denoising steps) on random inputs.
struct BenchmarkRequest {
  bool decode = false;  // the VAE decode (over all ranks, planned as generate's) instead of the transformer
  bool encode = false;  // the encode stage (tokenizers, CLIP, T5; one rank) instead of the transformer
  int64_t batch = 1;
  int64_t height = 256;
  int64_t width = 256;
  int64_t textLen = 128;
  int warmup = 2;
  int iters = 5;
  std::string prompt;             // encode: the prompt (empty: a built-in one)
  int64_t maxSequenceLength = 0;  // encode: T5 tokens (0: the model's default)
  bool profile = false;           // one more forward under the operator profiler (pipeline/op_profile.h)
};

struct BenchmarkResult {
  std::string modelName;
  std::vector<double> samples;  // seconds per timed forward (pipelined step with PipeFusion), slowest rank
  double median = 0.0, best = 0.0, mean = 0.0;
  double flops = 0.0;      // per forward, all ranks together
  double commShare = 0.0;  // largest rank's share of the step in communication (without PipeFusion)
  double gemmRate = 0.0;   // GEMM rate (FLOP/s) of one rank's device at this dtype, measured in the run
  // Single rank: the forward's GEMMs and attention timed alone (seconds); the rest is "other".
  double gemmSeconds = 0.0, attentionSeconds = 0.0;
  bool cudaGraphs = false;      // the timed forwards were CUDA graph replays (--cuda-graphs)
  std::string attentionKernel;  // the kernel the forward's attention ran (--attention, auto resolved)
  // PipeFusion: patches, and the share of a pipelined step spent waiting for the previous stage.
  int patches = 0, warmupSteps = 0;
  double bubbleShareMean = 0.0, bubbleShareMax = 0.0;
  std::vector<double> pipelineStepSeconds;  // every step, warm-up included (rank 0)
  int threads = 1;
  int64_t imageTokens = 0;
  // decode: this rank's and the largest rank's peak RSS growth during a decode, the planned estimate
  // of its activations, and the decoder's weights.
  uint64_t decodeActivationBytes = 0, decodeActivationBytesMax = 0, decodePlannedBytes = 0, decoderWeightBytes = 0;
  std::string decodeMode;  // "patches", "tiles:<px>" or "whole"
  // encode: the encoders' load time, whether T5 streamed, and the T5 tokens encoded per prompt.
  double encodeLoadSeconds = 0.0;
  bool encodeT5Streamed = false;
  int64_t textLen = 0;
  std::string vae;
  // profile: the operators of one forward on this rank, by total time.
  std::vector<OpProfile::Op> profile;
  double profileSeconds = 0.0;
};

class Engine {
 public:
  // Checks the options (the same on every rank, a valid layout for the world size), resolves this rank's
  // device and dtype, builds the topology and opens the checkpoint headers (no weights are read).
  Engine(EngineOptions options, dist::Runtime& runtime);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const EngineOptions& options() const;
  const model::FluxConfig& modelConfig() const;
  const std::string& modelName() const;
  c10::Device device() const;
  c10::ScalarType dtype() const;

  // Prompt (text or embeddings) in, latents (and images) out.
  GenerateResult generate(const GenerateRequest& request);
  // Runs generate's checks of a request without running it (prompts, layout, VAE, outputs, and the memory
  // plan of its shape): a request that passes fails in generate only on what happens while it runs.
  void check(const GenerateRequest& request);
  // Plans every later request as if it were this large (the largest of a queue), so that one plan and one
  // load serve them all; a request beyond it plans (and loads) anew. Checks that the shape fits.
  void reserve(int64_t batch, int64_t height, int64_t width, int64_t textTokens, bool trueCfg);
  // What determines the pixels of image `i` of a request on this model (prompts, seed, size, steps,
  // guidance, schedule, sequence length, model, weights and dtype) as one line of JSON; written into each PNG
  // (tEXt "pardit-request"), so a queue can tell an image it made already from another one.
  std::string imageIdentity(const GenerateRequest& request, int64_t i = 0) const;
  // The text encoders alone, on one rank; the embeddings on every rank.
  EncodeResult encode(const EncodeRequest& request);
  // One transformer call on full inputs (the same on every rank; the CFG degree splits the batch).
  // Rank 0 writes the output to `outputPath` (tensor 'sample') when given.
  ForwardResult forward(const model::FluxInputs& inputs, const std::string& outputPath = "");
  BenchmarkResult benchmark(const BenchmarkRequest& request);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pardit::pipeline
