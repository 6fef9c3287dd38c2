// The transformer forward against diffusers' FluxTransformer2DModel (fixtures from
// tests/reference/make_fixtures.py): both checkpoint layouts, batch 2, non-square image, with and
// without guidance embeddings, fp32 and bf16.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "pardit/io/safetensors.h"
#include "pardit/pipeline/loading.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;
using pardit::test::maxRelError;

namespace {
struct Case {
  std::string name, model;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.model; }

at::Tensor runForward(const std::string& modelPath, const io::SafetensorsFile& f, at::ScalarType dtype) {
  auto loaded = pipeline::loadFlux(modelPath, dtype, at::kCPU);
  return loaded.transformer->forward(test::fixtureInputs(f, dtype));
}
}  // namespace

class FluxFidelity : public ::testing::TestWithParam<Case> {};

TEST_P(FluxFidelity, Fp32MatchesDiffusers) {
  auto f = io::SafetensorsFile::open(fixture("forward_" + GetParam().name + ".safetensors"));
  at::Tensor out = runForward(fixture(GetParam().model), *f, at::kFloat);
  const double err = maxRelError(out, f->read("sample"));
  RecordProperty("max_rel_error", std::to_string(err));
  std::printf("[fidelity] %s fp32 max relative error %.3e\n", GetParam().model.c_str(), err);
  EXPECT_LE(err, 1e-5);  // measured 0 (bit-exact)
}

TEST_P(FluxFidelity, Bf16MatchesDiffusers) {
  auto f = io::SafetensorsFile::open(fixture("forward_" + GetParam().name + ".safetensors"));
  at::Tensor out = runForward(fixture(GetParam().model), *f, at::kBFloat16);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  const double err = maxRelError(out, f->read("sample_bf16"));
  // Against the fp32 result, to show the bf16 comparison is not vacuous.
  const double errFp32 = maxRelError(out, f->read("sample"));
  std::printf("[fidelity] %s bf16 max relative error %.3e (vs fp32 reference %.3e)\n", GetParam().model.c_str(), err,
              errFp32);
  EXPECT_LE(err, 8e-3);  // below one bf16 ulp; measured 0 (bit-exact) on x86-64 with MKL
}

INSTANTIATE_TEST_SUITE_P(Layouts, FluxFidelity,
                         ::testing::Values(Case{"tiny_dev", "flux_tiny_dev/diffusers"},
                                           Case{"tiny_dev", "flux_tiny_dev/flux1-tiny-dev.safetensors"},
                                           Case{"tiny_schnell", "flux_tiny_schnell/diffusers"},
                                           Case{"tiny_schnell", "flux_tiny_schnell/flux1-tiny-schnell.safetensors"}),
                         [](const auto& info) {
                           std::string n = info.param.model;
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });
