// The CUDA kernels pardit picks (label gpu; each test skips, visibly, without a CUDA device): local
// attention (flash attention for bf16/fp16, memory-efficient attention for fp32) against the math path in
// float64, output and log-sum-exp, and blocks merged by their log-sum-exp as Ring attention merges them;
// FP8 linear layers (FP8 tensor cores on sm_89+, else the dequantized weight) against the dequantized
// product, and FP8 quantization on the device against the CPU's.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/model/attention.h"
#include "pardit/model/flux_config.h"
#include "pardit/model/fp8.h"
#include "pardit/parallel/usp_attention.h"
#include "test_util.h"

using namespace pardit;

namespace {
struct Reference {
  at::Tensor out, lse;  // float64 on the CPU
};
// Softmax attention in float64 on the CPU, from the (already rounded) inputs.
Reference mathAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const at::Tensor qd = q.cpu().to(at::kDouble), kd = k.cpu().to(at::kDouble), vd = v.cpu().to(at::kDouble);
  const at::Tensor scores = at::matmul(qd, kd.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  const at::Tensor lse = at::logsumexp(scores, -1);
  return {at::matmul(at::exp(scores - lse.unsqueeze(-1)), vd), lse};
}
double maxAbs(const at::Tensor& a, const at::Tensor& b) {
  return (a.cpu().to(at::kDouble) - b.cpu().to(at::kDouble)).abs().max().item<double>();
}
}  // namespace

// Query lengths that are not multiples of 32 included: the memory-efficient kernel pads its log-sum-exp
// rows, and only the first Sq may come back.
TEST(CudaAttention, KernelsMatchTheMathPathWithLogSumExp) {
  PARDIT_REQUIRE_CUDA();
  struct Case {
    at::ScalarType dtype;
    double outTol, lseTol;
  };
  for (const Case& c : {Case{at::kBFloat16, 2e-2, 2e-3}, Case{at::kHalf, 4e-3, 2e-3}, Case{at::kFloat, 2e-3, 2e-3}}) {
    for (const auto& [sq, sk] : std::vector<std::pair<int64_t, int64_t>>{{77, 77}, {128, 300}, {40, 1000}}) {
      at::manual_seed(3);
      const auto opts = at::TensorOptions().dtype(c.dtype).device(at::kCUDA);
      const at::Tensor q = at::randn({2, 3, sq, 128}, opts), k = at::randn({2, 3, sk, 128}, opts),
                       v = at::randn({2, 3, sk, 128}, opts);
      const model::AttentionResult r = model::localAttention(q, k, v, /*needLse=*/true);
      const Reference ref = mathAttention(q, k, v);
      ASSERT_EQ(r.out.sizes(), q.sizes());
      ASSERT_EQ(r.out.scalar_type(), c.dtype);
      ASSERT_EQ(r.lse.sizes(), (std::vector<int64_t>{2, 3, sq})) << c.dtype << " Sq " << sq;
      const double outErr = maxAbs(r.out, ref.out), lseErr = maxAbs(r.lse, ref.lse);
      std::printf("[cuda] attention %s Sq %lld Sk %lld: max |out - math| %.2e, max |lse - math| %.2e\n",
                  c10::toString(c.dtype), static_cast<long long>(sq), static_cast<long long>(sk), outErr, lseErr);
      EXPECT_LE(outErr, c.outTol) << c.dtype << " Sq " << sq << " Sk " << sk;
      EXPECT_LE(lseErr, c.lseTol) << c.dtype << " Sq " << sq << " Sk " << sk;
      // Without the log-sum-exp: PyTorch's own pick of kernel, as close to the math path.
      const model::AttentionResult plain = model::localAttention(q, k, v, /*needLse=*/false);
      EXPECT_FALSE(plain.lse.defined());
      EXPECT_LE(maxAbs(plain.out, ref.out), c.outTol) << c.dtype << " Sq " << sq << " Sk " << sk << ", no lse";
    }
  }
}

