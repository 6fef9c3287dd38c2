#pragma once
// The attention interface of the FLUX blocks. The model calls attention through it so that parallel
// implementations (Ulysses, Ring, USP, PipeFusion's stale K/V) plug in without touching model code.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pardit::model {

// What a backend may need to know about one joint-attention call.
struct AttentionCall {
  int64_t textLen = 0;  // the first textLen rows of the sequence are text tokens
  int layer = 0;        // running index of the attention layer in the forward (double, then single)
};

struct AttentionResult {
  at::Tensor out;  // [B, H, S, D], dtype of q
  at::Tensor lse;  // [B, H, S] float32 log-sum-exp of the scaled scores (empty unless requested)
};

// Which kernel computes attention (--attention). kAuto: on the CPU flash attention (what PyTorch's
// scaled_dot_product_attention runs there); on CUDA without the log-sum-exp the kernel PyTorch's
// scaled_dot_product_attention picks for the device, dtype and layout (cuDNN, flash or memory-efficient),
// with it (Ring attention) flash attention for half types and memory-efficient attention for fp32.
// The others name one kernel: kFlash (CPU or CUDA; on CUDA bf16/fp16 only), kEfficient and kCudnn (CUDA
// only; cuDNN bf16/fp16 only), kMath (the unfused float32 composition, any device: a reference, slow).
enum class AttentionKernel { kAuto, kFlash, kEfficient, kCudnn, kMath };
const char* attentionKernelName(AttentionKernel kernel);

// Throws a one-line error naming --attention when `kernel` cannot run on `device` in `dtype`.
void checkAttentionKernel(AttentionKernel kernel, const c10::Device& device, c10::ScalarType dtype);

// The kernel a call on these tensors runs: `kernel` itself unless kAuto, else the one auto picks for
// them (on CUDA without the log-sum-exp: PyTorch's own choice, asked of it).
AttentionKernel resolveAttentionKernel(AttentionKernel kernel, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, bool needLse);

// Scaled dot-product attention without mask, scale 1/sqrt(D), with the kernel `kernel` (see above).
// q: [B, H, Sq, D], k/v: [B, H, Sk, D], any strides with the last dimension contiguous.
AttentionResult localAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool needLse,
                               AttentionKernel kernel = AttentionKernel::kAuto);

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // q, k, v: [B, H, S, D] with RoPE applied; returns [B, H, S, D].
  virtual at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionCall& call) = 0;
};

// Single-device attention over the whole sequence.
class LocalAttention final : public AttentionBackend {
 public:
  explicit LocalAttention(AttentionKernel kernel = AttentionKernel::kAuto) : kernel_(kernel) {}
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionCall& call) override;

 private:
  AttentionKernel kernel_;
};

}  // namespace pardit::model
