// The fused elementwise passes against the ATen compositions they replace (the reference's operations,
// as diffusers writes them), bit for bit, in every dtype, layout and thread count the blocks use.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "fused_math.h"  // src/model: the CUDA kernels' per-thread work
#include "pardit/model/flux.h"
#include "pardit/model/fused.h"
#include "pardit/pipeline/op_profile.h"
#include "test_util.h"

using namespace pardit;

namespace {

// diffusers' apply_rotary_emb (use_real, unbind_dim -1) on x [B, L, H, D].
at::Tensor ropeReference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor pairs = x.reshape({x.size(0), x.size(1), x.size(2), -1, 2});
  at::Tensor re = pairs.select(-1, 0), im = pairs.select(-1, 1);
  at::Tensor rotated = at::stack({-im, re}, -1).flatten(3);
  return (x.to(at::kFloat) * cos + rotated.to(at::kFloat) * sin).to(x.scalar_type());
}

// The same bits (not only equal values: -0 and NaN payloads count).
void expectSameBits(const at::Tensor& got, const at::Tensor& want) {
  ASSERT_EQ(got.sizes(), want.sizes());
  ASSERT_EQ(got.scalar_type(), want.scalar_type());
  const auto bits = got.element_size() == 4 ? at::kInt : got.element_size() == 2 ? at::kShort : at::kLong;
  at::Tensor g = got.contiguous().view(bits), w = want.contiguous().view(bits);
  const int64_t differ = g.ne(w).sum().item<int64_t>();
  EXPECT_EQ(differ, 0) << differ << " of " << got.numel() << " elements differ";
}

struct Tables {
  at::Tensor cos, sin;  // [1, L, 1, D]
};

Tables tables(int64_t L, int64_t D) {
  at::Tensor ids = at::randint(0, 64, {L, 3}).to(at::kFloat);
  const std::vector<int64_t> axes = D == 8    ? std::vector<int64_t>{2, 2, 4}
                                    : D == 16 ? std::vector<int64_t>{4, 6, 6}
                                              : std::vector<int64_t>{16, 56, 56};  // FLUX.1's
  auto [c, s] = model::ropeTables(ids, axes, 10000.0);
  return {c.unsqueeze(0).unsqueeze(2), s.unsqueeze(0).unsqueeze(2)};
}

const at::ScalarType kDtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};

// Per-row scales from e^-6 to e^6: rows of very different magnitudes that stay finite in float16.
at::Tensor rowScales(at::IntArrayRef shape) { return at::exp(at::randn(shape).clamp(-3, 3) * 2); }

}  // namespace

TEST(FusedOps, RopeEqualsTheReferenceBitForBit) {
  at::manual_seed(11);
  const int64_t B = 2, L = 301, H = 3, D = 16;
  const Tables t = tables(L, D);
  for (auto dtype : kDtypes) {
    for (int threads : {1, 3}) {
      test::ThreadCount tc(threads);
      SCOPED_TRACE(std::string(c10::toString(dtype)) + ", threads " + std::to_string(threads));
      // q as the blocks see it: a select of the fused qkv projection (not contiguous), values of RMS-norm size.
      at::Tensor qkv = (at::randn({B, L, 3, H, D}) * 3).to(dtype);
      at::Tensor x = qkv.select(2, 1);
      ASSERT_FALSE(x.is_contiguous());
      expectSameBits(model::rope(x, t.cos, t.sin), ropeReference(x, t.cos, t.sin));
      expectSameBits(model::rope(x.contiguous(), t.cos, t.sin), ropeReference(x, t.cos, t.sin));
    }
  }
}

