// CUDA kernels of the fused passes (see fused.h): one thread per RoPE pair or element, the arithmetic
// of fused_math.h, so the bits equal ATen's CUDA operations (float math, __fmul_rn/__fadd_rn: no
// contraction into a fused multiply-add, c10's conversions).
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
__global__ void ropeKernel(T* out, const T* x, const float* cos, const float* sin, fused::RopeGeometry g, int64_t pairs) {
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

template <typename T>
void launchRope(void* out, const void* x, const float* cos, const float* sin, const fused::RopeGeometry& g,
                cudaStream_t stream) {
  const int64_t pairs = g.B * g.L * g.H * (g.D / 2);
  if (pairs == 0) return;
  ropeKernel<T><<<blocksFor(pairs), kThreads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(x), cos, sin, g,
                                                           pairs);
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
    case fused::ElementType::kFloat: launchRope<float>(out, x, cos, sin, g, st); break;
    case fused::ElementType::kBFloat16: launchRope<c10::BFloat16>(out, x, cos, sin, g, st); break;
    case fused::ElementType::kHalf: launchRope<c10::Half>(out, x, cos, sin, g, st); break;
  }
}

void scaleAdd(fused::ElementType dtype, void* out, const void* a, const void* s, const void* c,
              const fused::ScaleAddGeometry& g, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case fused::ElementType::kFloat: launchScaleAdd<float>(out, a, s, c, g, st); break;
    case fused::ElementType::kBFloat16: launchScaleAdd<c10::BFloat16>(out, a, s, c, g, st); break;
    case fused::ElementType::kHalf: launchScaleAdd<c10::Half>(out, a, s, c, g, st); break;
  }
}

}  // namespace pardit::model::cuda
