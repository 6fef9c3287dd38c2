#pragma once
// Private to src/pipeline: the state of an Engine, shared by its run stages (engine.cpp) and its
// benchmark (benchmark.cpp).
#include <optional>
#include <string>

#include "pardit/dist/runtime.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/vae_checkpoint.h"
#include "pardit/memory/planner.h"
#include "pardit/metrics/metrics.h"
#include "pardit/model/vae.h"
#include "pardit/parallel/pipefusion.h"
#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/job_plan.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/scheduler.h"
#include "rank_setup.h"

namespace pardit::pipeline {

using detail::PipeFusionLayout;
namespace detail {
class TextEncoders;  // text_stage.cpp
}

// ---- the engine's state ---------------------------------------------------------------------------

struct Engine::Impl {
  Impl(EngineOptions o, dist::Runtime& r) : options(std::move(o)), rt(r) {}

  EngineOptions options;
  dist::Runtime& rt;
  dist::ParallelDegrees degrees;
  c10::Device device = c10::kCPU;
  c10::ScalarType dtype = c10::kFloat;
  model::WeightFormat weightFormat = model::WeightFormat::kDense;  // --weight-dtype resolved
  std::optional<io::FluxCheckpoint> checkpoint;                    // none: a preset's synthetic weights in memory
  model::FluxConfig config;
  std::string modelName;
  detail::TensorReader read;

  // The weights of the last plan, kept while the next run plans the same groups the same way.
  struct Loaded {
    memory::RankPlan plan;
    std::string key;
    std::shared_ptr<model::FluxWeightProvider> weights;
  };
  std::optional<Loaded> loaded;
  // Engine::reserve: every run plans for at least this (transformer batch, image tokens, text tokens).
  struct Capacity {
    int64_t batch = 0, imageTokens = 0, textTokens = 0;
  };
  Capacity capacity;
  parallel::PipeFusionStats lastPipeline;  // of the last PipeFusion generate
  // The VAE (headers opened when a run first asks for images; the decoder loaded at its first decode).
  std::optional<io::VaeCheckpoint> vae;
  std::unique_ptr<model::VaeDecoder> decoder;

  // Everything a run needs between its stages.
  struct Run {
    std::optional<PipeFusionLayout> pipefusion;
    double loadSeconds = 0.0;
    std::shared_ptr<model::FluxWeightProvider> weights;
    model::FluxInputs inputs;                      // forward: this rank's share of the inputs
    std::shared_ptr<CudaGraphTransformer> graphs;  // --cuda-graphs: the graphs of the transformer call
    std::optional<DecodePlan> decode;              // generate with images: planned beside the transformer's plan
    int64_t height = 0, width = 0;                 // for the metrics: the image size (0 for forward)
    int steps = 0;                                 // for the metrics: denoising steps, or timed iterations
    metrics::MetricsRecorder recorder;
    explicit Run(dist::Runtime& rt) : recorder(rt) {}
  };

  // Prompts as text, after validation: CLIP's and T5's strings, and the negative ones under true CFG.
  struct TextPrompts {
    std::vector<std::string> clip, t5, negativeClip, negativeT5;
    int64_t maxLength = 0;  // T5 tokens
    bool empty() const { return clip.empty(); }
  };
  using TextSources = detail::TextSources;
  uint64_t textBytesRead = 0;  // text encoder bytes read by this rank

  // A generate request's prompts after the encode stage, and its schedule.
  struct Prompts {
    TextPrompts text;  // prompts as text (encoded after planning), or empty
    PromptEmbeddings positive;
    std::optional<PromptEmbeddings> negative;  // under true CFG
    SchedulerConfig schedule;
  };

