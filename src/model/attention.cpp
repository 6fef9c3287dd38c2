#include "pardit/model/attention.h"

#include <ATen/ATen.h>

#include <cmath>

#include "pardit/core/error.h"

namespace pardit::model {

namespace {
AttentionResult mathAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-2, -1)) * scale;  // [B,H,Sq,Sk]
  at::Tensor lse = at::logsumexp(scores, -1);                                                    // [B,H,Sq]
  at::Tensor p = at::exp(scores - lse.unsqueeze(-1));
  return {at::matmul(p, v.to(at::kFloat)).to(q.scalar_type()), lse};
}
}  // namespace

const char* attentionKernelName(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kAuto:
      return "auto";
    case AttentionKernel::kFlash:
      return "flash";
    case AttentionKernel::kEfficient:
      return "efficient";
    case AttentionKernel::kCudnn:
      return "cudnn";
    case AttentionKernel::kMath:
      return "math";
  }
  return "?";
}

namespace {
bool halfType(c10::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }
bool cpuFlashType(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}
}  // namespace

void checkAttentionKernel(AttentionKernel kernel, const c10::Device& device, c10::ScalarType dtype) {
  const char* name = attentionKernelName(kernel);
  if (kernel == AttentionKernel::kEfficient || kernel == AttentionKernel::kCudnn)
    PARDIT_CHECK(device.is_cuda(), "--attention ", name, " runs on CUDA only, but this rank runs on ", device.str(),
                 " (use --attention auto, flash or math)");
  if (device.is_cuda() && (kernel == AttentionKernel::kFlash || kernel == AttentionKernel::kCudnn))
    PARDIT_CHECK(halfType(dtype), "--attention ", name, " needs bf16 or fp16 on CUDA (--dtype), got ",
                 c10::toString(dtype));
  if (device.is_cpu() && kernel == AttentionKernel::kFlash)
    PARDIT_CHECK(cpuFlashType(dtype), "--attention flash on the CPU needs fp32, bf16 or fp16, got ",
                 c10::toString(dtype));
}

AttentionKernel resolveAttentionKernel(AttentionKernel kernel, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, bool needLse) {
  if (kernel != AttentionKernel::kAuto) return kernel;
  const auto type = q.scalar_type();
  if (q.device().is_cpu()) return cpuFlashType(type) ? AttentionKernel::kFlash : AttentionKernel::kMath;
  if (!q.device().is_cuda()) return AttentionKernel::kMath;
  if (needLse) return halfType(type) && q.size(-1) <= 256 ? AttentionKernel::kFlash : AttentionKernel::kEfficient;
  // PyTorch's own pick (sdp::SDPBackend: 0 math, 1 flash, 2 memory-efficient, 3 cuDNN).
  switch (at::_fused_sdp_choice(q, k, v)) {
    case 1:
      return AttentionKernel::kFlash;
    case 2:
      return AttentionKernel::kEfficient;
    case 3:
      return AttentionKernel::kCudnn;
    default:
      return AttentionKernel::kMath;
  }
}

AttentionResult localAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool needLse,
                               AttentionKernel kernel) {
  PARDIT_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention expects [B, H, S, D] tensors");
  const auto type = q.scalar_type();
  if (kernel == AttentionKernel::kMath) {
    AttentionResult r = mathAttention(q, k, v);
    if (!needLse) r.lse = at::Tensor();
    return r;
  }
  checkAttentionKernel(kernel, q.device(), type);
  if (q.device().is_cpu()) {
    if (cpuFlashType(type)) {
      auto r = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false);
      return {std::get<0>(r), needLse ? std::get<1>(r) : at::Tensor()};
    }
    return localAttention(q, k, v, needLse, AttentionKernel::kMath);
  }
  if (!q.device().is_cuda()) return localAttention(q, k, v, needLse, AttentionKernel::kMath);
  // Without the log-sum-exp, auto is what scaled_dot_product_attention runs: the reference's own kernel.
  if (kernel == AttentionKernel::kAuto && !needLse) return {at::scaled_dot_product_attention(q, k, v), at::Tensor()};
  const bool chosen = kernel != AttentionKernel::kAuto;  // by --attention: its failures name the flag
  if (!chosen) kernel = resolveAttentionKernel(kernel, q, k, v, /*needLse=*/true);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2);
  try {
    if (kernel == AttentionKernel::kFlash) {
      // It always returns its log-sum-exp [B, H, Sq]; the last flag is the debug mask (dropout only).
      auto r = at::_scaled_dot_product_flash_attention(q, k, v, 0.0, false, /*return_debug_mask=*/false);
      return {std::get<0>(r), needLse ? std::get<1>(r) : at::Tensor()};
    }
    if (kernel == AttentionKernel::kEfficient) {
      auto r = at::_scaled_dot_product_efficient_attention(q, k, v, std::nullopt, needLse, 0.0, false);
      // Its log-sum-exp rows are padded to a multiple of 32: only the first Sq are the queries'.
      return {std::get<0>(r), needLse ? std::get<1>(r).narrow(-1, 0, Sq) : at::Tensor()};
    }
    auto r = at::_scaled_dot_product_cudnn_attention(q, k, v, std::nullopt, needLse, 0.0, false, false);
    // cuDNN keeps its statistics as [B, H, Sq, 1].
    return {std::get<0>(r), needLse ? std::get<1>(r).reshape({B, H, Sq}).to(at::kFloat) : at::Tensor()};
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error& e) {
    if (!chosen) throw;
    const std::string what = e.what_without_backtrace();
    PARDIT_THROW("--attention ", attentionKernelName(kernel), ": PyTorch's kernel refused these tensors (", type, ", [",
                 B, ", ", H, ", ", Sq, ", ", q.size(3), "]): ", what.substr(0, what.find('\n')));
  }
}

at::Tensor LocalAttention::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const AttentionCall& /*call*/) {
  return localAttention(q, k, v, /*needLse=*/false, kernel_).out;
}

}  // namespace pardit::model