TEST(FusedOps, RopeIntoASliceWritesOnlyThatSlice) {
  at::manual_seed(12);
  const int64_t B = 1, Lt = 7, Li = 40, H = 2, D = 8;
  const Tables t = tables(Lt + Li, D);
  for (auto dtype : kDtypes) {
    SCOPED_TRACE(c10::toString(dtype));
    at::Tensor txt = at::randn({B, Lt, H, D}).to(dtype), img = at::randn({B, Li, H, D}).to(dtype);
    at::Tensor joint = at::full({B, Lt + Li, H, D}, 7.0, at::TensorOptions().dtype(dtype));
    model::ropeInto(joint.narrow(1, Lt, Li), img, t.cos.narrow(1, Lt, Li), t.sin.narrow(1, Lt, Li));
    EXPECT_TRUE(joint.narrow(1, 0, Lt).eq(7.0).all().item<bool>()) << "the text rows were written";
    model::ropeInto(joint.narrow(1, 0, Lt), txt, t.cos.narrow(1, 0, Lt), t.sin.narrow(1, 0, Lt));
    // Writing the two halves equals RoPE of the concatenation, as the reference computes it.
    expectSameBits(joint, ropeReference(at::cat({txt, img}, 1), t.cos, t.sin));
  }
}

namespace {

// q and k as the blocks compute them: torch.nn.RMSNorm (at::rms_norm) over each head, then diffusers' RoPE.
at::Tensor rmsNormRopeReference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& cos,
                                const at::Tensor& sin) {
  return ropeReference(at::rms_norm(x, {x.size(-1)}, w, 1e-6), cos, sin);
}

}  // namespace

TEST(FusedOps, RmsNormRopeEqualsRmsNormThenRopeBitForBit) {
  at::manual_seed(15);
  const int64_t B = 2, L = 67, H = 3;
  for (int64_t D : {16, 128}) {
    const Tables t = tables(L, D);
    for (auto dtype : kDtypes) {
      for (int threads : {1, 3}) {
        test::ThreadCount tc(threads);
        SCOPED_TRACE(std::string(c10::toString(dtype)) + ", D " + std::to_string(D) + ", threads " +
                     std::to_string(threads));
        // q as the blocks see it: a select of the qkv projection (not contiguous); rows of very different scales
        // (e^-6 to e^6, within float16's range).
        at::Tensor qkv = (at::randn({B, L, 3, H, D}) * rowScales({B, L, 1, H, 1})).to(dtype);
        at::Tensor x = qkv.select(2, 0);
        ASSERT_FALSE(x.is_contiguous());
        at::Tensor w = (at::rand({D}) + 0.5).to(dtype);
        expectSameBits(model::rmsNormRope(x, w, 1e-6, t.cos, t.sin), rmsNormRopeReference(x, w, t.cos, t.sin));
        expectSameBits(model::rmsNormRope(x.contiguous(), w, 1e-6, t.cos, t.sin),
                       rmsNormRopeReference(x, w, t.cos, t.sin));
        // A float32 weight with half-type activations (at::rms_norm's mixed-dtype path).
        at::Tensor wf = at::rand({D}) + 0.5;
        expectSameBits(model::rmsNormRope(x, wf, 1e-6, t.cos, t.sin), rmsNormRopeReference(x, wf, t.cos, t.sin));
      }
    }
  }
}

TEST(FusedOps, RmsNormRopeIntoTheJointBuffer) {
  at::manual_seed(16);
  const int64_t B = 1, Lt = 7, Li = 40, H = 2, D = 16;
  const Tables t = tables(Lt + Li, D);
  for (auto dtype : kDtypes) {
    SCOPED_TRACE(c10::toString(dtype));
    at::Tensor tqkv = at::randn({B, Lt, 3, H, D}).to(dtype), iqkv = at::randn({B, Li, 3, H, D}).to(dtype);
    at::Tensor tw = (at::rand({D}) + 0.5).to(dtype), iw = (at::rand({D}) + 0.5).to(dtype);
    at::Tensor joint = at::full({B, Lt + Li, H, D}, 7.0, at::TensorOptions().dtype(dtype));
    model::rmsNormRopeInto(joint.narrow(1, Lt, Li), iqkv.select(2, 1), iw, 1e-6, t.cos.narrow(1, Lt, Li),
                           t.sin.narrow(1, Lt, Li));
    EXPECT_TRUE(joint.narrow(1, 0, Lt).eq(7.0).all().item<bool>()) << "the text rows were written";
    model::rmsNormRopeInto(joint.narrow(1, 0, Lt), tqkv.select(2, 1), tw, 1e-6, t.cos.narrow(1, 0, Lt),
                           t.sin.narrow(1, 0, Lt));
    // Each stream normalized with its own weight, RoPE at its joint positions: the reference's concatenation.
    at::Tensor normed =
        at::cat({at::rms_norm(tqkv.select(2, 1), {D}, tw, 1e-6), at::rms_norm(iqkv.select(2, 1), {D}, iw, 1e-6)}, 1);
    expectSameBits(joint, ropeReference(normed, t.cos, t.sin));
  }
  // float64 is not fused: the two operations themselves, the same result.
  at::Tensor x = at::randn({B, Li, H, D}, at::kDouble), w = at::rand({D}, at::kDouble) + 0.5;
  expectSameBits(model::rmsNormRope(x, w, 1e-6, t.cos.narrow(1, 0, Li), t.sin.narrow(1, 0, Li)),
                 rmsNormRopeReference(x, w, t.cos.narrow(1, 0, Li), t.sin.narrow(1, 0, Li)));
}

