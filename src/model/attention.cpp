#include "pardit/model/attention.h"

#include <ATen/ATen.h>

#include <cmath>

#include "pardit/core/error.h"

namespace pardit::model {

namespace {
AttentionResult mathAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-2, -1)) * scale;  // [B,H,Sq,Sk]
  at::Tensor lse = at::logsumexp(scores, -1);                                                     // [B,H,Sq]
  at::Tensor p = at::exp(scores - lse.unsqueeze(-1));
  return {at::matmul(p, v.to(at::kFloat)).to(q.scalar_type()), lse};
}
}  // namespace

AttentionResult localAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool needLse) {
  PARDIT_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention expects [B, H, S, D] tensors");
  const auto type = q.scalar_type();
  if (q.device().is_cpu()) {
    if (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf || type == at::kDouble) {
      auto r = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false);
      return {std::get<0>(r), needLse ? std::get<1>(r) : at::Tensor()};
    }
    return mathAttention(q, k, v);
  }
  if (q.device().is_cuda()) {
    // Without the log-sum-exp: the kernel PyTorch's scaled_dot_product_attention picks for these tensors on
    // this device (cuDNN attention where LibTorch prefers it, flash, memory-efficient), the reference's own.
    if (!needLse) return {at::scaled_dot_product_attention(q, k, v), at::Tensor()};
    if ((type == at::kBFloat16 || type == at::kHalf) && q.size(-1) <= 256) {
      // It always returns its log-sum-exp [B, H, Sq]; the last flag is the debug mask (dropout only).
      auto r = at::_scaled_dot_product_flash_attention(q, k, v, 0.0, false, /*return_debug_mask=*/false);
      return {std::get<0>(r), std::get<1>(r)};
    }
    auto r = at::_scaled_dot_product_efficient_attention(q, k, v, std::nullopt, /*compute_log_sumexp=*/true, 0.0,
                                                         false);
    // Its log-sum-exp rows are padded to a multiple of 32: only the first Sq are the queries'.
    return {std::get<0>(r), std::get<1>(r).narrow(-1, 0, q.size(2))};
  }
  return mathAttention(q, k, v);
}

at::Tensor LocalAttention::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const AttentionCall& /*call*/) {
  return localAttention(q, k, v, /*needLse=*/false).out;
}

}  // namespace pardit::model
