#pragma once
// Sequence-parallel joint attention over a Ulysses x Ring mesh (USP).
//
// Every rank holds a shard of the joint sequence with RoPE already applied at global positions.
//   1. Ulysses (U > 1): all-to-all in the Ulysses group scatters heads and gathers the sequence,
//      [B, H, s, D] -> [B, H/U, U*s, D].
//   2. Ring (R > 1): K/V blocks travel around the Ring group; each step's transfer is posted before
//      the current block's attention runs, and the partial results are merged in float32 with their
//      log-sum-exp. R = 1: local attention.
//   3. Ulysses: the reverse all-to-all restores [B, H, s, D] for the local queries.
// Text tokens: split across sequence-parallel ranks like the image when their count allows it
// (TextMode::kSplit, the fast path); otherwise every rank holds the whole text (kReplicated): the
// text queries ride along with the local queries, and the text keys/values enter the attention once
// (their head slice on each Ulysses rank, at ring step 0 only), so they are counted exactly once.

#include <ATen/core/Tensor.h>

#include <functional>
#include <utility>
#include <vector>

#include "pardit/dist/communicator.h"
#include "pardit/model/attention.h"

namespace pardit::parallel {

enum class TextMode { kSplit, kReplicated };

// Ring attention with log-sum-exp merging: q stays, k/v rotate around `ring` (send to rank+1,
// receive from rank-1). `prefixK/prefixV` (may be undefined) join the first block only. Returns the
// output [B, H, Sq, D] in q's dtype. `kernel` computes each block (model::localAttention).
at::Tensor ringAttention(dist::Communicator& ring, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& prefixK = {}, const at::Tensor& prefixV = {},
                         model::AttentionKernel kernel = model::AttentionKernel::kAuto);

// Merges a block result into a running (out, lse) pair, both float32: the numerically stable form
// out -= sigmoid(lseB - lse) * (out - outB); lse -= logsigmoid(lse - lseB).
void mergeAttention(at::Tensor& out, at::Tensor& lse, const at::Tensor& outB, const at::Tensor& lseB);

class UspAttention final : public model::AttentionBackend {
 public:
  // `ulysses` and `ring` are this rank's group communicators (size 1 disables that dimension).
  // `kernel` computes the local attention (--attention).
  UspAttention(dist::Communicator& ulysses, dist::Communicator& ring,
               model::AttentionKernel kernel = model::AttentionKernel::kAuto)
      : ulysses_(ulysses), ring_(ring), kernel_(kernel) {}

  int ulyssesDegree() const { return ulysses_.size(); }
  void setTextMode(TextMode mode) { textMode_ = mode; }
  TextMode textMode() const { return textMode_; }

  // K/V caching for PipeFusion (replicated-text mode): image K/V after the Ulysses all-to-all
  // [B, H/U, U*s, D] go through `image()`, which returns what the layer attends to (the stale buffers);
  // text K/V (this rank's head slice) are stored per layer, and a call without text rows
  // (AttentionCall::textLen == 0) attends to the stored text K/V of its layer.
  class KvCache {
   public:
    virtual ~KvCache() = default;
    virtual std::pair<at::Tensor, at::Tensor> image(int layer, const at::Tensor& k, const at::Tensor& v) = 0;
    virtual void storeText(int layer, const at::Tensor& k, const at::Tensor& v) = 0;
    virtual std::pair<at::Tensor, at::Tensor> text(int layer) const = 0;
  };
  void setKvCache(std::shared_ptr<KvCache> cache) { kvCache_ = std::move(cache); }

  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const model::AttentionCall& call) override;

 private:
  dist::Communicator& ulysses_;
  dist::Communicator& ring_;
  model::AttentionKernel kernel_;
  TextMode textMode_ = TextMode::kSplit;
  std::shared_ptr<KvCache> kvCache_;
};

// Ulysses all-to-alls: [B, H, s, D] -> [B, H/U, U*s, D] (sequence ordered by source rank) and back. The
// results are views of token-major memory ([B, S, H, D] underneath), the layout the inputs are expected in.
at::Tensor ulyssesScatterHeads(dist::Communicator& ulysses, const at::Tensor& x);
at::Tensor ulyssesGatherHeads(dist::Communicator& ulysses, const at::Tensor& x);
// Several same-shaped tensors scattered in one all-to-all (fewer synchronisations per layer).
std::vector<at::Tensor> ulyssesScatterHeadsMany(dist::Communicator& ulysses, const std::vector<at::Tensor>& xs);

}  // namespace pardit::parallel