TEST(FusedOps, ScaleAddEqualsMulThenAdd) {
  at::manual_seed(13);
  const int64_t B = 2, L = 257, h = 96;
  for (auto dtype : kDtypes) {
    for (int threads : {1, 3}) {
      test::ThreadCount tc(threads);
      SCOPED_TRACE(std::string(c10::toString(dtype)) + ", threads " + std::to_string(threads));
      at::Tensor a = at::randn({B, L, h}).to(dtype);
      // Scale, shift and gate are chunks of a modulation output [B, 3h]: rows with a stride of 3h.
      auto mod = (at::randn({B, 3 * h}) * 2).to(dtype).chunk(3, 1);
      ASSERT_FALSE(mod[0].is_contiguous());
      at::Tensor residual = at::randn({B, L, h}).to(dtype);
      // Modulation: LN(x) * (1 + scale) + shift, as diffusers' AdaLayerNormZero.
      at::Tensor s = 1 + mod[1];
      expectSameBits(model::scaleAdd(a, s, mod[0]), a * s.unsqueeze(1) + mod[0].unsqueeze(1));
      // Gated residual: x + gate * y.
      expectSameBits(model::scaleAdd(a, mod[2], residual), residual + mod[2].unsqueeze(1) * a);
    }
  }
}

// `pardit bench --profile` accounts for the fused passes under their own names (class norms/RoPE/modulation): one
// entry per call, with the ATen operators they fall back to or allocate with nested inside.
TEST(FusedOps, ShowInOperatorProfiles) {
  const at::Tensor a = at::randn({1, 5, 8}), s = at::randn({1, 8}), c = at::randn({1, 8});
  const Tables t = tables(5, 8);
  const at::Tensor q = at::randn({1, 5, 2, 8}), w = at::ones({8}), qd = q.to(at::kDouble), wd = w.to(at::kDouble);
  std::map<std::string, int64_t> calls;
  {
    pipeline::OpProfile profile;
    (void)model::scaleAdd(a, s, c);
    (void)model::scaleAdd(a, s, c);
    (void)model::rope(q, t.cos, t.sin);
    (void)model::rope(q.to(at::kDouble), t.cos, t.sin);    // the composition, nested inside
    (void)model::rmsNormRope(q, w, 1e-6, t.cos, t.sin);    // ATen's statistic, nested inside
    (void)model::rmsNormRope(qd, wd, 1e-6, t.cos, t.sin);  // at::rms_norm and rope, nested inside
    for (const auto& op : profile.ops()) calls[op.name] = op.calls;
  }
  EXPECT_EQ(calls["pardit::scale_add"], 2);
  EXPECT_EQ(calls["pardit::rope"], 2) << "the rope inside rms_norm_rope is rms_norm_rope's";
  EXPECT_EQ(calls["pardit::rms_norm_rope"], 2);
  EXPECT_EQ(calls.count("aten::rms_norm"), 0u);
  EXPECT_EQ(calls.count("aten::pow"), 0u);
  EXPECT_EQ(calls.count("aten::empty"), 0u) << "allocations inside a fused pass are its own";
  EXPECT_EQ(calls.count("aten::mul"), 0u) << "the composition inside rope is rope's";
  EXPECT_EQ(pipeline::OpProfile::classOf("pardit::rope"), "norms/RoPE/modulation");
  EXPECT_EQ(pipeline::OpProfile::classOf("pardit::scale_add"), "norms/RoPE/modulation");
  EXPECT_EQ(pipeline::OpProfile::classOf("pardit::rms_norm_rope"), "norms/RoPE/modulation");
}