  void open();
  // The encode stage. readTextPrompts and checkTextEncoders run inside validation (every rank);
  // encodeTexts runs the tokenizers and encoders on one rank and broadcasts the embeddings.
  TextSources textSources() const;
  TextPrompts readTextPrompts(const PromptInput& prompt, const PromptInput& negative, bool trueCfg,
                              int64_t maxLength) const;
  void checkTextEncoders() const;
  // spareBytes: this rank's budget left after its plan (which rank encodes); freeBytes: its memory free
  // now (whether T5 must stream).
  // keepBytes: what the encoders may keep holding after encoding (0: released at once); a later request
  // reuses kept encoders instead of loading them again.
  std::pair<PromptEmbeddings, std::optional<PromptEmbeddings>> encodeTexts(Run& run, const TextPrompts& prompts,
                                                                           uint64_t spareBytes, uint64_t freeBytes,
                                                                           uint64_t keepBytes = 0);
  std::shared_ptr<detail::TextEncoders> keptEncoders;  // on the encoding rank, between requests
  int keptEncoderRank = -1;
  void releaseTextEncoders();
  uint64_t keptEncoderBytes() const;  // this rank's
  // generate's checks before loading (every rank, through agree()) and its encode stage.
  Prompts validateAndEncode(Run& run, const GenerateRequest& request, const LatentGeometry& geom);
  // A generate request checked and planned (nothing loaded, nothing encoded yet).
  struct Planned {
    Prompts prompts;
    memory::RankPlan plan;
    int64_t batch = 0, textTokens = 0;
    bool text = false;
  };
  Planned planGenerate(Run& run, const GenerateRequest& request, const LatentGeometry& geom);
  // The Denoiser of this rank's layout over run.weights.
  std::unique_ptr<Denoiser> makeDenoiser(Run& run, const Prompts& prompts, const LatentGeometry& geom);
  // Engine::benchmark's two kinds: PipeFusion denoising steps (through engine.generate), or forwards.
  void benchmarkPipeline(Engine& engine, const BenchmarkRequest& request, BenchmarkResult& result);
  void benchmarkForwards(const BenchmarkRequest& request, BenchmarkResult& result);
  void benchmarkDecode(const BenchmarkRequest& request, BenchmarkResult& result);
  void benchmarkEncode(const BenchmarkRequest& request, BenchmarkResult& result);
  // The VAE for image outputs: --vae, or the one beside the model. Checked before anything loads.
  void openVae(const LatentGeometry& geom);
  // The decode stage's plan, the same on every rank (with the least free memory of any); a decode that
  // cannot fit even in tiles ends every rank before anything loads.
  DecodePlan planImageDecode(int64_t batch, const LatentGeometry& geom, uint64_t freeBytes);
  // Decodes z [B, C, h, w] (denormalised) as planned; every rank returns the images.
  at::Tensor runDecode(const model::VaeDecoder& decoder, const at::Tensor& z, const DecodePlan& plan);
  // The decode stage: packed latents -> uint8 images [B, H, W, 3] on every rank.
  at::Tensor decodeImages(Run& run, const at::Tensor& latents, const LatentGeometry& geom);
  // The write stage of the images: PNG files from rank 0 with the run's parameters.
  std::vector<std::string> writeImages(Run& run, const GenerateRequest& request, const Prompts& prompts,
                                       const at::Tensor& images);
  // Log lines after the loop: time, PipeFusion waits, activation memory against the plan.
  // --cuda-graphs: how many transformer calls were replayed; then the graphs' memory is released.
  void finishCudaGraphs(Run& run) const;
  void reportLoop(const Denoiser& denoiser, double seconds, uint64_t rssBeforeLoop);
  // The transformer call of a forward run on `inputs` (layout checked, weights planned and loaded);
  // run.inputs becomes this rank's share of them.
  TransformerFn forwardFn(Run& run, const model::FluxInputs& inputs, const std::string& outputPath);
  // This rank's plan for a run of the transformer (every rank; a plan that does not fit ends them all),
  // and its weights under the plan (kept while the next run plans the same).
  memory::RankPlan planRun(Run& run, int64_t batch, int64_t imageTokens, int64_t textTokens);
  std::shared_ptr<model::FluxWeightProvider> loadRun(Run& run, const memory::RankPlan& plan);
  std::shared_ptr<model::FluxWeightProvider> prepare(Run& run, int64_t batch, int64_t imageTokens, int64_t textTokens);
  // Rank 0 writes `value` as the one tensor of a safetensors file, with `metadata` (and "format": "pt").
  void writeOutput(const std::string& path, const std::string& flag, const std::string& tensorName,
                   const at::Tensor& value, std::map<std::string, std::string> metadata = {}) const;
  std::string imageIdentity(const GenerateRequest& request, int64_t i) const;
  // "bf16", or "fp8 e4m3 (row scales) + bf16" with FP8 weights.
  std::string weightsName() const;
  std::string finishMetrics(Run& run, const std::string& command, double seconds, int warmupSteps, int64_t images,
                            const std::map<std::string, double>& queue = {});
  void rankSummary(const std::shared_ptr<model::FluxWeightProvider>& weights,
                   const std::optional<PipeFusionLayout>& pf) const;
  uint64_t bytesRead() const {
    return (checkpoint ? checkpoint->bytesRead() : 0) + (vae ? vae->bytesRead() : 0) + textBytesRead;
  }
};

namespace detail {
// One line per collective kind with calls, bytes and time (this rank's counters).
std::string collectiveSummary(const dist::Runtime& rt);
// One rank's share of a CFG-split batch (dim 0), on `device`.
at::Tensor cfgShare(const at::Tensor& t, const dist::Topology& topo, const c10::Device& device);
// Gathers the CFG ranks' batch shares back into the full batch.
at::Tensor cfgGather(dist::Runtime& rt, const at::Tensor& mine);
}  // namespace detail

}  // namespace pardit::pipeline
