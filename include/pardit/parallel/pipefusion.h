#pragma once
// PipeFusion: patch-level pipeline parallelism with stale K/V (arXiv 2405.14430).
//
// The transformer blocks (double, then single) are split into stages; each pipeline rank holds only its
// stage's weights. The image is cut into M row stripes ("patches"); with sequence parallelism inside a
// stage, each SP rank owns sub-stripe r of every patch. After `warmup` synchronous steps that run the
// whole (local) image through the stages and fill every attention layer's K/V buffer, each step runs
// patch by patch: stage s works on patch p while stage s+1 works on patch p-1. Attention of patch p
// uses fresh K/V for the text and for patches already refreshed this step, and the previous step's
// K/V for the others. The last stage applies the Euler step to each patch and sends it back to stage 0.
// Message shapes are known up front, so there are no shape handshakes.

#include <ATen/core/Tensor.h>

#include <c10/core/Device.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pardit/dist/communicator.h"
#include "pardit/dist/topology.h"
#include "pardit/model/flux.h"
#include "pardit/parallel/usp_attention.h"

namespace pardit::parallel {

// --pp-partition: "compute" (equal block counts), "memory" (equal weight bytes) or explicit counts.
struct Partition {
  enum class Mode { kCompute, kMemory, kExplicit } mode = Mode::kCompute;
  std::vector<int64_t> counts;  // kExplicit: blocks per stage
  std::string str() const;      // "compute", "memory" or "5,14"
  bool operator==(const Partition& o) const { return mode == o.mode && counts == o.counts; }
};

// Blocks per stage over the list [double_blocks..., single_blocks...].
class StagePartition {
 public:
  StagePartition() = default;
  explicit StagePartition(std::vector<int64_t> counts);
  int stages() const { return static_cast<int>(counts_.size()); }
  int64_t begin(int stage) const;
  int64_t end(int stage) const { return begin(stage) + counts_.at(stage); }
  const std::vector<int64_t>& counts() const { return counts_; }
  // Weight groups a stage holds: conditioning; input_embedders on the first; its blocks; final_layer on the last.
  std::vector<std::string> groupsOf(int stage, const model::FluxConfig& config) const;
  std::string describe(const model::FluxConfig& config) const;

 private:
  std::vector<int64_t> counts_;
};

// kCompute: equal block counts (double and single blocks cost the same per token); kMemory: equal weight
// bytes, contiguous; kExplicit: the given counts. Errors name --pp-partition and --pipefusion-degree.
StagePartition partitionStages(const model::FluxConfig& config, int stages, const Partition& mode);

// Which image tokens a rank holds: M row stripes, each split into one sub-stripe per SP rank.
struct PatchLayout {
  int64_t rows = 0;  // token rows (height / 16)
  int64_t cols = 0;  // token columns (width / 16)
  int patches = 1;
  int spDegree = 1;
  int spRank = 0;

  int64_t patchTokens() const { return rows / (patches * spDegree) * cols; }  // local tokens of one patch
  int64_t localTokens() const { return patchTokens() * patches; }
  // Global token index of each local token, patch-major: [localTokens] int64.
  at::Tensor localTokenIndex() const;
  // Errors name --height, --num-pipeline-patch and the sequence-parallel degrees.
  void check() const;
};

// The K/V buffers of one stage's attention layers. Rows are kept patch-major: slot p holds, for every
// Ulysses source rank, its sub-stripe of patch p, so warm-up writes and patch writes agree.
// The text K/V of the step's first patch are kept too: later patches of the step run image rows only
// and attend to them, so the text tokens pass through a stage once per step instead of once per patch.
class KvBuffers final : public UspAttention::KvCache {
 public:
  KvBuffers(int ulyssesDegree, int patches) : ulysses_(ulyssesDegree), patches_(patches) {}
  // Full mode (warm-up): fresh K/V of all local tokens. Patch mode: fresh K/V of one patch.
  void setFull() { patch_ = -1; }
  void setPatch(int patch) { patch_ = patch; }
  // k, v: image rows after the Ulysses all-to-all [B, h, U * rows, D]. Returns the whole buffers.
  std::pair<at::Tensor, at::Tensor> image(int layer, const at::Tensor& k, const at::Tensor& v) override;
  void storeText(int layer, const at::Tensor& k, const at::Tensor& v) override;
  std::pair<at::Tensor, at::Tensor> text(int layer) const override;
  uint64_t bytes() const;

