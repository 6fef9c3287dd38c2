#include "pardit/model/fused.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include "pardit/core/error.h"

// Built with -ffp-contract=off (CMakeLists.txt): a product and the following sum are two roundings, as
// in the ATen operations these loops replace; a fused multiply-add would change the bits.

namespace pardit::model {

namespace {

bool fusable(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Rows of at least this many elements per task keep the threads' overhead small.
constexpr int64_t kGrainElements = 1 << 15;

template <typename T>
void ropeRow(T* o, const T* x, const float* c, const float* s, int64_t d) {
  for (int64_t j = 0; j < d; j += 2) {
    const float x0 = static_cast<float>(x[j]), x1 = static_cast<float>(x[j + 1]);
    const float re0 = x0 * c[j], im0 = -x1 * s[j];
    const float re1 = x1 * c[j + 1], im1 = x0 * s[j + 1];
    o[j] = static_cast<T>(re0 + im0);
    o[j + 1] = static_cast<T>(re1 + im1);
  }
}

template <typename T>
void ropeKernel(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  T* o = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / D);
  at::parallel_for(0, B * L * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (L * H), l = (r / H) % L, h = r % H;
      ropeRow(o + b * out.stride(0) + l * out.stride(1) + h * out.stride(2),
              xp + b * x.stride(0) + l * x.stride(1) + h * x.stride(2),
              cp + b * cos.stride(0) + l * cos.stride(1) + h * cos.stride(2),
              sp + b * sin.stride(0) + l * sin.stride(1) + h * sin.stride(2), D);
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
  if (!x.device().is_cpu() || !out.device().is_cpu() || x.dim() != 4 || !fusable(x.scalar_type()) ||
      out.scalar_type() != x.scalar_type() || out.sizes() != x.sizes() || x.size(3) % 2 != 0)
    return false;
  if (cos.scalar_type() != at::kFloat || sin.scalar_type() != at::kFloat || !cos.device().is_cpu() ||
      !sin.device().is_cpu() || cos.dim() != 4 || sin.dim() != 4)
    return false;
  for (int64_t i = 0; i < 4; ++i)
    for (const at::Tensor* t : {&cos, &sin})
      if (t->size(i) != 1 && t->size(i) != x.size(i)) return false;
  cos = cos.expand(x.sizes());
  sin = sin.expand(x.sizes());
  return x.stride(3) == 1 && out.stride(3) == 1 && cos.stride(3) == 1 && sin.stride(3) == 1;
}

template <typename T>
void scaleAddKernel(const at::Tensor& out, const at::Tensor& a, const at::Tensor& s, const at::Tensor& c) {
  const int64_t B = a.size(0), L = a.size(1), n = a.size(2);
  const bool cPerToken = c.dim() == 3;
  T* o = out.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* cp = c.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, l = r % L;
      T* orow = o + r * n;
      const T* arow = ap + b * a.stride(0) + l * a.stride(1);
      const T* srow = sp + b * s.stride(0);
      const T* crow = cPerToken ? cp + b * c.stride(0) + l * c.stride(1) : cp + b * c.stride(0);
      for (int64_t j = 0; j < n; ++j) {
        const T product = static_cast<T>(static_cast<float>(arow[j]) * static_cast<float>(srow[j]));
        orow[j] = static_cast<T>(static_cast<float>(product) + static_cast<float>(crow[j]));
      }
    }
  });
}

}  // namespace

void ropeInto(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor c = cos, s = sin;
  if (!ropeFusable(out, x, c, s)) {
    out.copy_(ropeComposed(x, cos, sin));
    return;
  }
  switch (x.scalar_type()) {
    case at::kFloat: ropeKernel<float>(out, x, c, s); break;
    case at::kBFloat16: ropeKernel<at::BFloat16>(out, x, c, s); break;
    default: ropeKernel<at::Half>(out, x, c, s); break;
  }
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor c = cos, s = sin;
  if (!ropeFusable(x, x, c, s)) return ropeComposed(x, cos, sin);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  ropeInto(out, x, cos, sin);
  return out;
}

at::Tensor scaleAdd(const at::Tensor& a, const at::Tensor& s, const at::Tensor& c) {
  PARDIT_CHECK(a.dim() == 3 && s.dim() == 2 && (c.dim() == 2 || c.dim() == 3), "scaleAdd: a must be [B, L, h], s [B, h]",
               " and c [B, L, h] or [B, h]; got ", a.sizes(), ", ", s.sizes(), ", ", c.sizes());
  const bool fused = a.device().is_cpu() && s.device().is_cpu() && c.device().is_cpu() && fusable(a.scalar_type()) &&
                     s.scalar_type() == a.scalar_type() && c.scalar_type() == a.scalar_type() &&
                     s.size(0) == a.size(0) && s.size(1) == a.size(2) && c.size(0) == a.size(0) &&
                     c.size(-1) == a.size(2) && (c.dim() == 2 || c.size(1) == a.size(1)) && a.stride(2) == 1 &&
                     s.stride(1) == 1 && c.stride(-1) == 1;
  if (!fused) return a * s.unsqueeze(1) + (c.dim() == 2 ? c.unsqueeze(1) : c);
  at::Tensor out = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  switch (a.scalar_type()) {
    case at::kFloat: scaleAddKernel<float>(out, a, s, c); break;
    case at::kBFloat16: scaleAddKernel<at::BFloat16>(out, a, s, c); break;
    default: scaleAddKernel<at::Half>(out, a, s, c); break;
  }
  return out;
}

}  // namespace pardit::model