// Switched off (--unfused), every pass runs the ATen composition it replaces (seen in the operators it
// calls), with the same bits.
TEST(FusedOps, SwitchedOffTheyRunTheCompositions) {
  at::manual_seed(17);
  const Tables t = tables(9, 16);
  const at::Tensor q = at::randn({1, 9, 3, 2, 16}).select(2, 0), w = at::rand({16}) + 0.5;
  const at::Tensor a = at::randn({1, 9, 8}), s = at::randn({1, 8});
  static thread_local std::map<std::string, int64_t>* seen = nullptr;
  std::map<std::string, int64_t> calls;
  seen = &calls;
  const auto handle = at::addThreadLocalCallback(at::RecordFunctionCallback([](const at::RecordFunction& fn) {
    if (seen) ++(*seen)[fn.name()];
    return std::unique_ptr<at::ObserverContext>();
  }));
  auto runAll = [&] {
    return std::vector<at::Tensor>{model::rope(q, t.cos, t.sin), model::rmsNormRope(q, w, 1e-6, t.cos, t.sin),
                                   model::scaleAdd(a, s, s)};
  };
  ASSERT_TRUE(model::fusedPasses());
  const auto fused = runAll();
  const int64_t mulsFused = calls["aten::mul"], rmsFused = calls["aten::rms_norm"];
  model::setFusedPasses(false);
  const auto composed = runAll();
  model::setFusedPasses(true);
  at::removeCallback(handle);
  seen = nullptr;
  EXPECT_EQ(mulsFused, 0);
  EXPECT_EQ(rmsFused, 0);
  EXPECT_GT(calls["aten::mul"], 0);
  EXPECT_EQ(calls["aten::rms_norm"], 1);
  for (size_t i = 0; i < fused.size(); ++i) expectSameBits(fused[i], composed[i]);
}

TEST(FusedOps, OtherTensorsTakeTheComposition) {
  at::manual_seed(14);
  // float64 and a last dimension that is not contiguous are not fused: the result is ATen's, the same.
  at::Tensor a = at::randn({1, 5, 6}, at::kDouble), s = at::randn({1, 6}, at::kDouble);
  expectSameBits(model::scaleAdd(a, s, a), a * s.unsqueeze(1) + a);
  at::Tensor strided = at::randn({1, 6, 5}).transpose(1, 2);  // [1, 5, 6], last stride 5
  at::Tensor sf = at::randn({1, 6});
  expectSameBits(model::scaleAdd(strided, sf, sf), strided * sf.unsqueeze(1) + sf.unsqueeze(1));
  const Tables t = tables(5, 8);
  at::Tensor x = at::randn({1, 5, 2, 8}, at::kDouble);
  expectSameBits(model::rope(x, t.cos, t.sin), ropeReference(x, t.cos, t.sin));
}

namespace {

// What each CUDA thread does (fused_math.h), run here for every thread index of a launch.
template <typename T>
void ropeThreads(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor c = cos.expand(x.sizes()), s = sin.expand(x.sizes());
  model::fused::RopeGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), {}, {}, {}, {}};
  for (int d = 0; d < 3; ++d) {
    g.out[d] = out.stride(d);
    g.x[d] = x.stride(d);
    g.cos[d] = c.stride(d);
    g.sin[d] = s.stride(d);
  }
  for (int64_t i = 0; i < g.B * g.L * g.H * g.D / 2; ++i)
    model::fused::ropeElement(static_cast<T*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()), c.data_ptr<float>(),
                              s.data_ptr<float>(), g, i);
}

