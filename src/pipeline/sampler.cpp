#include "pardit/pipeline/sampler.h"

#include <ATen/ATen.h>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"
#include "pardit/pipeline/latents.h"

namespace pardit::pipeline {

TransformerFn localTransformer(std::shared_ptr<const model::FluxTransformer> transformer) {
  return [t = std::move(transformer)](const model::FluxInputs& in) { return t->forward(in); };
}

LocalDenoiser::LocalDenoiser(TransformerFn transformer, PromptEmbeddings positive, at::Tensor imageIds,
                             std::optional<PromptEmbeddings> negative, double trueCfgScale)
    : transformer_(std::move(transformer)),
      positive_(std::move(positive)),
      negative_(std::move(negative)),
      imageIds_(std::move(imageIds)),
      trueCfgScale_(trueCfgScale) {
  textIds_ = textIds(positive_.promptEmbeds.size(1)).to(imageIds_.device());
  if (negative_) negTextIds_ = textIds(negative_->promptEmbeds.size(1)).to(imageIds_.device());
}

at::Tensor combineTrueCfg(const at::Tensor& positive, const at::Tensor& negative, double scale) {
  return negative + scale * (positive - negative);
}

at::Tensor LocalDenoiser::velocity(const at::Tensor& latents, const at::Tensor& timestep, const at::Tensor& guidance) {
  model::FluxInputs in{latents, positive_.promptEmbeds, positive_.pooled, timestep, guidance, imageIds_, textIds_};
  at::Tensor v = transformer_(in);
  if (!trueCfg()) return v;
  model::FluxInputs neg{latents, negative_->promptEmbeds, negative_->pooled, timestep, guidance, imageIds_, negTextIds_};
  return combineTrueCfg(v, transformer_(neg), trueCfgScale_);
}

at::Tensor denoise(Denoiser& denoiser, at::Tensor latents, const FlowMatchEulerScheduler& scheduler,
                   bool withGuidance, double guidanceScale, const std::function<void(const StepReport&)>& onStep) {
  const int64_t B = latents.size(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(latents.device());
  at::Tensor guidance;
  if (withGuidance) guidance = at::full({1}, guidanceScale, f32).expand({B});
  for (int i = 0; i < scheduler.steps(); ++i) {
    Timer timer;
    // The reference passes (t in the latents' dtype) / 1000 and the model multiplies by 1000 again.
    at::Tensor t = at::full({1}, scheduler.timesteps()[i], f32).expand({B}).to(latents.scalar_type());
    at::Tensor v = denoiser.velocity(latents, t / 1000, guidance);
    latents = scheduler.step(v, i, latents);
    if (onStep) onStep(StepReport{i, scheduler.steps(), timer.seconds()});
  }
  return latents;
}

}  // namespace pardit::pipeline
