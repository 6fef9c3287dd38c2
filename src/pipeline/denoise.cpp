#include "pardit/pipeline/denoise.h"

#include <ATen/ATen.h>

#include <optional>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"
#include "pardit/dist/watchdog.h"
#include "pardit/parallel/pipefusion.h"
#include "pardit/pipeline/inputs.h"
#include "pardit/pipeline/latents.h"

namespace pardit::pipeline {

at::Tensor combineTrueCfg(const at::Tensor& positive, const at::Tensor& negative, double scale) {
  return negative + scale * (positive - negative);
}

TransformerFn localTransformer(std::shared_ptr<const model::FluxTransformer> transformer) {
  return [t = std::move(transformer)](const model::FluxInputs& in) { return t->forward(in); };
}

namespace {

// The two CFG ranks' predictions: rank 0 holds the positive branch, rank 1 the negative one.
Prediction gatherBranches(dist::Communicator& cfg, const at::Tensor& mine) {
  at::Tensor both = dist::allGather(cfg, mine.contiguous());  // [2, B, S, C]
  return {both[0], both[1]};
}

// [positive ; negative] along the batch.
Prediction splitBranches(const at::Tensor& paired) {
  const int64_t B = paired.size(0) / 2;
  return {paired.narrow(0, 0, B), paired.narrow(0, B, B)};
}

}  // namespace

// ---- TransformerDenoiser -------------------------------------------------------------------------------

TransformerDenoiser::TransformerDenoiser(TransformerFn transformer, at::Tensor imageIds, PromptEmbeddings first,
                                         std::optional<PromptEmbeddings> second, dist::Communicator* cfg)
    : transformer_(std::move(transformer)),
      imageIds_(std::move(imageIds)),
      first_(std::move(first)),
      second_(std::move(second)),
      cfg_(cfg) {
  firstTextIds_ = textIds(first_.promptEmbeds.size(1)).to(imageIds_.device());
  if (second_) secondTextIds_ = textIds(second_->promptEmbeds.size(1)).to(imageIds_.device());
}

std::unique_ptr<TransformerDenoiser> TransformerDenoiser::local(TransformerFn transformer, at::Tensor imageIds,
                                                                PromptEmbeddings positive,
                                                                std::optional<PromptEmbeddings> negative) {
  return std::unique_ptr<TransformerDenoiser>(new TransformerDenoiser(
      std::move(transformer), std::move(imageIds), std::move(positive), std::move(negative), nullptr));
}

std::unique_ptr<TransformerDenoiser> TransformerDenoiser::cfgParallel(TransformerFn transformer, at::Tensor imageIds,
                                                                      PromptEmbeddings branch,
                                                                      dist::Communicator& cfg) {
  PARDIT_CHECK(cfg.size() == 2, "CFG parallelism needs a cfg group of 2 ranks, got ", cfg.size());
  return std::unique_ptr<TransformerDenoiser>(
      new TransformerDenoiser(std::move(transformer), std::move(imageIds), std::move(branch), std::nullopt, &cfg));
}

at::Tensor TransformerDenoiser::call(const PromptEmbeddings& branch, const at::Tensor& textIds,
                                     const at::Tensor& latents, const DenoiseStep& step) const {
  const int64_t B = latents.size(0);
  model::FluxInputs in{latents,
                       branch.promptEmbeds,
                       branch.pooled,
                       step.timestep.expand({B}),
                       step.guidance.defined() ? step.guidance.expand({B}) : at::Tensor(),
                       imageIds_,
                       textIds};
  return transformer_(in);
}

at::Tensor TransformerDenoiser::step(const at::Tensor& latents, const DenoiseStep& step) {
  Prediction p;
  const at::Tensor mine = call(first_, firstTextIds_, latents, step);
  if (cfg_ != nullptr) {
    p = gatherBranches(*cfg_, mine);
  } else {
    p.positive = mine;
    if (second_) p.negative = call(*second_, secondTextIds_, latents, step);
  }
  return step.update(p, latents);
}

// ---- PipeFusionDenoiser --------------------------------------------------------------------------------

PipeFusionDenoiser::PipeFusionDenoiser(std::shared_ptr<parallel::PipeFusionRunner> runner, PromptEmbeddings branch,
                                       std::optional<PromptEmbeddings> negative, dist::Communicator* cfg,
                                       int warmupSteps)
    : runner_(std::move(runner)),
      embeddings_(std::move(branch)),
      paired_(negative.has_value() && cfg == nullptr),
      cfg_(cfg),
      warmupSteps_(warmupSteps) {
  if (paired_) {
    PARDIT_CHECK(negative->promptEmbeds.size(1) == embeddings_.promptEmbeds.size(1),
                 "PipeFusion runs both true-CFG branches as one batch: the prompt and negative prompt embeddings "
                 "need the same token count (",
                 embeddings_.promptEmbeds.size(1), " vs ", negative->promptEmbeds.size(1), ")");
    embeddings_.promptEmbeds = at::cat({embeddings_.promptEmbeds, negative->promptEmbeds}, 0);
    embeddings_.pooled = at::cat({embeddings_.pooled, negative->pooled}, 0);
  }
}

void PipeFusionDenoiser::begin(const at::Tensor& latents) { runner_->begin(latents); }

at::Tensor PipeFusionDenoiser::step(const at::Tensor& latents, const DenoiseStep& step) {
  const int64_t Bm = embeddings_.promptEmbeds.size(0);
  parallel::PipeFusionStep s;
  s.synchronous = step.index < warmupSteps_;
  s.sendBack = step.index + 1 < step.count;
  s.conditioning.txt = embeddings_.promptEmbeds;
  s.conditioning.pooled = embeddings_.pooled;
  s.conditioning.timestep = step.timestep.expand({Bm});
  if (step.guidance.defined()) s.conditioning.guidance = step.guidance.expand({Bm});
  s.update = [&](const at::Tensor& output, const at::Tensor& region) {
    Prediction p;
    if (paired_) {
      p = splitBranches(output);
    } else if (cfg_ != nullptr) {
      p = gatherBranches(*cfg_, output);
    } else {
      p.positive = output;
    }
    return step.update(p, region);
  };
  runner_->step(s);
  return latents;  // the pipeline holds the current latents until finish()
}

at::Tensor PipeFusionDenoiser::finish(const at::Tensor&) { return runner_->finish(); }

// ---- the loop ------------------------------------------------------------------------------------------

at::Tensor denoise(Denoiser& denoiser, at::Tensor latents, const FlowMatchEulerScheduler& scheduler,
                   const Sampling& sampling, const std::function<void(const StepReport&)>& onStep,
                   dist::Watchdog* watchdog) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(latents.device());
  at::Tensor guidance;
  if (sampling.withGuidance) guidance = at::full({1}, sampling.guidanceScale, f32);
  // On a GPU the loop is a channel of the watchdog, its steps the operations watched.
  const uint64_t loop = watchdog && latents.is_cuda() ? watchdog->addChannel("the denoise loop") : 0;
  struct RemoveChannel {
    dist::Watchdog* watchdog;
    uint64_t channel;
    ~RemoveChannel() {
      if (channel != 0) watchdog->removeChannel(channel);
    }
  } removeChannel{watchdog, loop};
  denoiser.begin(latents);
  // One flag per step, set on the device without a sync: whether the latents stopped being finite.
  at::Tensor nonFinite = at::zeros({scheduler.steps()}, at::TensorOptions().dtype(at::kBool).device(latents.device()));
  for (int i = 0; i < scheduler.steps(); ++i) {
    if (watchdog) watchdog->setContext("step " + std::to_string(i + 1) + "/" + std::to_string(scheduler.steps()));
    // On a GPU the whole step is watched (its NCCL collectives do not block the host; the step's end does).
    std::optional<dist::Watchdog::Operation> watched;
    if (latents.is_cuda()) watched.emplace(watchdog, loop, "a denoise step on the GPU (its NCCL collectives)");
    Timer timer;
    DenoiseStep step;
    step.index = i;
    step.count = scheduler.steps();
    // The reference passes (t in the latents' dtype) / 1000 and the model multiplies by 1000 again.
    step.timestep = at::full({1}, scheduler.timesteps()[i], f32).to(latents.scalar_type()) / 1000;
    step.guidance = guidance;
    step.update = [&](const Prediction& p, const at::Tensor& x) {
      const at::Tensor v =
          p.negative.defined() ? combineTrueCfg(p.positive, p.negative, sampling.trueCfgScale) : p.positive;
      return scheduler.step(v, i, x);
    };
    latents = denoiser.step(latents, step);
    nonFinite[i] = at::isfinite(latents).all().logical_not();
    // On a GPU the host waits for the step's work before it takes the time (reading the step's flag back
    // syncs the compute stream alone): step times, progress lines and metrics are the device's, not how fast
    // the host queued the kernels. The cost is the launch latency of the next step's first kernel.
    if (latents.is_cuda()) (void)nonFinite[i].item<bool>();
    if (onStep) onStep(StepReport{i, scheduler.steps(), timer.seconds()});
  }
  at::Tensor bad;
  {
    std::optional<dist::Watchdog::Operation> watched;  // the host waits here for the GPU's last steps
    if (latents.is_cuda())
      watched.emplace(watchdog, loop, "the end of the denoise loop on the GPU (its NCCL collectives)");
    latents = denoiser.finish(latents);
    bad = nonFinite.cpu();
  }
  for (int i = 0; i < scheduler.steps(); ++i)
    PARDIT_CHECK(!bad[i].item<bool>(), "the latents became non-finite (NaN or Inf) at step ", i + 1, " of ",
                 scheduler.steps(), ": the weights or the inputs hold values the model cannot take");
  checkFinite(latents, "denoise", "latents");
  return latents;
}

}  // namespace pardit::pipeline
