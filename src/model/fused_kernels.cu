// CUDA kernels of the fused passes (see fused.h): one thread per RoPE pair or element, the arithmetic
// of fused_math.h, so the bits equal ATen's CUDA operations (float math, __fmul_rn/__fadd_rn: no
// contraction into a fused multiply-add, c10's conversions). RMS norm + RoPE: one warp per row, whose
// statistic is the kernel's own sum (fused_math.h), not ATen's.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fused_math.h"

namespace pardit::model::cuda {

namespace {

constexpr int kThreads = 256;

// Enough blocks to fill any current GPU many times over; the grid-stride loops cover the rest.
unsigned blocksFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <typename T>
__global__ void ropeKernel(T* out, const T* x, const float* cos, const float* sin, fused::RopeGeometry g,
                           int64_t pairs) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fused::ropeElement(out, x, cos, sin, g, i);
  }
}

template <typename T>
__global__ void scaleAddKernel(T* out, const T* a, const T* s, const T* c, fused::ScaleAddGeometry g, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fused::scaleAddElement(out, a, s, c, g, i);
  }
}

// One warp per row (b, l, h) of D elements: the row's statistic (fused_math.h's lane sums and butterfly), then
// each lane normalizes, weights and rotates its pairs.
template <typename T, typename W>
__global__ void rmsNormRopeKernel(T* out, const T* x, const W* w, const float* cos, const float* sin,
                                  fused::RopeGeometry g, float eps, int64_t rows) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t warps = blockDim.x / 32;
  // The row is the same for the whole warp, so every lane takes the loop together (the shuffles need all 32).
  for (int64_t row = blockIdx.x * warps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const fused::RopeIndex idx = fused::ropeIndex(g, row * (g.D / 2));
    const T* xrow = x + idx.x;
    float sum = fused::laneSumOfSquares(xrow, g.D, lane);
    for (int o = 16; o > 0; o >>= 1) sum = fused::add(sum, __shfl_xor_sync(0xffffffffu, sum, o));
    const float r = fused::rmsInverse(sum, g.D, eps);
    for (int64_t j = 2 * static_cast<int64_t>(lane); j < g.D; j += 64) {
      const T y[2] = {fused::rmsScale(xrow[j], r, w[j]), fused::rmsScale(xrow[j + 1], r, w[j + 1])};
      fused::ropePair(y, cos + idx.cos + j, sin + idx.sin + j, out + idx.out + j);
    }
  }
}

template <typename T, typename W>
void launchRmsNormRope(void* out, const void* x, const void* w, const float* cos, const float* sin,
                       const fused::RopeGeometry& g, float eps, cudaStream_t stream) {
  const int64_t rows = g.B * g.L * g.H;
  if (rows == 0) return;
  constexpr int kWarps = kThreads / 32;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  rmsNormRopeKernel<T, W><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(x), static_cast<const W*>(w), cos, sin, g, eps, rows);
  check(cudaGetLastError(), "RMS-norm + RoPE kernel launch");
}

template <typename T>
void launchRmsNormRope(bool floatWeight, void* out, const void* x, const void* w, const float* cos, const float* sin,
                       const fused::RopeGeometry& g, float eps, cudaStream_t stream) {
  if (floatWeight)
    launchRmsNormRope<T, float>(out, x, w, cos, sin, g, eps, stream);
  else
    launchRmsNormRope<T, T>(out, x, w, cos, sin, g, eps, stream);
}

template <typename T>
void launchRope(void* out, const void* x, const float* cos, const float* sin, const fused::RopeGeometry& g,
                cudaStream_t stream) {
  const int64_t pairs = g.B * g.L * g.H * (g.D / 2);
  if (pairs == 0) return;
  ropeKernel<T>
      <<<blocksFor(pairs), kThreads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(x), cos, sin, g, pairs);
  check(cudaGetLastError(), "RoPE kernel launch");
}

template <typename T>
void launchScaleAdd(void* out, const void* a, const void* s, const void* c, const fused::ScaleAddGeometry& g,
                    cudaStream_t stream) {
  const int64_t n = g.B * g.L * g.n;
  if (n == 0) return;
  scaleAddKernel<T><<<blocksFor(n), kThreads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(a),
                                                           static_cast<const T*>(s), static_cast<const T*>(c), g, n);
  check(cudaGetLastError(), "scale-add kernel launch");
}

}  // namespace

void rope(fused::ElementType dtype, void* out, const void* x, const float* cos, const float* sin,
          const fused::RopeGeometry& g, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case fused::ElementType::kFloat:
      launchRope<float>(out, x, cos, sin, g, st);
      break;
    case fused::ElementType::kBFloat16:
      launchRope<c10::BFloat16>(out, x, cos, sin, g, st);
      break;
    case fused::ElementType::kHalf:
      launchRope<c10::Half>(out, x, cos, sin, g, st);
      break;
  }
}

void rmsNormRope(fused::ElementType dtype, bool floatWeight, void* out, const void* x, const void* weight,
                 const float* cos, const float* sin, const fused::RopeGeometry& g, float eps, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case fused::ElementType::kFloat:
      launchRmsNormRope<float>(true, out, x, weight, cos, sin, g, eps, st);
      break;
    case fused::ElementType::kBFloat16:
      launchRmsNormRope<c10::BFloat16>(floatWeight, out, x, weight, cos, sin, g, eps, st);
      break;
    case fused::ElementType::kHalf:
      launchRmsNormRope<c10::Half>(floatWeight, out, x, weight, cos, sin, g, eps, st);
      break;
  }
}

void scaleAdd(fused::ElementType dtype, void* out, const void* a, const void* s, const void* c,
              const fused::ScaleAddGeometry& g, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case fused::ElementType::kFloat:
      launchScaleAdd<float>(out, a, s, c, g, st);
      break;
    case fused::ElementType::kBFloat16:
      launchScaleAdd<c10::BFloat16>(out, a, s, c, g, st);
      break;
    case fused::ElementType::kHalf:
      launchScaleAdd<c10::Half>(out, a, s, c, g, st);
      break;
  }
}

}  // namespace pardit::model::cuda