template <typename T>
void scaleAddThreads(const at::Tensor& out, const at::Tensor& a, const at::Tensor& s, const at::Tensor& c) {
  const bool perToken = c.dim() == 3;
  const model::fused::ScaleAddGeometry g{a.size(0),   a.size(1),   a.size(2),   a.stride(0),
                                         a.stride(1), s.stride(0), c.stride(0), perToken ? c.stride(1) : 0};
  for (int64_t i = 0; i < out.numel(); ++i)
    model::fused::scaleAddElement(static_cast<T*>(out.data_ptr()), static_cast<const T*>(a.data_ptr()),
                                  static_cast<const T*>(s.data_ptr()), static_cast<const T*>(c.data_ptr()), g, i);
}

// The CUDA RMS-norm + RoPE kernel's work, row by row as its warps do it (fused_math.h).
template <typename T, typename W>
void rmsNormRopeWarps(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& cos,
                      const at::Tensor& sin, float eps) {
  const at::Tensor c = cos.expand(x.sizes()), s = sin.expand(x.sizes());
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h) {
        const T* xrow = static_cast<const T*>(x[b][l][h].data_ptr());
        T* orow = static_cast<T*>(out[b][l][h].data_ptr());
        const float* crow = c[b][l][h].data_ptr<float>();
        const float* srow = s[b][l][h].data_ptr<float>();
        const W* wp = static_cast<const W*>(w.data_ptr());
        const float r = model::fused::rmsInverse(model::fused::warpSumOfSquaresOnHost(xrow, D), D, eps);
        for (int64_t j = 0; j < D; j += 2) {
          const T y[2] = {model::fused::rmsScale(xrow[j], r, wp[j]), model::fused::rmsScale(xrow[j + 1], r, wp[j + 1])};
          model::fused::ropePair(y, crow + j, srow + j, orow + j);
        }
      }
}

// rmsNormRopeWarps for any of the fused dtypes, the weight in x's dtype or float32.
void rmsNormRopeWarpsOf(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& cos,
                        const at::Tensor& sin, float eps) {
  const bool f = w.scalar_type() == at::kFloat;
  switch (x.scalar_type()) {
    case at::kFloat:
      rmsNormRopeWarps<float, float>(out, x, w, cos, sin, eps);
      break;
    case at::kBFloat16:
      f ? rmsNormRopeWarps<c10::BFloat16, float>(out, x, w, cos, sin, eps)
        : rmsNormRopeWarps<c10::BFloat16, c10::BFloat16>(out, x, w, cos, sin, eps);
      break;
    default:
      f ? rmsNormRopeWarps<c10::Half, float>(out, x, w, cos, sin, eps)
        : rmsNormRopeWarps<c10::Half, c10::Half>(out, x, w, cos, sin, eps);
      break;
  }
}

// RMS norm + RoPE computed with another summation order than at::rms_norm's (the CUDA kernel's): each
// normalized element within a few ulps of the dtype, so each rotated pair within that of the normalized pair's
// magnitude, plus the rotation's own rounding.
void expectCloseToRmsNormRope(const at::Tensor& got, const at::Tensor& x, const at::Tensor& w, const at::Tensor& cos,
                              const at::Tensor& sin) {
  const double eps = got.scalar_type() == at::kFloat  ? 1.0 / (1 << 23)
                     : got.scalar_type() == at::kHalf ? 1.0 / (1 << 10)
                                                      : 1.0 / (1 << 7);
  const at::Tensor want = rmsNormRopeReference(x, w, cos, sin).to(at::kDouble);
  ASSERT_TRUE(at::isfinite(want).all().item<bool>()) << "the inputs overflowed the dtype";
  const at::Tensor normed = at::rms_norm(x, {x.size(-1)}, w, 1e-6).to(at::kDouble).abs();
  const at::Tensor pair = normed.unflatten(-1, {-1, 2}).sum(-1, true).expand({-1, -1, -1, -1, 2}).flatten(-2);
  const at::Tensor bound = (pair * 4 + want.abs()) * eps + 1e-30;
  const double worst = ((got.to(at::kDouble) - want).abs() / bound).max().item<double>();
  EXPECT_LE(worst, 1.0);
}

