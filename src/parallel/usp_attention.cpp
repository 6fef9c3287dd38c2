#include "pardit/parallel/usp_attention.h"

#include <ATen/ATen.h>

#include "pardit/core/error.h"

namespace pardit::parallel {

// The attention operands are [B, H, S, D] views of token-major memory ([B, S, H, D] underneath: FLUX computes
// q, k and v that way, and the attention kernels write their output that way). The all-to-all buffers are
// cut in that layout, so a rank's tokens of a head slice are one block, a received sequence is already in
// order for one tensor, and the attention output goes back without being transposed first.

at::Tensor ulyssesScatterHeads(dist::Communicator& comm, const at::Tensor& x) {
  const int64_t U = comm.size();
  if (U == 1) return x;
  const int64_t B = x.size(0), H = x.size(1), s = x.size(2), D = x.size(3);
  PARDIT_CHECK(H % U == 0, "Ulysses: ", H, " heads are not divisible by the Ulysses degree ", U);
  // [B, s, H, D] -> [U, B, s, H/U, D]: head slice j goes to rank j.
  at::Tensor send = x.transpose(1, 2).reshape({B, s, U, H / U, D}).permute({2, 0, 1, 3, 4}).contiguous();
  at::Tensor recv = dist::allToAll(comm, send);  // [U(src), B, s, H/U, D]
  // Source rank j's tokens at [j*s, (j+1)*s): for one image (B = 1) a view of the received buffer.
  return recv.permute({1, 0, 2, 3, 4}).reshape({B, U * s, H / U, D}).transpose(1, 2);
}

at::Tensor ulyssesGatherHeads(dist::Communicator& comm, const at::Tensor& x) {
  const int64_t U = comm.size();
  if (U == 1) return x;
  const int64_t B = x.size(0), h = x.size(1), S = x.size(2), D = x.size(3);
  PARDIT_CHECK(S % U == 0, "Ulysses: sequence ", S, " not divisible by ", U);
  // [B, S, H/U, D] -> [U, B, s, H/U, D]: sequence chunk j goes back to rank j (no copy for one image whose
  // attention output is token-major).
  at::Tensor send = x.transpose(1, 2).reshape({B, U, S / U, h, D}).transpose(0, 1).contiguous();
  at::Tensor recv = dist::allToAll(comm, send);  // [U(src = head slice), B, s, H/U, D]
  return recv.permute({1, 2, 0, 3, 4}).reshape({B, S / U, U * h, D}).transpose(1, 2);  // [B, H, s, D]
}

std::vector<at::Tensor> ulyssesScatterHeadsMany(dist::Communicator& comm, const std::vector<at::Tensor>& xs) {
  const int64_t U = comm.size(), n = static_cast<int64_t>(xs.size());
  if (U == 1) return xs;
  const int64_t B = xs[0].size(0), H = xs[0].size(1), s = xs[0].size(2), D = xs[0].size(3);
  PARDIT_CHECK(H % U == 0, "Ulysses: ", H, " heads are not divisible by the Ulysses degree ", U);
  // One all-to-all for all tensors. Send buffer [U, B, s, n, H/U, D]: a token's n tensors side by side, so for
  // one image each received tensor is a strided view (token stride n * H/U * D) that the attention kernels
  // read as it is, with no unpack copy; each tensor is copied in once.
  at::Tensor send = at::empty({U, B, s, n, H / U, D}, xs[0].options());
  for (int64_t i = 0; i < n; ++i)
    send.select(3, i).copy_(xs[i].transpose(1, 2).reshape({B, s, U, H / U, D}).permute({2, 0, 1, 3, 4}));
  at::Tensor recv = dist::allToAll(comm, send);  // [U(src), B, s, n, H/U, D]
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < n; ++i)
    out.push_back(recv.select(3, i).permute({1, 0, 2, 3, 4}).reshape({B, U * s, H / U, D}).transpose(1, 2));
  return out;
}

void mergeAttention(at::Tensor& out, at::Tensor& lse, const at::Tensor& outB, const at::Tensor& lseB) {
  // out, outB: [B, H, S, D] float32; lse, lseB: [B, H, S] float32.
  at::Tensor w = at::sigmoid(lseB - lse).unsqueeze(-1);
  out.sub_(w * (out - outB));
  lse.sub_(at::log_sigmoid(lse - lseB));
}

