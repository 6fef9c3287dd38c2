#include "pardit/model/fused.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <atomic>

#include "fused_math.h"
#include "pardit/core/error.h"
#include "pardit/core/parallel.h"

#if PARDIT_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Built with -ffp-contract=off (CMakeLists.txt): a product and the following sum are two roundings, as
// in the ATen operations these loops replace; a fused multiply-add would change the bits. The element
// arithmetic is fused_math.h's, the same as the CUDA kernels'.

namespace pardit::model {

#if PARDIT_CUDA_KERNELS
namespace cuda {  // fused_kernels.cu
void rope(fused::ElementType dtype, void* out, const void* x, const float* cos, const float* sin,
          const fused::RopeGeometry& g, void* stream);
void rmsNormRope(fused::ElementType dtype, bool floatWeight, void* out, const void* x, const void* weight,
                 const float* cos, const float* sin, const fused::RopeGeometry& g, float eps, void* stream);
void scaleAdd(fused::ElementType dtype, void* out, const void* a, const void* s, const void* c,
              const fused::ScaleAddGeometry& g, void* stream);
}  // namespace cuda
#endif

namespace {

bool fusable(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

[[maybe_unused]] fused::ElementType elementType(at::ScalarType t) {
  return t == at::kFloat      ? fused::ElementType::kFloat
         : t == at::kBFloat16 ? fused::ElementType::kBFloat16
                              : fused::ElementType::kHalf;
}

std::atomic<bool> fusedEnabled{true};

// Where the fused passes run: the CPU, and CUDA devices when the kernels were built (unless --unfused).
bool fusedOn(const at::Device& d) {
  if (!fusedEnabled.load(std::memory_order_relaxed)) return false;
#if PARDIT_CUDA_KERNELS
  if (d.is_cuda()) return true;
#endif
  return d.is_cpu();
}

// Rows of at least this many elements per task keep the threads' overhead small.
constexpr int64_t kGrainElements = 1 << 15;

fused::RopeGeometry ropeGeometry(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos,
                                 const at::Tensor& sin) {
  fused::RopeGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), {}, {}, {}, {}};
  for (int d = 0; d < 3; ++d) {
    g.out[d] = out.stride(d);
    g.x[d] = x.stride(d);
    g.cos[d] = cos.stride(d);
    g.sin[d] = sin.stride(d);
  }
  return g;
}

template <typename T>
void ropeCpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const fused::RopeGeometry g = ropeGeometry(out, x, cos, sin);
  T* o = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t half = g.D / 2;
  parallelFor(g.B * g.L * g.H, kGrainElements / g.D, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const fused::RopeIndex row = fused::ropeIndex(g, r * half);
      for (int64_t j = 0; j < g.D; j += 2)
        fused::ropePair(xp + row.x + j, cp + row.cos + j, sp + row.sin + j, o + row.out + j);
    }
  });
}

at::Tensor ropeComposed(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor pairs = x.unflatten(-1, {-1, 2});  // [..., D/2, 2]
  at::Tensor re = pairs.select(-1, 0), im = pairs.select(-1, 1);
  at::Tensor rotated = at::stack({-im, re}, -1).flatten(-2);
  return (x.to(at::kFloat) * cos + rotated.to(at::kFloat) * sin).to(x.scalar_type());
}

// The fused path's conditions; cos/sin come back expanded to x's shape (stride 0 where they broadcast).
bool ropeFusable(const at::Tensor& out, const at::Tensor& x, at::Tensor& cos, at::Tensor& sin) {
  if (!fusedOn(x.device()) || out.device() != x.device() || x.dim() != 4 || !fusable(x.scalar_type()) ||
      out.scalar_type() != x.scalar_type() || out.sizes() != x.sizes() || x.size(3) % 2 != 0)
    return false;
  if (cos.scalar_type() != at::kFloat || sin.scalar_type() != at::kFloat || cos.device() != x.device() ||
      sin.device() != x.device() || cos.dim() != 4 || sin.dim() != 4)
    return false;
  for (int64_t i = 0; i < 4; ++i)
    for (const at::Tensor* t : {&cos, &sin})
      if (t->size(i) != 1 && t->size(i) != x.size(i)) return false;
  cos = cos.expand(x.sizes());
  sin = sin.expand(x.sizes());
  return x.stride(3) == 1 && out.stride(3) == 1 && cos.stride(3) == 1 && sin.stride(3) == 1;
}

fused::ScaleAddGeometry scaleAddGeometry(const at::Tensor& a, const at::Tensor& s, const at::Tensor& c) {
  const bool perToken = c.dim() == 3;
  return {a.size(0),   a.size(1),   a.size(2),   a.stride(0),
          a.stride(1), s.stride(0), c.stride(0), perToken ? c.stride(1) : 0};
}