// --attention: every kernel it names, on q/k/v laid out as the forward lays them out (views of token-major
// [B, S, H, D] memory), with and without the log-sum-exp, against the math path; and auto's reported pick
// is the kernel auto runs (the same bits as naming it).
TEST(CudaAttention, EveryNamedKernelMatchesTheMathPath) {
  PARDIT_REQUIRE_CUDA();
  using model::AttentionKernel;
  const auto opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  at::manual_seed(8);
  const auto tokenMajor = [&](int64_t s) { return at::randn({1, s, 6, 128}, opts).transpose(1, 2); };
  const at::Tensor q = tokenMajor(333), k = tokenMajor(333), v = tokenMajor(333);
  const Reference ref = mathAttention(q, k, v);
  for (AttentionKernel kernel :
       {AttentionKernel::kFlash, AttentionKernel::kEfficient, AttentionKernel::kCudnn, AttentionKernel::kMath}) {
    const char* name = model::attentionKernelName(kernel);
    for (bool lse : {false, true}) {
      const model::AttentionResult r = model::localAttention(q, k, v, lse, kernel);
      ASSERT_EQ(r.out.sizes(), q.sizes()) << name;
      const double outErr = maxAbs(r.out, ref.out);
      std::printf("[cuda] --attention %s%s: max |out - math| %.2e", name, lse ? " with lse" : "", outErr);
      EXPECT_LE(outErr, 2e-2) << name << " lse " << lse;
      ASSERT_EQ(r.lse.defined(), lse) << name;
      if (lse) {
        ASSERT_EQ(r.lse.sizes(), (std::vector<int64_t>{1, 6, 333})) << name;
        const double lseErr = maxAbs(r.lse, ref.lse);
        std::printf(", max |lse - math| %.2e", lseErr);
        EXPECT_LE(lseErr, 2e-3) << name;
      }
      std::printf("\n");
    }
  }
  const AttentionKernel pick = model::resolveAttentionKernel(AttentionKernel::kAuto, q, k, v, false);
  std::printf("[cuda] --attention auto picks %s for bf16 token-major [1, 6, 333, 128]\n",
              model::attentionKernelName(pick));
  EXPECT_NE(pick, AttentionKernel::kAuto);
  if (pick != AttentionKernel::kMath) {
    EXPECT_TRUE(at::equal(model::localAttention(q, k, v, false).out, model::localAttention(q, k, v, false, pick).out))
        << "auto does not run the kernel it reports (" << model::attentionKernelName(pick) << ")";
  }
  // Named kernels that cannot run in a dtype are refused with a line naming the flag.
  try {
    (void)model::localAttention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), false, AttentionKernel::kFlash);
    ADD_FAILURE() << "flash ran in fp32";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--attention flash needs bf16 or fp16"), std::string::npos) << e.what();
  }
}

// Ring attention's step: attention over two key blocks, merged by their log-sum-exp, is attention over the
// whole keys.
TEST(CudaAttention, BlocksMergedByLogSumExpEqualOneBlock) {
  PARDIT_REQUIRE_CUDA();
  const std::vector<std::pair<at::ScalarType, double>> cases = {{at::kBFloat16, 1e-2}, {at::kFloat, 1e-4}};
  for (const auto& [dtype, tol] : cases) {
    at::manual_seed(5);
    const auto opts = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    const at::Tensor q = at::randn({1, 4, 90, 64}, opts), k = at::randn({1, 4, 250, 64}, opts),
                     v = at::randn({1, 4, 250, 64}, opts);
    const auto whole = model::localAttention(q, k, v, true);
    const auto a = model::localAttention(q, k.narrow(2, 0, 100), v.narrow(2, 0, 100), true);
    const auto b = model::localAttention(q, k.narrow(2, 100, 150), v.narrow(2, 100, 150), true);
    at::Tensor out = a.out.to(at::kFloat), lse = a.lse.to(at::kFloat);
    parallel::mergeAttention(out, lse, b.out.to(at::kFloat), b.lse.to(at::kFloat));
    const double outErr = maxAbs(out, whole.out.to(at::kFloat)), lseErr = maxAbs(lse, whole.lse);
    std::printf("[cuda] two blocks merged, %s: max |out - one block| %.2e, max |lse - one block| %.2e\n",
                c10::toString(dtype), outErr, lseErr);
    EXPECT_LE(outErr, tol) << dtype;
    EXPECT_LE(lseErr, 1e-4) << dtype;
  }
}