at::Tensor ringAttention(dist::Communicator& ring, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& prefixK, const at::Tensor& prefixV, model::AttentionKernel kernel) {
  const int R = ring.size();
  auto blockAttention = [&](const at::Tensor& kb, const at::Tensor& vb) {
    return model::localAttention(q, kb, vb, /*needLse=*/true, kernel);
  };
  if (R == 1) {  // one block: nothing to merge, no log-sum-exp
    if (prefixK.defined())
      return model::localAttention(q, at::cat({prefixK, k}, 2), at::cat({prefixV, v}, 2), false, kernel).out;
    return model::localAttention(q, k, v, false, kernel).out;
  }
  const int next = (ring.rank() + 1) % R, prev = (ring.rank() + R - 1) % R;
  // K and V travel together in one buffer [2, B, H, S, D].
  at::Tensor current = at::stack({k, v}).contiguous();
  at::Tensor incoming = at::empty_like(current);
  at::Tensor out, lse;
  for (int step = 0; step < R; ++step) {
    std::unique_ptr<dist::Work> transfer;
    if (step + 1 < R) transfer = ring.sendRecv(current, next, incoming, prev);  // overlaps the attention below
    at::Tensor kb = current[0], vb = current[1];
    if (step == 0 && prefixK.defined()) {
      kb = at::cat({prefixK, kb}, 2);
      vb = at::cat({prefixV, vb}, 2);
    }
    model::AttentionResult r = blockAttention(kb, vb);
    if (step == 0) {
      out = r.out.to(at::kFloat);
      lse = r.lse.to(at::kFloat);
    } else {
      mergeAttention(out, lse, r.out.to(at::kFloat), r.lse.to(at::kFloat));
    }
    if (transfer) {
      transfer->wait();
      std::swap(current, incoming);
    }
  }
  return out.to(q.scalar_type());
}

at::Tensor UspAttention::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const model::AttentionCall& call) {
  const int64_t U = ulysses_.size();
  if (kvCache_ && textMode_ == TextMode::kReplicated && call.textLen == 0) {
    // Image rows only: the text K/V of this layer come from the cache.
    auto g = ulyssesScatterHeadsMany(ulysses_, {q, k, v});
    auto [kb, vb] = kvCache_->image(call.layer, g[1], g[2]);
    auto [kt, vt] = kvCache_->text(call.layer);
    return ulyssesGatherHeads(ulysses_, ringAttention(ring_, g[0], kb, vb, kt, vt, kernel_));
  }
  if (textMode_ == TextMode::kSplit || call.textLen == 0) {
    // q, k and v travel in one all-to-all.
    auto g = ulyssesScatterHeadsMany(ulysses_, {q, k, v});
    return ulyssesGatherHeads(ulysses_, ringAttention(ring_, g[0], g[1], g[2], {}, {}, kernel_));
  }
  // Replicated text: rows [0, T) are the whole text on every rank, the rest this rank's image shard.
  const int64_t T = call.textLen, S = q.size(2);
  const int64_t H = q.size(1), h = H / U, u = ulysses_.rank();
  // Queries: text rows ride along (each Ulysses rank gets its own text rows back afterwards).
  at::Tensor qg = ulyssesScatterHeads(ulysses_, q);
  // Keys/values: only the image rows travel; the text contributes its local head slice, once.
  auto kv = ulyssesScatterHeadsMany(ulysses_, {k.narrow(2, T, S - T), v.narrow(2, T, S - T)});
  at::Tensor kg = kv[0], vg = kv[1];
  at::Tensor kt = k.narrow(2, 0, T).narrow(1, u * h, h);
  at::Tensor vt = v.narrow(2, 0, T).narrow(1, u * h, h);
  if (kvCache_) {
    std::tie(kg, vg) = kvCache_->image(call.layer, kg, vg);
    kvCache_->storeText(call.layer, kt, vt);
  }
  return ulyssesGatherHeads(ulysses_, ringAttention(ring_, qg, kg, vg, kt, vt, kernel_));
}

}  // namespace pardit::parallel
