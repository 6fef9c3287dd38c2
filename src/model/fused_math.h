#pragma once
// The arithmetic of the fused passes, one element (or RoPE pair) at a time, shared by the CPU loops
// (fused.cpp) and the CUDA kernels (fused_kernels.cu) so that both round exactly as ATen's operations
// do: float math, the product rounded before the sum (no fused multiply-add: __fmul_rn/__fadd_rn on the
// device; on the host every file that includes this is built with -ffp-contract=off), and c10's own
// conversions to bfloat16/float16 (the ones ATen's kernels use on either device).

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PARDIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PARDIT_HOST_DEVICE inline
#endif

namespace pardit::model::fused {

// The element types of the fused passes (the CUDA kernels' interface needs no ATen header).
enum class ElementType { kFloat, kBFloat16, kHalf };

PARDIT_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

PARDIT_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// RoPE of the pair (x[2j], x[2j+1]) with the tables' entries at 2j and 2j+1:
// o = x * cos + rotate(x) * sin, rotate(x) = (-x[2j+1], x[2j]), in float, rounded once to T.
template <typename T>
PARDIT_HOST_DEVICE void ropePair(const T* x, const float* c, const float* s, T* o) {
  const float x0 = static_cast<float>(x[0]), x1 = static_cast<float>(x[1]);
  o[0] = static_cast<T>(add(mul(x0, c[0]), mul(-x1, s[0])));
  o[1] = static_cast<T>(add(mul(x1, c[1]), mul(x0, s[1])));
}

// One element of at::rms_norm's tail: x * r * w in float (the input upcast, times the row's rsqrt statistic r,
// times the weight, each product rounded to float), rounded to T.
template <typename T, typename W>
PARDIT_HOST_DEVICE T rmsScale(T x, float r, W w) {
  return static_cast<T>(mul(mul(static_cast<float>(x), r), static_cast<float>(w)));
}

// The row statistic of the CUDA RMS-norm + RoPE kernel (one warp per row of D elements). Lane l of 32 sums,
// in float, the squares of its pairs (2l + 64k, 2l + 64k + 1) for k = 0, 1, ...; the warp then combines the 32
// partial sums by the butterfly of __shfl_xor_sync (xor 16, 8, 4, 2, 1), after which every lane holds the
// same total (each step adds the same two numbers on both lanes of a pair).
template <typename T>
PARDIT_HOST_DEVICE float laneSumOfSquares(const T* x, int64_t D, int lane) {
  float acc = 0.0f;
  for (int64_t j = 2 * static_cast<int64_t>(lane); j < D; j += 64) {
    const float a = static_cast<float>(x[j]), b = static_cast<float>(x[j + 1]);
    acc = add(acc, mul(a, a));
    acc = add(acc, mul(b, b));
  }
  return acc;
}

// 1 / sqrt(sum / D + eps), each operation rounded once, as ATen composes mean, add and rsqrt.
PARDIT_HOST_DEVICE float rmsInverse(float sum, int64_t D, float eps) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(sum, static_cast<float>(D)), eps)));
#else
  return 1.0f / std::sqrt(sum / static_cast<float>(D) + eps);
#endif
}

// The kernel's statistic computed on the host, lane by lane and butterfly step by step (for the tests).
template <typename T>
inline float warpSumOfSquaresOnHost(const T* x, int64_t D) {
  float p[32], q[32];
  for (int l = 0; l < 32; ++l) p[l] = laneSumOfSquares(x, D, l);
  for (int o = 16; o > 0; o >>= 1) {
    for (int l = 0; l < 32; ++l) q[l] = add(p[l], p[l ^ o]);
    for (int l = 0; l < 32; ++l) p[l] = q[l];
  }
  return p[0];
}

// a * s + c as ATen's mul then add: the product rounded to T, then the sum rounded to T.
template <typename T>
PARDIT_HOST_DEVICE T scaleAdd(T a, T s, T c) {
  const T product = static_cast<T>(mul(static_cast<float>(a), static_cast<float>(s)));
  return static_cast<T>(add(static_cast<float>(product), static_cast<float>(c)));
}

// Geometry of the fused passes, in elements (strides of size-1 or broadcast dimensions may be 0).
struct RopeGeometry {
  int64_t B, L, H, D;
  int64_t out[3], x[3], cos[3], sin[3];  // strides of dims 0-2; dim 3 is contiguous in all four
};

struct ScaleAddGeometry {
  int64_t B, L, n;             // a, out and c (when per token) are [B, L, n]; s and c (else) [B, n]
  int64_t aB, aL, sB, cB, cL;  // cL is 0 when c is broadcast over the tokens; out is contiguous
};

// The pair index i (of B * L * H * D/2) of a RoPE pass, as (row offsets, pair position).
struct RopeIndex {
  int64_t out, x, cos, sin;
};

PARDIT_HOST_DEVICE RopeIndex ropeIndex(const RopeGeometry& g, int64_t i) {
  const int64_t half = g.D / 2;
  const int64_t j = 2 * (i % half), r = i / half;
  const int64_t h = r % g.H, l = (r / g.H) % g.L, b = r / (g.H * g.L);
  return {b * g.out[0] + l * g.out[1] + h * g.out[2] + j, b * g.x[0] + l * g.x[1] + h * g.x[2] + j,
          b * g.cos[0] + l * g.cos[1] + h * g.cos[2] + j, b * g.sin[0] + l * g.sin[1] + h * g.sin[2] + j};
}

// The work of one CUDA thread (pair i of a RoPE pass, element i of a scale-add), also run on the host by
// the tests, which so check the kernels' indexing without a GPU.
template <typename T>
PARDIT_HOST_DEVICE void ropeElement(T* out, const T* x, const float* cos, const float* sin, const RopeGeometry& g,
                                    int64_t i) {
  const RopeIndex idx = ropeIndex(g, i);
  ropePair(x + idx.x, cos + idx.cos, sin + idx.sin, out + idx.out);
}

template <typename T>
PARDIT_HOST_DEVICE void scaleAddElement(T* out, const T* a, const T* s, const T* c, const ScaleAddGeometry& g,
                                        int64_t i) {
  const int64_t j = i % g.n, r = i / g.n, l = r % g.L, b = r / g.L;
  out[i] = scaleAdd(a[b * g.aB + l * g.aL + j], s[b * g.sB + j], c[b * g.cB + l * g.cL + j]);
}

}  // namespace pardit::model::fused