// FP8 weights on CUDA: with FP8 tensor cores (sm_89+, bf16 activations quantized per token) within the
// activations' quantization error of the dequantized product, and each token's result its own (a split of
// the tokens computes the same rows); without them, the dequantized product itself.
TEST(CudaFp8, LinearMatchesTheDequantizedProduct) {
  PARDIT_REQUIRE_CUDA();
  at::manual_seed(7);
  const at::Tensor w = at::randn({192, 256}) * 0.05, bias = at::randn({192}) * 0.1;
  const model::Fp8Rows rows = model::quantizeFp8Rows(w);
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const at::Tensor values = rows.values.to(at::kCUDA), scale = rows.scale.to(at::kCUDA);
  const at::Tensor x = at::randn({77, 256}, cuda.dtype(at::kBFloat16));
  const at::Tensor y = model::fp8Linear(x, values, scale, bias.to(cuda.dtype(at::kBFloat16)));
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{77, 192}));
  ASSERT_EQ(y.scalar_type(), at::kBFloat16);
  const at::Tensor wd = model::dequantizeFp8Rows(rows.values, rows.scale, at::kFloat).to(at::kDouble);
  const at::Tensor ref = at::matmul(x.cpu().to(at::kDouble), wd.t()) + bias.to(at::kBFloat16).to(at::kDouble);
  const double relL2 = (y.cpu().to(at::kDouble) - ref).norm().item<double>() / ref.norm().item<double>();
  const bool tensorCores = model::fp8TensorCoresUsable(x, values);
  std::printf("[cuda] fp8 linear (%s): relative L2 error %.2e against the dequantized product\n",
              tensorCores ? "FP8 tensor cores" : "dequantized", relL2);
  EXPECT_LE(relL2, tensorCores ? 6e-2 : 8e-3);
  const at::Tensor part = model::fp8Linear(x.narrow(0, 0, 40), values, scale, bias.to(cuda.dtype(at::kBFloat16)));
  EXPECT_LE(test::maxRelError(part.to(at::kFloat), y.narrow(0, 0, 40).to(at::kFloat)), 1e-2)
      << "a token's result depends on that token alone";
}

// A weight quantized while loading is quantized on the GPU it is loaded onto (a fraction of the CPU's time
// for a 12B-parameter model): the same FP8 values and scales as on the CPU, bit for bit.
TEST(CudaFp8, QuantizingOnTheDeviceGivesTheCpuBits) {
  PARDIT_REQUIRE_CUDA();
  const io::FluxCheckpoint ck = io::FluxCheckpoint::open(test::fixture("flux_tiny_dev/diffusers"));
  int checked = 0;
  for (const auto& g : model::fluxWeightGroups(ck.config()))
    for (const auto& t : g.tensors) {
      if (!model::fluxFp8Eligible(t.name)) continue;
      const model::Fp8Rows cpu = ck.loadFp8(t.name), gpu = ck.loadFp8(t.name, at::Device(at::kCUDA, 0));
      ASSERT_TRUE(gpu.values.is_cuda() && gpu.scale.is_cuda()) << t.name;
      EXPECT_TRUE(at::equal(gpu.values.cpu().view(at::kByte), cpu.values.view(at::kByte))) << t.name;
      EXPECT_TRUE(at::equal(gpu.scale.cpu(), cpu.scale)) << t.name;
      ++checked;
    }
  EXPECT_GT(checked, 10);
}