template <typename T>
void scaleAddCpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& s, const at::Tensor& c) {
  const fused::ScaleAddGeometry g = scaleAddGeometry(a, s, c);
  T* o = out.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* cp = c.data_ptr<T>();
  parallelFor(g.B * g.L, kGrainElements / g.n, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.L, l = r % g.L;
      T* orow = o + r * g.n;
      const T* arow = ap + b * g.aB + l * g.aL;
      const T* srow = sp + b * g.sB;
      const T* crow = cp + b * g.cB + l * g.cL;
      for (int64_t j = 0; j < g.n; ++j) orow[j] = fused::scaleAdd(arow[j], srow[j], crow[j]);
    }
  });
}

// The fused pass keeps one normalized row on the stack.
constexpr int64_t kMaxNormRopeD = 512;

// rsqrt(mean(x^2) + eps) over the last dimension, [B, L, H, 1] float32: at::rms_norm's own operations on the
// same input (the upcast of half types, pow, mean, add_, rsqrt), so its reduction order and bits.
at::Tensor rmsStatistic(const at::Tensor& x, double eps) {
  return at::rsqrt(at::pow(x.to(at::kFloat), 2).mean({-1}, /*keepdim=*/true).add_(static_cast<float>(eps)));
}

template <typename T, typename W>
void rmsNormRopeCpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                    const at::Tensor& cos, const at::Tensor& sin) {
  const fused::RopeGeometry g = ropeGeometry(out, x, cos, sin);
  T* o = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const W* wp = w.data_ptr<W>();
  const float* rp = r.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t half = g.D / 2, rB = r.stride(0), rL = r.stride(1), rH = r.stride(2);
  parallelFor(g.B * g.L * g.H, kGrainElements / g.D, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const fused::RopeIndex idx = fused::ropeIndex(g, row * half);
      const int64_t h = row % g.H, l = (row / g.H) % g.L, b = row / (g.H * g.L);
      const float rr = rp[b * rB + l * rL + h * rH];
      T y[kMaxNormRopeD];
      const T* xrow = xp + idx.x;
      for (int64_t j = 0; j < g.D; ++j) y[j] = fused::rmsScale(xrow[j], rr, wp[j]);
      for (int64_t j = 0; j < g.D; j += 2) fused::ropePair(y + j, cp + idx.cos + j, sp + idx.sin + j, o + idx.out + j);
    }
  });
}

template <typename T>
void rmsNormRopeCpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                    const at::Tensor& cos, const at::Tensor& sin) {
  if (w.scalar_type() == at::kFloat)
    rmsNormRopeCpu<T, float>(out, x, w, r, cos, sin);
  else
    rmsNormRopeCpu<T, T>(out, x, w, r, cos, sin);
}

#if PARDIT_CUDA_KERNELS
void* currentStream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
#endif

// RoPE of x into out with cos/sin expanded to x's shape, once ropeFusable said yes.
void ropeFused(const at::Tensor& out, const at::Tensor& x, const at::Tensor& c, const at::Tensor& s) {
#if PARDIT_CUDA_KERNELS
  if (x.device().is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::rope(elementType(x.scalar_type()), out.data_ptr(), x.data_ptr(), c.data_ptr<float>(), s.data_ptr<float>(),
               ropeGeometry(out, x, c, s), currentStream(x));
    return;
  }
#endif
  switch (x.scalar_type()) {
    case at::kFloat:
      ropeCpu<float>(out, x, c, s);
      break;
    case at::kBFloat16:
      ropeCpu<at::BFloat16>(out, x, c, s);
      break;
    default:
      ropeCpu<at::Half>(out, x, c, s);
      break;
  }
}

}  // namespace

void setFusedPasses(bool on) { fusedEnabled.store(on, std::memory_order_relaxed); }
bool fusedPasses() { return fusedEnabled.load(std::memory_order_relaxed); }

void ropeInto(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  RECORD_FUNCTION("pardit::rope", std::vector<c10::IValue>());  // operator profiles (pipeline/op_profile.h)
  at::Tensor c = cos, s = sin;
  if (!ropeFusable(out, x, c, s)) {
    out.copy_(ropeComposed(x, cos, sin));
    return;
  }
  ropeFused(out, x, c, s);
}

