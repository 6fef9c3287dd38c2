#pragma once
// FP8 weights: float8_e4m3fn values with one float32 scale per output row (per output channel), so that
// W[o, :] ~= values[o, :] * scale[o]. The scale of a row is max|W[o, :]| / 448 (448 is e4m3fn's largest
// finite value), 1 for an all-zero row.
//
// Which weights are FP8 (the rule, for the transformer and T5): the weights of the linear layers inside
// the repeated blocks (FLUX double/single blocks: modulation, q|k|v, projections, MLPs; T5 layers:
// q, k, v, o, wi_0, wi_1, wo), which hold more than 99% of the bytes. Everything else stays in the compute
// dtype: biases, RMSNorm/LayerNorm scales, the embedders (time, guidance, pooled text, img_in, txt_in, T5's
// token embedding and relative position bias) and FLUX's final layer, where the error would not be spread
// over many layers and the bytes are few.
//
// Per-row scales commute with row concatenation: quantizing q, k and v apart (diffusers) or fused (BFL)
// gives the same values and scales, so a checkpoint quantizes the same in either layout.
//
// Compute: fp8Linear() multiplies by the dequantized weight (values * scale in float32, rounded to the
// activations' dtype) on the CPU and on GPUs without FP8 tensor cores. On CUDA sm_89+ (Ada, Hopper) with
// bf16 activations it runs at::_scaled_mm with row-wise scales: the activations are quantized per token
// (one scale per row of x, max|x[t, :]| / 448) on the fly. Per token, not per tensor: _scaled_mm's
// row-wise mode pairs per-row scales of A with per-column scales of B (our per-output-channel weight
// scales), and a token's result then depends on that token alone, so every sequence-parallel split of the
// tokens computes what one rank computes; FLUX's text and image tokens also differ in range, which one
// scale per tensor would share badly.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pardit/model/flux_config.h"

namespace pardit::model {

constexpr double kFp8E4m3Max = 448.0;

struct Fp8Rows {
  at::Tensor values;  // [out, in] float8_e4m3fn
  at::Tensor scale;   // [out] float32
};

// Quantizes a 2-D weight row by row (computed in float32).
Fp8Rows quantizeFp8Rows(const at::Tensor& weight);
// values * scale (float32 math) in `dtype`.
at::Tensor dequantizeFp8Rows(const at::Tensor& values, const at::Tensor& scale, c10::ScalarType dtype);
bool isFp8(const at::Tensor& t);

// y = x W^T + b with W given as FP8 rows (see above for the GEMM used); bias may be undefined.
at::Tensor fp8Linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scale, const at::Tensor& bias);

// Whether fp8Linear uses FP8 tensor cores for these activations on this device (else it dequantizes).
bool fp8TensorCoresUsable(const at::Tensor& x, const at::Tensor& values);

// Bytes of tensors on the device: kCompute in `dtype`, kFp8 1 byte, kFloat32 4 bytes per element.
uint64_t storedBytes(const std::vector<TensorSpec>& tensors, c10::ScalarType dtype);
// The FP8 view of a tensor list: the tensors `eligible` names become kFp8, each followed by its
// "<layer>.weight_scale" ([out], kFloat32).
std::vector<TensorSpec> withFp8(const std::vector<TensorSpec>& tensors, bool (*eligible)(const std::string&));

// Internal name of the scale tensor of an FP8 weight: "<layer>.weight" -> "<layer>.weight_scale".
std::string fp8ScaleName(const std::string& weightName);

}  // namespace pardit::model