template <typename T>
void checkKernelBodies(at::ScalarType dtype) {
  SCOPED_TRACE(c10::toString(dtype));
  const int64_t B = 2, Lt = 5, Li = 23, H = 3, D = 16, n = 40;
  const Tables t = tables(Lt + Li, D);
  at::Tensor x = (at::randn({B, Lt + Li, 3, H, D}) * 3).to(dtype).select(2, 1);  // strided rows
  // Into the image half of a joint buffer: output strides differ from the input's.
  at::Tensor joint = at::zeros({B, Lt + Li + 4, H, D}, x.options());
  ropeThreads<T>(joint.narrow(1, 4, Lt + Li), x, t.cos, t.sin);
  expectSameBits(joint.narrow(1, 4, Lt + Li), ropeReference(x, t.cos, t.sin));
  EXPECT_TRUE(joint.narrow(1, 0, 4).eq(0).all().item<bool>());

  // RMS norm + RoPE, its warps' statistic: close to the two operations (it is not their summation order),
  // and the statistic itself within a few float ulps of the exact one.
  for (int64_t d : {16, 128}) {
    const Tables td = tables(Lt + Li, d);
    at::Tensor q = (at::randn({B, Lt + Li, 3, H, d}) * rowScales({B, Lt + Li, 1, H, 1})).to(dtype).select(2, 0);
    at::Tensor w = (at::rand({d}) + 0.5).to(dtype);
    at::Tensor normed = at::zeros({B, Lt + Li + 4, H, d}, q.options());
    rmsNormRopeWarps<T, T>(normed.narrow(1, 4, Lt + Li), q, w, td.cos, td.sin, 1e-6f);
    expectCloseToRmsNormRope(normed.narrow(1, 4, Lt + Li), q, w, td.cos, td.sin);
    EXPECT_TRUE(normed.narrow(1, 0, 4).eq(0).all().item<bool>());
    at::Tensor wf = at::rand({d}) + 0.5;
    rmsNormRopeWarps<T, float>(normed.narrow(1, 4, Lt + Li), q, wf, td.cos, td.sin, 1e-6f);
    expectCloseToRmsNormRope(normed.narrow(1, 4, Lt + Li), q, wf, td.cos, td.sin);
    at::Tensor row = q[0][3][1].contiguous();
    const double exact = row.to(at::kDouble).pow(2).sum().item<double>();
    const float sum = model::fused::warpSumOfSquaresOnHost(static_cast<const T*>(row.data_ptr()), d);
    EXPECT_NEAR(sum / exact, 1.0, 1e-6);
  }

  at::Tensor a = at::randn({B, Li, n}).to(dtype), residual = at::randn({B, Li, n}).to(dtype);
  auto mod = (at::randn({B, 3 * n}) * 2).to(dtype).chunk(3, 1);
  at::Tensor out = at::empty({B, Li, n}, a.options());
  scaleAddThreads<T>(out, a, mod[1], mod[0]);
  expectSameBits(out, a * mod[1].unsqueeze(1) + mod[0].unsqueeze(1));
  scaleAddThreads<T>(out, a, mod[2], residual);
  expectSameBits(out, residual + mod[2].unsqueeze(1) * a);
}

}  // namespace

TEST(FusedOps, CudaThreadWorkOnTheHostEqualsTheReference) {
  at::manual_seed(16);
  checkKernelBodies<float>(at::kFloat);
  checkKernelBodies<c10::BFloat16>(at::kBFloat16);
  checkKernelBodies<c10::Half>(at::kHalf);
}

