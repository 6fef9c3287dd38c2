#pragma once
// The FLUX text-to-image denoising loop (flow-match Euler), following diffusers' FluxPipeline: distilled
// guidance through the guidance embedding (dev) and optional true classifier-free guidance with negative
// prompt embeddings. There is one loop; every parallel layout plugs into it as a Denoiser:
//   * TransformerDenoiser: every transformer call on this rank or its sequence-parallel group (USP),
//     with the two true-CFG branches one after the other, or one branch per CFG rank;
//   * PipeFusionDenoiser: the patch pipeline over PipeFusion stages (which may use USP and CFG too).
// The loop owns the timesteps, the guidance value, the true-CFG combine and the scheduler step; a
// denoiser owns where the transformer runs and in which pieces (all tokens, or patch by patch).

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>

#include "pardit/dist/communicator.h"
#include "pardit/dist/watchdog.h"
#include "pardit/model/flux.h"
#include "pardit/pipeline/scheduler.h"

namespace pardit::parallel {
class PipeFusionRunner;
}

namespace pardit::pipeline {

struct PromptEmbeddings {
  at::Tensor promptEmbeds;  // [B, T, contextInDim]
  at::Tensor pooled;        // [B, vecInDim]
};

// The transformer's predictions for a region of the latents: the positive branch and, under true CFG,
// the negative one (else undefined).
struct Prediction {
  at::Tensor positive, negative;
};

// v_neg + scale * (v_pos - v_neg)
at::Tensor combineTrueCfg(const at::Tensor& positive, const at::Tensor& negative, double scale);

struct DenoiseStep {
  int index = 0;  // 0-based
  int count = 0;
  at::Tensor timestep;  // [1] the model input sigma (timestep / 1000) in the latents' dtype
  at::Tensor guidance;  // [1] float32 guidance scale, or undefined for models without guidance embeddings
  // The stepped latents of a region from the predictions for it and its current latents: the true-CFG
  // combine and the Euler step. A denoiser calls it once per region it finishes.
  std::function<at::Tensor(const Prediction& prediction, const at::Tensor& latents)> update;
};

class Denoiser {
 public:
  virtual ~Denoiser() = default;
  // latents: packed [B, S, C], the same on every rank.
  virtual void begin(const at::Tensor& latents) {}
  // Runs one step and returns the latents after it (a pipeline may return them only from finish()).
  virtual at::Tensor step(const at::Tensor& latents, const DenoiseStep& step) = 0;
  // The final latents, the same on every rank.
  virtual at::Tensor finish(const at::Tensor& latents) { return latents; }
};

// One transformer call on full inputs (a local FluxTransformer, or one split over a sequence-parallel group).
using TransformerFn = std::function<at::Tensor(const model::FluxInputs&)>;
TransformerFn localTransformer(std::shared_ptr<const model::FluxTransformer> transformer);

class TransformerDenoiser final : public Denoiser {
 public:
  // Both branches here: the positive one, then (true CFG) the negative one.
  static std::unique_ptr<TransformerDenoiser> local(TransformerFn transformer, at::Tensor imageIds,
                                                    PromptEmbeddings positive,
                                                    std::optional<PromptEmbeddings> negative = std::nullopt);
  // CFG parallelism: this rank runs `branch` (positive on cfg rank 0, negative on cfg rank 1); one
  // all-gather per step brings both predictions to both ranks.
  static std::unique_ptr<TransformerDenoiser> cfgParallel(TransformerFn transformer, at::Tensor imageIds,
                                                          PromptEmbeddings branch, dist::Communicator& cfg);

  at::Tensor step(const at::Tensor& latents, const DenoiseStep& step) override;

 private:
  TransformerDenoiser(TransformerFn transformer, at::Tensor imageIds, PromptEmbeddings first,
                      std::optional<PromptEmbeddings> second, dist::Communicator* cfg);
  at::Tensor call(const PromptEmbeddings& branch, const at::Tensor& textIds, const at::Tensor& latents,
                  const DenoiseStep& step) const;

  TransformerFn transformer_;
  at::Tensor imageIds_;
  PromptEmbeddings first_;
  std::optional<PromptEmbeddings> second_;
  at::Tensor firstTextIds_, secondTextIds_;
  dist::Communicator* cfg_;
};

class PipeFusionDenoiser final : public Denoiser {
 public:
  // `branch`: this rank's prompt embeddings (the positive ones, or its CFG rank's branch when `cfg` is
  // given). `negative` without `cfg`: true CFG on this pipeline, both branches as one batch of 2B (the
  // two need the same text length). The first `warmupSteps` steps are synchronous.
  PipeFusionDenoiser(std::shared_ptr<parallel::PipeFusionRunner> runner, PromptEmbeddings branch,
                     std::optional<PromptEmbeddings> negative, dist::Communicator* cfg, int warmupSteps);

  void begin(const at::Tensor& latents) override;
  at::Tensor step(const at::Tensor& latents, const DenoiseStep& step) override;
  at::Tensor finish(const at::Tensor& latents) override;
  const parallel::PipeFusionRunner& runner() const { return *runner_; }

 private:
  std::shared_ptr<parallel::PipeFusionRunner> runner_;
  PromptEmbeddings embeddings_;  // [Bm, ...]: the branch, or [positive ; negative]
  bool paired_;
  dist::Communicator* cfg_;
  int warmupSteps_;
};

struct Sampling {
  bool withGuidance = false;  // the model has guidance embeddings
  double guidanceScale = 3.5;
  double trueCfgScale = 1.0;  // applied when the denoiser returns a negative prediction
};

struct StepReport {
  int step = 0;  // 0-based
  int steps = 0;
  double seconds = 0.0;
};

// Runs the loop from `latents` (packed [B, S, C], in the model dtype, the same on every rank) and
// returns the final latents. With a watchdog, each step is its context ("step 3/28") and, on a GPU, an
// operation it watches.
at::Tensor denoise(Denoiser& denoiser, at::Tensor latents, const FlowMatchEulerScheduler& scheduler,
                   const Sampling& sampling, const std::function<void(const StepReport&)>& onStep = {},
                   dist::Watchdog* watchdog = nullptr);

}  // namespace pardit::pipeline
