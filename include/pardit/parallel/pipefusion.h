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
#include "pardit/pipeline/sampler.h"
#include "pardit/pipeline/scheduler.h"

namespace pardit::parallel {

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

// `mode`: "compute" (equal block counts; double and single blocks cost the same per token), "memory"
// (equal weight bytes, contiguous), or explicit counts "N0,N1,...". Errors name --pp-partition.
StagePartition partitionStages(const model::FluxConfig& config, int stages, const std::string& mode);

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
  dist::Communicator* cfg = nullptr;       // its CFG group, or null without CFG parallelism
};

struct PipeFusionStats {
  double seconds = 0.0;      // the whole loop
  double waitSeconds = 0.0;  // blocked receiving from the previous stage (pipeline bubbles included)
  std::vector<double> stepSeconds, stepWaitSeconds;  // per denoising step
};

class PipeFusionRunner {
 public:
  // `transformer` holds this stage's weights and uses `usp` as attention; `usp` gets the K/V hook.
  PipeFusionRunner(std::shared_ptr<model::FluxTransformer> transformer, std::shared_ptr<UspAttention> usp,
                   StagePartition partition, int stage, PatchLayout layout, PipeFusionComms comms,
                   c10::Device device);

  // The denoising loop. latents: full packed initial latents [B, L, C] (the same on every rank);
  // branch: this rank's prompt embeddings (the CFG branch with CFG parallelism, else the positive one);
  // negative: the negative branch when true CFG runs on one CFG rank (else nullopt).
  // Returns the final full latents on every rank of the pipeline.
  at::Tensor denoise(const at::Tensor& latents, const pipeline::PromptEmbeddings& branch,
                     const std::optional<pipeline::PromptEmbeddings>& negative, double trueCfgScale,
                     const pipeline::FlowMatchEulerScheduler& scheduler, bool withGuidance, double guidanceScale,
                     int warmupSteps, const std::function<void(const pipeline::StepReport&)>& onStep = {});

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
  at::Tensor recvTensor(std::vector<int64_t> shape, int from);
  void sendTensor(const at::Tensor& t, int to);
  at::Tensor localToFull(const at::Tensor& local) const;

  std::shared_ptr<model::FluxTransformer> transformer_;
  std::shared_ptr<UspAttention> usp_;
  std::shared_ptr<KvBuffers> kv_;
  StagePartition partition_;
  int stage_;
  PatchLayout layout_;
  PipeFusionComms comms_;
  c10::Device device_;
  std::vector<std::unique_ptr<dist::Work>> pendingSends_;
  PipeFusionStats stats_;
};

}  // namespace pardit::parallel
