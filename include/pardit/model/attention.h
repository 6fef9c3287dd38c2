#pragma once
// The attention interface of the FLUX blocks. The model calls attention through it so that parallel
// implementations (Ulysses, Ring, USP, PipeFusion's stale K/V) plug in without touching model code.

#include <ATen/core/Tensor.h>

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

// Scaled dot-product attention without mask, scale 1/sqrt(D). The CPU: flash attention (what PyTorch's
// scaled_dot_product_attention runs there). CUDA without the log-sum-exp: the kernel PyTorch's
// scaled_dot_product_attention picks for the device and dtype (cuDNN, flash or memory-efficient); with it
// (Ring attention): flash attention for half types, memory-efficient attention for fp32.
// q: [B, H, Sq, D], k/v: [B, H, Sk, D].
AttentionResult localAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool needLse);

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
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const AttentionCall& call) override;
};

}  // namespace pardit::model
