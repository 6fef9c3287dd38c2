#pragma once
// CFG parallelism: with true classifier-free guidance the positive branch runs on cfg rank 0 and the
// negative branch on cfg rank 1; one all-gather per step brings both predictions to both ranks, which
// combine them and step the scheduler identically.

#include <ATen/core/Tensor.h>

#include "pardit/dist/communicator.h"
#include "pardit/pipeline/sampler.h"

namespace pardit::parallel {

class CfgParallelDenoiser final : public pipeline::Denoiser {
 public:
  // `branch`: this rank's prompt embeddings (positive on cfg rank 0, negative on cfg rank 1).
  CfgParallelDenoiser(pipeline::TransformerFn transformer, pipeline::PromptEmbeddings branch, at::Tensor imageIds,
                      dist::Communicator& cfg, double trueCfgScale);
  at::Tensor velocity(const at::Tensor& latents, const at::Tensor& timestep, const at::Tensor& guidance) override;

 private:
  pipeline::TransformerFn transformer_;
  pipeline::PromptEmbeddings branch_;
  at::Tensor imageIds_, textIds_;
  dist::Communicator& cfg_;
  double trueCfgScale_;
};

}  // namespace pardit::parallel
