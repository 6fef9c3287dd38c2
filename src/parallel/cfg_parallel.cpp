#include "pardit/parallel/cfg_parallel.h"

#include <ATen/ATen.h>

#include "pardit/core/error.h"
#include "pardit/pipeline/latents.h"

namespace pardit::parallel {

CfgParallelDenoiser::CfgParallelDenoiser(pipeline::TransformerFn transformer, pipeline::PromptEmbeddings branch,
                                         at::Tensor imageIds, dist::Communicator& cfg, double trueCfgScale)
    : transformer_(std::move(transformer)),
      branch_(std::move(branch)),
      imageIds_(std::move(imageIds)),
      cfg_(cfg),
      trueCfgScale_(trueCfgScale) {
  PARDIT_CHECK(cfg_.size() == 2, "CFG parallelism needs a cfg group of 2 ranks, got ", cfg_.size());
  textIds_ = pipeline::textIds(branch_.promptEmbeds.size(1)).to(imageIds_.device());
}

at::Tensor CfgParallelDenoiser::velocity(const at::Tensor& latents, const at::Tensor& timestep,
                                         const at::Tensor& guidance) {
  model::FluxInputs in{latents, branch_.promptEmbeds, branch_.pooled, timestep, guidance, imageIds_, textIds_};
  at::Tensor mine = transformer_(in);
  at::Tensor both = dist::allGather(cfg_, mine);  // [2, B, S, C]: positive, negative
  return pipeline::combineTrueCfg(both[0], both[1], trueCfgScale_);
}

}  // namespace pardit::parallel