 private:
  int ulysses_, patches_;
  int patch_ = -1;
  std::map<int, std::pair<at::Tensor, at::Tensor>> buffers_, text_;
};

struct PipeFusionComms {
  dist::Communicator* pipeline = nullptr;  // this rank's PipeFusion group (stage order)
  dist::Communicator* sequence = nullptr;  // its sequence-parallel group
  // The latents the last stage sends back to the first (Runtime::pipelineReturn(); `pipeline` if null).
  dist::Communicator* sendBack = nullptr;
};

// Where this rank sits in the pipeline and which tokens it holds.
struct PipeFusionOptions {
  StagePartition partition;
  int stage = 0;
  PatchLayout layout;  // spRank: this rank's rank in its sequence-parallel group
  c10::Device device = c10::kCPU;
};

// One denoising step through the pipeline. The caller (pipeline::denoise) owns the timestep, the
// guidance and the true-CFG combine; the runner owns the patch schedule.
struct PipeFusionStep {
  // Synchronous (warm-up, or a single patch): every local token at once, fresh K/V everywhere.
  // Otherwise patch by patch with stale K/V for the patches not yet refreshed this step.
  bool synchronous = true;
  // The last stage sends its stepped latents back to stage 0 (every step but the last).
  bool sendBack = false;
  // txt: prompt embeddings [Bm, T, contextInDim]; pooled [Bm, P]; timestep [Bm]; guidance [Bm] or undefined.
  // Bm is the model batch: the latents' batch B, or a multiple of it when several branches (true CFG on
  // one pipeline) travel together; the latents are repeated to match. The ids are set by the runner.
  model::FluxInputs conditioning;
  // Last stage: the stepped latents [B, n, C] of a region from the stage's output for it [Bm, n, C]
  // and its current latents [B, n, C]. Called once per region (all local tokens, or each patch).
  std::function<at::Tensor(const at::Tensor& output, const at::Tensor& latents)> update;
};

struct PipeFusionStats {
  double waitSeconds = 0.0;             // blocked receiving from the previous stage (bubbles included)
  std::vector<double> stepWaitSeconds;  // the same, per step
};

class PipeFusionRunner {
 public:
  // `transformer` holds this stage's weights and uses `usp` as attention; `usp` gets the K/V hook.
  PipeFusionRunner(std::shared_ptr<model::FluxTransformer> transformer, std::shared_ptr<UspAttention> usp,
                   PipeFusionOptions options, PipeFusionComms comms);

  // Starts a denoising loop from the full packed latents [B, L, C] (the same on every rank).
  void begin(const at::Tensor& latents);
  void step(const PipeFusionStep& step);
  // Ends the loop: the final full latents [B, L, C] on every rank of the pipeline.
  at::Tensor finish();

  // One synchronous transformer call through the stages (no stale K/V); the full output on every rank.
  at::Tensor forward(const model::FluxInputs& in);

  const PipeFusionStats& stats() const { return stats_; }
  const KvBuffers& kvBuffers() const { return *kv_; }

 private:
  struct Activations {
    at::Tensor txt, img;
  };
  // Runs this stage's blocks; the first stage starts from latents / prompt embeddings.
  Activations runStage(const Activations& in, const model::FluxInputs& cond) const;
  // All local tokens through this stage at once with fresh K/V: the first stage embeds `latents` (and the
  // text), the others receive the previous stage's activations; all but the last send theirs on.
  Activations passAll(const model::FluxInputs& x, const at::Tensor& latents);
  void stepSynchronous(const PipeFusionStep& s, model::FluxInputs x);
  void stepPatches(const PipeFusionStep& s, model::FluxInputs x);
  // The first stage's input: embedded text (or none) and embedded image rows, repeated to the model batch.
  Activations embed(const model::FluxInputs& cond, const at::Tensor& latents, bool withText) const;
  // Activations go stage to stage on the pipeline communicator; the latents sent back from the last
  // stage to the first on their own (PipeFusionComms::sendBack).
  enum class Channel { kForward, kSendBack };
  at::Tensor recvTensor(std::vector<int64_t> shape, int from, Channel channel = Channel::kForward);
  void sendTensor(const at::Tensor& t, int to, Channel channel = Channel::kForward);
  dist::Communicator& communicator(Channel channel) const;
  void completeSends();
  at::Tensor localToFull(const at::Tensor& local) const;
  bool firstStage() const { return options_.stage == 0; }
  bool lastStage() const { return options_.stage == options_.partition.stages() - 1; }
  int nextStage() const { return (options_.stage + 1) % options_.partition.stages(); }
  int previousStage() const { return (options_.stage + options_.partition.stages() - 1) % options_.partition.stages(); }

  std::shared_ptr<model::FluxTransformer> transformer_;
  std::shared_ptr<UspAttention> usp_;
  std::shared_ptr<KvBuffers> kv_;
  PipeFusionOptions options_;
  PipeFusionComms comms_;
  std::vector<std::unique_ptr<dist::Work>> pendingSends_;
  PipeFusionStats stats_;
  // Loop state: this rank's latents [B, Lloc, C] (current on the first and last stages), their ids, and
  // what the previous step sent back (stage 0 receives the same: nothing, all tokens, or patches).
  at::Tensor latents_, imageIds_;
  enum class SentBack { kNothing, kAll, kPatches } previous_ = SentBack::kNothing;
};

}  // namespace pardit::parallel