namespace {

// The fused pass's conditions (ropeFusable's, and a weight [D] in x's dtype or float32).
bool rmsNormRopeFusable(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, at::Tensor& c,
                        at::Tensor& s) {
  return ropeFusable(out, x, c, s) && x.numel() > 0 && weight.dim() == 1 && weight.size(0) == x.size(3) &&
         x.size(3) <= kMaxNormRopeD && weight.is_contiguous() && weight.device() == x.device() &&
         (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat);
}

// The pass itself, once rmsNormRopeFusable said yes (c, s expanded to x's shape).
void rmsNormRopeFused(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps,
                      const at::Tensor& c, const at::Tensor& s) {
#if PARDIT_CUDA_KERNELS
  if (x.device().is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::rmsNormRope(elementType(x.scalar_type()), weight.scalar_type() == at::kFloat, out.data_ptr(), x.data_ptr(),
                      weight.data_ptr(), c.data_ptr<float>(), s.data_ptr<float>(), ropeGeometry(out, x, c, s),
                      static_cast<float>(eps), currentStream(x));
    return;
  }
#endif
  const at::Tensor r = rmsStatistic(x, eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      rmsNormRopeCpu<float>(out, x, weight, r, c, s);
      break;
    case at::kBFloat16:
      rmsNormRopeCpu<at::BFloat16>(out, x, weight, r, c, s);
      break;
    default:
      rmsNormRopeCpu<at::Half>(out, x, weight, r, c, s);
      break;
  }
}

}  // namespace

void rmsNormRopeInto(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps,
                     const at::Tensor& cos, const at::Tensor& sin) {
  RECORD_FUNCTION("pardit::rms_norm_rope", std::vector<c10::IValue>());
  at::Tensor c = cos, s = sin;
  if (!rmsNormRopeFusable(out, x, weight, c, s)) {
    ropeInto(out, at::rms_norm(x, {x.size(-1)}, weight, eps), cos, sin);
    return;
  }
  rmsNormRopeFused(out, x, weight, eps, c, s);
}

at::Tensor rmsNormRope(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& cos,
                       const at::Tensor& sin) {
  RECORD_FUNCTION("pardit::rms_norm_rope", std::vector<c10::IValue>());  // with its allocation
  at::Tensor c = cos, s = sin;
  // Not fused: the two operations as they are (no output buffer to copy into).
  if (!rmsNormRopeFusable(x, x, weight, c, s)) return rope(at::rms_norm(x, {x.size(-1)}, weight, eps), cos, sin);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  rmsNormRopeFused(out, x, weight, eps, c, s);
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  RECORD_FUNCTION("pardit::rope", std::vector<c10::IValue>());
  at::Tensor c = cos, s = sin;
  if (!ropeFusable(x, x, c, s)) return ropeComposed(x, cos, sin);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  ropeFused(out, x, c, s);
  return out;
}

at::Tensor scaleAdd(const at::Tensor& a, const at::Tensor& s, const at::Tensor& c) {
  RECORD_FUNCTION("pardit::scale_add", std::vector<c10::IValue>());
  PARDIT_CHECK(a.dim() == 3 && s.dim() == 2 && (c.dim() == 2 || c.dim() == 3),
               "scaleAdd: a must be [B, L, h], s [B, h]", " and c [B, L, h] or [B, h]; got ", a.sizes(), ", ",
               s.sizes(), ", ", c.sizes());
  const bool fused = fusedOn(a.device()) && s.device() == a.device() && c.device() == a.device() &&
                     fusable(a.scalar_type()) && s.scalar_type() == a.scalar_type() &&
                     c.scalar_type() == a.scalar_type() && s.size(0) == a.size(0) && s.size(1) == a.size(2) &&
                     c.size(0) == a.size(0) && c.size(-1) == a.size(2) && (c.dim() == 2 || c.size(1) == a.size(1)) &&
                     a.stride(2) == 1 && s.stride(1) == 1 && c.stride(-1) == 1;
  if (!fused) return a * s.unsqueeze(1) + (c.dim() == 2 ? c.unsqueeze(1) : c);
  at::Tensor out = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
#if PARDIT_CUDA_KERNELS
  if (a.device().is_cuda()) {
    const c10::cuda::CUDAGuard guard(a.device());
    cuda::scaleAdd(elementType(a.scalar_type()), out.data_ptr(), a.data_ptr(), s.data_ptr(), c.data_ptr(),
                   scaleAddGeometry(a, s, c), currentStream(a));
    return out;
  }
#endif
  switch (a.scalar_type()) {
    case at::kFloat:
      scaleAddCpu<float>(out, a, s, c);
      break;
    case at::kBFloat16:
      scaleAddCpu<at::BFloat16>(out, a, s, c);
      break;
    default:
      scaleAddCpu<at::Half>(out, a, s, c);
      break;
  }
  return out;
}

}  // namespace pardit::model
