#pragma once
// The FLUX text-to-image denoising loop (flow-match Euler), following diffusers' FluxPipeline: distilled
// guidance through the guidance embedding (dev) and optional true classifier-free guidance with negative
// prompt embeddings.

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>

#include "pardit/model/flux.h"
#include "pardit/pipeline/scheduler.h"

namespace pardit::pipeline {

struct PromptEmbeddings {
  at::Tensor promptEmbeds;  // [B, T, contextInDim]
  at::Tensor pooled;        // [B, vecInDim]
};

// Predicts the velocity for the current latents. Implementations decide where and how the transformer
// calls run (one rank, CFG branches on two ranks, a pipeline of stages).
class Denoiser {
 public:
  virtual ~Denoiser() = default;
  // latents [B, S, C]; timestep [B] (sigma scale, in the latents' dtype); guidance [B] float32 or undefined.
  virtual at::Tensor velocity(const at::Tensor& latents, const at::Tensor& timestep, const at::Tensor& guidance) = 0;
};

// One transformer call on full inputs (a local FluxTransformer, or one split over a sequence-parallel group).
using TransformerFn = std::function<at::Tensor(const model::FluxInputs&)>;
TransformerFn localTransformer(std::shared_ptr<const model::FluxTransformer> transformer);

// One rank (or one sequence-parallel group) runs every transformer call; with true CFG the negative
// branch runs after the positive.
class LocalDenoiser final : public Denoiser {
 public:
  LocalDenoiser(TransformerFn transformer, PromptEmbeddings positive, at::Tensor imageIds,
                std::optional<PromptEmbeddings> negative = std::nullopt, double trueCfgScale = 1.0);
  LocalDenoiser(std::shared_ptr<const model::FluxTransformer> transformer, PromptEmbeddings positive,
                at::Tensor imageIds, std::optional<PromptEmbeddings> negative = std::nullopt,
                double trueCfgScale = 1.0)
      : LocalDenoiser(localTransformer(std::move(transformer)), std::move(positive), std::move(imageIds),
                      std::move(negative), trueCfgScale) {}
  at::Tensor velocity(const at::Tensor& latents, const at::Tensor& timestep, const at::Tensor& guidance) override;
  bool trueCfg() const { return negative_.has_value() && trueCfgScale_ > 1.0; }

 private:
  TransformerFn transformer_;
  PromptEmbeddings positive_;
  std::optional<PromptEmbeddings> negative_;
  at::Tensor imageIds_, textIds_, negTextIds_;
  double trueCfgScale_;
};

// v_neg + scale * (v_pos - v_neg)
at::Tensor combineTrueCfg(const at::Tensor& positive, const at::Tensor& negative, double scale);

struct StepReport {
  int step = 0;  // 0-based
  int steps = 0;
  double seconds = 0.0;
};

// Runs the loop from `latents` (packed [B, S, C], in the model dtype) and returns the final latents.
// guidanceScale is used only when `withGuidance` (the model has guidance embeddings).
at::Tensor denoise(Denoiser& denoiser, at::Tensor latents, const FlowMatchEulerScheduler& scheduler,
                   bool withGuidance, double guidanceScale,
                   const std::function<void(const StepReport&)>& onStep = {});

}  // namespace pardit::pipeline
