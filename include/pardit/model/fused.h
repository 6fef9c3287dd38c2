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

// Whether the passes below run fused (the default) or as the ATen compositions they replace (--unfused):
// process-wide, set once at start-up.
void setFusedPasses(bool on);
bool fusedPasses();

// RoPE of RMSNorm(x): rope(at::rms_norm(x, {D}, weight, eps), cos, sin) for the attention's q and k
// ([B, L, H, D], any strides with D contiguous; weight [D] in x's dtype or float32). On the CPU bit for bit:
// the per-row statistic rsqrt(mean(x^2) + eps) comes from ATen's own operations (its reduction order), and
// the scaling by it and by the weight, the rounding to x's dtype and the rotation are one pass instead of
// at::rms_norm's two to four and rope's one. On CUDA one kernel does all of it, a warp per row, reading x once
// and writing the output once (at::rms_norm and rope read and write it twice); its statistic is the kernel's
// own sum of squares (fused_math.h), so the result is within an ulp or so of the two operations, not their bits.
at::Tensor rmsNormRope(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& cos,
                       const at::Tensor& sin);
void rmsNormRopeInto(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps,
                     const at::Tensor& cos, const at::Tensor& sin);

// a * s.unsqueeze(1) + c: a [B, L, h], s [B, h] broadcast over the tokens, c [B, L, h] or [B, h]
// (broadcast); the product is rounded to the dtype before the sum, as ATen's mul then add. Adaptive
// modulation is scaleAdd(LN(x), 1 + scale, shift), a gated residual scaleAdd(y, gate, x).
at::Tensor scaleAdd(const at::Tensor& a, const at::Tensor& s, const at::Tensor& c);

}  // namespace pardit::model
