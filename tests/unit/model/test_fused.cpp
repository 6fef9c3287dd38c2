// The fused elementwise passes against the ATen compositions they replace (the reference's operations,
// as diffusers writes them), bit for bit, in every dtype, layout and thread count the blocks use.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "pardit/model/flux.h"
#include "pardit/model/fused.h"
#include "pardit/pipeline/op_profile.h"
#include "fused_math.h"  // src/model: the CUDA kernels' per-thread work
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
  auto [c, s] = model::ropeTables(ids, D == 8 ? std::vector<int64_t>{2, 2, 4} : std::vector<int64_t>{4, 6, 6}, 10000.0);
  return {c.unsqueeze(0).unsqueeze(2), s.unsqueeze(0).unsqueeze(2)};
}

const at::ScalarType kDtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};

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
  const at::Tensor q = at::randn({1, 5, 2, 8});
  std::map<std::string, int64_t> calls;
  {
    pipeline::OpProfile profile;
    (void)model::scaleAdd(a, s, c);
    (void)model::scaleAdd(a, s, c);
    (void)model::rope(q, t.cos, t.sin);
    (void)model::rope(q.to(at::kDouble), t.cos, t.sin);  // the composition, nested inside
    for (const auto& op : profile.ops()) calls[op.name] = op.calls;
  }
  EXPECT_EQ(calls["pardit::scale_add"], 2);
  EXPECT_EQ(calls["pardit::rope"], 2);
  EXPECT_EQ(calls.count("aten::empty"), 0u) << "allocations inside a fused pass are its own";
  EXPECT_EQ(calls.count("aten::mul"), 0u) << "the composition inside rope is rope's";
  EXPECT_EQ(pipeline::OpProfile::classOf("pardit::rope"), "norms/RoPE/modulation");
  EXPECT_EQ(pipeline::OpProfile::classOf("pardit::scale_add"), "norms/RoPE/modulation");
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
    model::fused::ropeElement(static_cast<T*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()),
                              c.data_ptr<float>(), s.data_ptr<float>(), g, i);
}

template <typename T>
void scaleAddThreads(const at::Tensor& out, const at::Tensor& a, const at::Tensor& s, const at::Tensor& c) {
  const bool perToken = c.dim() == 3;
  const model::fused::ScaleAddGeometry g{a.size(0), a.size(1), a.size(2), a.stride(0), a.stride(1),
                                         s.stride(0), c.stride(0), perToken ? c.stride(1) : 0};
  for (int64_t i = 0; i < out.numel(); ++i)
    model::fused::scaleAddElement(static_cast<T*>(out.data_ptr()), static_cast<const T*>(a.data_ptr()),
                                  static_cast<const T*>(s.data_ptr()), static_cast<const T*>(c.data_ptr()), g, i);
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

// The CUDA kernels (built with nvcc) against ATen's CUDA operations, bit for bit; they skip without a GPU.
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

    at::Tensor a = at::randn({B, Li, h}).to(dtype).to(dev), residual = at::randn({B, Li, h}).to(dtype).to(dev);
    auto mod = (at::randn({B, 3 * h}) * 2).to(dtype).to(dev).chunk(3, 1);
    at::Tensor s = 1 + mod[1];
    expectSameBits(model::scaleAdd(a, s, mod[0]).cpu(), (a * s.unsqueeze(1) + mod[0].unsqueeze(1)).cpu());
    expectSameBits(model::scaleAdd(a, mod[2], residual).cpu(), (residual + mod[2].unsqueeze(1) * a).cpu());
  }
}
