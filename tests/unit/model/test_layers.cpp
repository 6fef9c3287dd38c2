#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "pardit/core/error.h"
#include "pardit/model/attention.h"
#include "pardit/model/flux.h"
#include "pardit/model/fused.h"

using namespace pardit;

TEST(Rope, RotatesInterleavedPairsByTheAxisAngles) {
  // One token at (0, 2, 3), axes (2, 2, 4): pair 0 uses id 0, pair 1 uses row 2, pairs 2-3 use col 3.
  at::Tensor ids = at::tensor({0.f, 2.f, 3.f}).reshape({1, 3});
  auto [cos, sin] = model::ropeTables(ids, {2, 2, 4}, 10000.0);
  ASSERT_EQ(cos.sizes(), (std::vector<int64_t>{1, 8}));
  const double angles[4] = {0.0, 2.0, 3.0, 3.0 / 100.0};  // theta^(-2k/d): axis 2 has k = 0, 1 with d = 4
  for (int j = 0; j < 4; ++j) {
    EXPECT_NEAR(cos[0][2 * j].item<float>(), std::cos(angles[j]), 1e-6);
    EXPECT_NEAR(sin[0][2 * j + 1].item<float>(), std::sin(angles[j]), 1e-6);
  }
  at::Tensor x = at::randn({1, 1, 1, 8});
  at::Tensor y = model::rope(x, cos.view({1, 1, 1, 8}), sin.view({1, 1, 1, 8}));
  for (int j = 0; j < 4; ++j) {
    const double a = angles[j];
    const double x0 = x[0][0][0][2 * j].item<double>(), x1 = x[0][0][0][2 * j + 1].item<double>();
    EXPECT_NEAR(y[0][0][0][2 * j].item<double>(), std::cos(a) * x0 - std::sin(a) * x1, 1e-5);
    EXPECT_NEAR(y[0][0][0][2 * j + 1].item<double>(), std::sin(a) * x0 + std::cos(a) * x1, 1e-5);
  }
}

TEST(TimestepEmbedding, CosineHalfFirst) {
  at::Tensor e = model::timestepEmbedding(at::tensor({500.f}));
  ASSERT_EQ(e.sizes(), (std::vector<int64_t>{1, 256}));
  EXPECT_NEAR(e[0][0].item<float>(), std::cos(500.0), 1e-4);  // k = 0: frequency 1
  EXPECT_NEAR(e[0][128].item<float>(), std::sin(500.0), 1e-4);
  const double f5 = std::exp(-std::log(10000.0) * 5 / 128);
  EXPECT_NEAR(e[0][5].item<float>(), std::cos(500.0 * f5), 1e-4);
}

TEST(LocalAttention, MatchesSoftmaxAndReturnsLogSumExp) {
  at::manual_seed(3);
  at::Tensor q = at::randn({2, 3, 9, 16}), k = at::randn({2, 3, 11, 16}), v = at::randn({2, 3, 11, 16});
  auto r = model::localAttention(q, k, v, true);
  at::Tensor s = at::matmul(q, k.transpose(-2, -1)) / 4.0;
  at::Tensor ref = at::matmul(at::softmax(s, -1), v);
  EXPECT_LT((r.out - ref).abs().max().item<double>(), 1e-5);
  ASSERT_TRUE(r.lse.defined());
  EXPECT_LT((r.lse - at::logsumexp(s, -1)).abs().max().item<double>(), 1e-5);
}

// --attention on the CPU: flash (auto's pick) and the math composition agree on q/k/v laid out as the
// forward lays them out (token-major), with and without the log-sum-exp; the CUDA-only kernels are refused
// with a line naming the flag.
TEST(LocalAttention, CpuKernelsAgreeAndCudaOnlyOnesAreRefused) {
  at::manual_seed(4);
  const auto tokenMajor = [](int64_t s) { return at::randn({2, s, 3, 32}).transpose(1, 2); };  // [B, H, S, D] view
  const at::Tensor q = tokenMajor(13), k = tokenMajor(21), v = tokenMajor(21);
  ASSERT_FALSE(q.is_contiguous());
  EXPECT_EQ(model::resolveAttentionKernel(model::AttentionKernel::kAuto, q, k, v, false),
            model::AttentionKernel::kFlash);
  EXPECT_EQ(model::resolveAttentionKernel(model::AttentionKernel::kMath, q, k, v, false),
            model::AttentionKernel::kMath);
  const at::Tensor s = at::matmul(q, k.transpose(-2, -1)) / std::sqrt(32.0);
  const at::Tensor ref = at::matmul(at::softmax(s, -1), v), refLse = at::logsumexp(s, -1);
  for (auto kernel : {model::AttentionKernel::kAuto, model::AttentionKernel::kFlash, model::AttentionKernel::kMath}) {
    const auto r = model::localAttention(q, k, v, true, kernel);
    EXPECT_LT((r.out - ref).abs().max().item<double>(), 1e-5) << model::attentionKernelName(kernel);
    ASSERT_TRUE(r.lse.defined()) << model::attentionKernelName(kernel);
    EXPECT_LT((r.lse - refLse).abs().max().item<double>(), 1e-5) << model::attentionKernelName(kernel);
    const auto plain = model::localAttention(q, k, v, false, kernel);
    EXPECT_TRUE(at::equal(plain.out, r.out)) << model::attentionKernelName(kernel);
    EXPECT_FALSE(plain.lse.defined()) << model::attentionKernelName(kernel) << ": a log-sum-exp nobody asked for";
  }
  for (auto kernel : {model::AttentionKernel::kEfficient, model::AttentionKernel::kCudnn}) {
    const std::string name = model::attentionKernelName(kernel);
    try {
      (void)model::localAttention(q, k, v, false, kernel);
      ADD_FAILURE() << name << " ran on the CPU";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--attention " + name + " runs on CUDA only"), std::string::npos)
          << e.what();
    }
  }
  EXPECT_THROW(model::checkAttentionKernel(model::AttentionKernel::kFlash, c10::Device(c10::kCUDA, 0), at::kFloat),
               Error);  // flash on CUDA: half types only
  EXPECT_NO_THROW(
      model::checkAttentionKernel(model::AttentionKernel::kCudnn, c10::Device(c10::kCUDA, 0), at::kBFloat16));
}

TEST(FluxConfig, PresetsAreValidAndRulesAreEnforced) {
  for (const auto& name : model::FluxConfig::presetNames()) EXPECT_NO_THROW(model::FluxConfig::preset(name).validate());
  model::FluxConfig c = model::FluxConfig::preset("tiny");
  c.axesDim = {4, 4, 4};
  EXPECT_THROW(c.validate(), Error);
  EXPECT_THROW(model::FluxConfig::preset("huge"), Error);
  // FLUX.1-dev has 780 tensors and 11,901,408,320 parameters.
  size_t tensors = 0;
  int64_t params = 0;
  for (const auto& g : model::fluxWeightGroups(model::FluxConfig::preset("flux-dev")))
    for (const auto& t : g.tensors) {
      ++tensors;
      int64_t n = 1;
      for (auto d : t.shape) n *= d;
      params += n;
    }
  EXPECT_EQ(tensors, 780u);
  EXPECT_EQ(params, 11'901'408'320LL);
}
