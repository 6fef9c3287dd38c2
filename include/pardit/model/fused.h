#pragma once
// Fused elementwise passes of the FLUX blocks. Each one computes exactly the bits of the ATen
// composition it replaces (the reference's own operations, each rounded to the tensor's dtype in the
// same order), in one pass over memory instead of several and without temporaries, on the CPU for
// float32, bfloat16 and float16 tensors whose last dimension is contiguous. Any other tensor (another
// device, dtype or layout) takes the ATen composition itself, so the result never depends on the path.

#include <ATen/core/Tensor.h>

namespace pardit::model {

// Interleaved-pair RoPE of x [B, L, H, D] with float32 tables cos/sin [1, L, 1, D]:
// (x.float() * cos + rotate(x).float() * sin).to(x.dtype), rotate(x)[2j] = -x[2j+1], rotate(x)[2j+1] = x[2j].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// The same, written into out [B, L, H, D] (for example a slice of the joint [text ; image] buffer, which
// saves the concatenation).
void ropeInto(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// a * s.unsqueeze(1) + c: a [B, L, h], s [B, h] broadcast over the tokens, c [B, L, h] or [B, h]
// (broadcast); the product is rounded to the dtype before the sum, as ATen's mul then add. Adaptive
// modulation is scaleAdd(LN(x), 1 + scale, shift), a gated residual scaleAdd(y, gate, x).
at::Tensor scaleAdd(const at::Tensor& a, const at::Tensor& s, const at::Tensor& c);

}  // namespace pardit::model
