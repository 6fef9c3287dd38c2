#include "pardit/parallel/sequence_parallel.h"

#include <ATen/ATen.h>

#include "pardit/core/error.h"

namespace pardit::parallel {

void checkSequenceParallel(const dist::ParallelDegrees& d, int64_t numHeads, int64_t imageTokens) {
  PARDIT_CHECK(numHeads % d.ulysses == 0, "--ulysses-degree ", d.ulysses, " does not divide the model's ", numHeads,
               " attention heads");
  const int64_t sp = d.spDegree();
  PARDIT_CHECK(imageTokens % sp == 0, "the image has ", imageTokens,
               " tokens ((height/16) x (width/16)), not divisible by --ulysses-degree x --ring-degree = ", sp);
}

SequenceParallelTransformer::SequenceParallelTransformer(std::shared_ptr<model::FluxTransformer> transformer,
                                                         std::shared_ptr<UspAttention> usp,
                                                         dist::Communicator& sequence)
    : transformer_(std::move(transformer)), usp_(std::move(usp)), sequence_(sequence) {}

at::Tensor SequenceParallelTransformer::forward(const model::FluxInputs& in) {
  const int64_t N = sequence_.size(), r = sequence_.rank();
  if (N == 1) return transformer_->forward(in);
  const int64_t Li = in.img.size(1), Lt = in.txt.size(1);
  PARDIT_CHECK(Li % N == 0, "sequence parallelism: ", Li, " image tokens are not divisible by ", N, " ranks");
  const int64_t chunk = Li / N;
  model::FluxInputs local = in;
  local.img = in.img.narrow(1, r * chunk, chunk);
  local.imgIds = in.imgIds.narrow(0, r * chunk, chunk);
  if (Lt % N == 0) {
    usp_->setTextMode(TextMode::kSplit);
    local.txt = in.txt.narrow(1, r * (Lt / N), Lt / N);
    local.txtIds = in.txtIds.narrow(0, r * (Lt / N), Lt / N);
  } else {
    usp_->setTextMode(TextMode::kReplicated);
  }
  at::Tensor out = transformer_->forward(local);          // [B, chunk, C]
  at::Tensor gathered = dist::allGather(sequence_, out);  // [N, B, chunk, C]
  return gathered.permute({1, 0, 2, 3}).reshape({out.size(0), Li, out.size(2)});
}

}  // namespace pardit::parallel
