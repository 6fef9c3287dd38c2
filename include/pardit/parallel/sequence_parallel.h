#pragma once
// The transformer call split over a sequence-parallel (Ulysses x Ring) group: every rank takes its
// contiguous chunk of the image tokens (and of the text tokens when their count divides evenly),
// runs all blocks with USP attention, and the chunks of the output are all-gathered, so every rank
// returns the full prediction.

#include <ATen/core/Tensor.h>

#include <memory>

#include "pardit/dist/communicator.h"
#include "pardit/dist/topology.h"
#include "pardit/model/flux.h"
#include "pardit/parallel/usp_attention.h"

namespace pardit::parallel {

// Checks the sequence-parallel constraints before anything is loaded; errors name the flags.
void checkSequenceParallel(const dist::ParallelDegrees& degrees, int64_t numHeads, int64_t imageTokens);

class SequenceParallelTransformer {
 public:
  // `transformer` must use `usp` as its attention backend; `sequence` is the sequence-parallel group
  // with ranks ordered by Topology::spRank().
  SequenceParallelTransformer(std::shared_ptr<model::FluxTransformer> transformer, std::shared_ptr<UspAttention> usp,
                              dist::Communicator& sequence);

  at::Tensor forward(const model::FluxInputs& in);

 private:
  std::shared_ptr<model::FluxTransformer> transformer_;
  std::shared_ptr<UspAttention> usp_;
  dist::Communicator& sequence_;
};

}  // namespace pardit::parallel