// The CUDA kernels (built with nvcc) against ATen's CUDA operations, bit for bit (RMS norm + RoPE: against its
// arithmetic on the host, bit for bit, and ATen's within a few ulp); they skip without a GPU.
TEST(CudaFusedOps, KernelsEqualTheAtenCompositionsOnTheDevice) {
  PARDIT_REQUIRE_CUDA();
  at::manual_seed(15);
  const at::Device dev(at::kCUDA, 0);
  const int64_t B = 2, Lt = 77, Li = 1024, H = 3, D = 128, h = H * D;
  const Tables host = tables(Lt + Li, D);
  const at::Tensor cos = host.cos.to(dev), sin = host.sin.to(dev);
  for (auto dtype : kDtypes) {
    SCOPED_TRACE(c10::toString(dtype));
    at::Tensor qkv = (at::randn({B, Lt + Li, 3, H, D}) * 3).to(dtype).to(dev);
    at::Tensor x = qkv.select(2, 0);
    expectSameBits(model::rope(x, cos, sin).cpu(), ropeReference(x, cos, sin).cpu());
    // Written into the two halves of a joint buffer.
    at::Tensor joint = at::empty({B, Lt + Li, H, D}, x.options());
    model::ropeInto(joint.narrow(1, 0, Lt), x.narrow(1, 0, Lt), cos.narrow(1, 0, Lt), sin.narrow(1, 0, Lt));
    model::ropeInto(joint.narrow(1, Lt, Li), x.narrow(1, Lt, Li), cos.narrow(1, Lt, Li), sin.narrow(1, Lt, Li));
    expectSameBits(joint.cpu(), ropeReference(x, cos, sin).cpu());
    // And the CPU's fused pass gives the same bits as the GPU's.
    expectSameBits(model::rope(x.cpu(), host.cos, host.sin), ropeReference(x, cos, sin).cpu());

    // RMS norm + RoPE: the warps' arithmetic as the host computes it, bit for bit, written into a joint buffer;
    // close to ATen's rms_norm and rope on the device.
    at::Tensor w = (at::rand({D}) + 0.5).to(dtype).to(dev);
    at::Tensor normed = at::empty({B, Lt + Li, H, D}, x.options());
    model::rmsNormRopeInto(normed.narrow(1, 0, Lt), x.narrow(1, 0, Lt), w, 1e-6, cos.narrow(1, 0, Lt),
                           sin.narrow(1, 0, Lt));
    model::rmsNormRopeInto(normed.narrow(1, Lt, Li), x.narrow(1, Lt, Li), w, 1e-6, cos.narrow(1, Lt, Li),
                           sin.narrow(1, Lt, Li));
    at::Tensor onHost = at::empty({B, Lt + Li, H, D}, x.options().device(at::kCPU));
    rmsNormRopeWarpsOf(onHost, x.cpu(), w.cpu(), host.cos, host.sin, 1e-6f);
    expectSameBits(normed.cpu(), onHost);
    expectCloseToRmsNormRope(model::rmsNormRope(x, w, 1e-6, cos, sin).cpu(), x.cpu(), w.cpu(), host.cos, host.sin);
    // D = 16 (most lanes without a pair) with a float32 weight, against the host's warps bit for bit.
    const Tables t16 = tables(Lt + Li, 16);
    at::Tensor q16 = (at::randn({B, Lt + Li, 3, H, 16}) * 3).to(dtype).to(dev).select(2, 1);
    at::Tensor wf = (at::rand({16}) + 0.5).to(dev);
    at::Tensor got16 = model::rmsNormRope(q16, wf, 1e-6, t16.cos.to(dev), t16.sin.to(dev)).cpu();
    at::Tensor want16 = at::empty(got16.sizes(), got16.options());
    rmsNormRopeWarpsOf(want16, q16.cpu(), wf.cpu(), t16.cos, t16.sin, 1e-6f);
    expectSameBits(got16, want16);
    // More rows than one launch's grid covers (65536 blocks of 8 warps): the grid-stride loop, against ATen.
    const int64_t rows = 600000;
    const Tables tm = tables(rows, 16);
    at::Tensor qm = at::randn({1, rows, 1, 16}).to(dtype).to(dev), wm = (at::rand({16}) + 0.5).to(dtype).to(dev);
    expectCloseToRmsNormRope(model::rmsNormRope(qm, wm, 1e-6, tm.cos.to(dev), tm.sin.to(dev)).cpu(), qm.cpu(), wm.cpu(),
                             tm.cos, tm.sin);

    at::Tensor a = at::randn({B, Li, h}).to(dtype).to(dev), residual = at::randn({B, Li, h}).to(dtype).to(dev);
    auto mod = (at::randn({B, 3 * h}) * 2).to(dtype).to(dev).chunk(3, 1);
    at::Tensor s = 1 + mod[1];
    expectSameBits(model::scaleAdd(a, s, mod[0]).cpu(), (a * s.unsqueeze(1) + mod[0].unsqueeze(1)).cpu());
    expectSameBits(model::scaleAdd(a, mod[2], residual).cpu(), (residual + mod[2].unsqueeze(1) * a).cpu());
  }
}
