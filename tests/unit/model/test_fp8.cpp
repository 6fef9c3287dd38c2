// FP8 weights (model/fp8.h): the quantizer against torch, the transformer forward with FP8 rows against
// diffusers with the same dequantized weights, the FP8 single-file conventions users have, the
// quantize -> write -> load round trip, FP8 T5, and the error against bf16 on the small preset.
// Fixtures from tests/reference/make_fp8_fixtures.py.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/quantize.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/synth.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/model/fp8.h"
#include "pardit/model/text_encoders.h"
#include "pardit/pipeline/denoise.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "pardit/pipeline/scheduler.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;
using pardit::test::maxRelError;

namespace {

std::shared_ptr<io::SafetensorsFile> reference() {
  static auto f = io::SafetensorsFile::open(fixture("fp8_reference.safetensors"));
  return f;
}

bool sameBits(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         at::equal(a.contiguous().view(at::kByte), b.contiguous().view(at::kByte));
}

double relL2(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm()).item<double>();
}

at::Tensor forward(const std::string& model, at::ScalarType dtype, model::WeightFormat format,
                   const std::string& inputs) {
  auto loaded = pipeline::loadFlux(fixture(model), dtype, at::kCPU, nullptr, format);
  return loaded.transformer->forward(test::fixtureInputs(*io::SafetensorsFile::open(fixture(inputs)), dtype));
}

}  // namespace

// pardit's row quantizer gives torch's values and scales bit for bit (a block weight, and rows that are
// zero, subnormal-small, mixed in magnitude, negative at the maximum), within e4m3's rounding of w.
TEST(Fp8, QuantizerMatchesTorch) {
  for (int i = 0; i < 2; ++i) {
    const std::string p = "quant." + std::to_string(i) + ".";
    const at::Tensor w = reference()->read(p + "weight");
    const model::Fp8Rows q = model::quantizeFp8Rows(w);
    EXPECT_TRUE(sameBits(q.values, reference()->read(p + "values"))) << p;
    EXPECT_TRUE(sameBits(q.scale, reference()->read(p + "scale"))) << p;
    // |w - values * scale| <= half an e4m3 step: 2^-4 relative for normals, 2^-10 * scale below (subnormals).
    const at::Tensor deq = model::dequantizeFp8Rows(q.values, q.scale, at::kFloat);
    const at::Tensor bound = at::maximum(w.abs() * 0.0625, q.scale.unsqueeze(1) * (1.0 / 1024)) * (1 + 1e-6);
    EXPECT_TRUE(((deq - w).abs() <= bound).all().item<bool>()) << p;
    EXPECT_EQ(q.values.scalar_type(), at::kFloat8_e4m3fn);
    EXPECT_LE(q.values.to(at::kFloat).abs().max().item<float>(), 448.0f);
  }
  const at::Tensor zeroRowScale = model::quantizeFp8Rows(reference()->read("quant.1.weight")).scale[1];
  EXPECT_EQ(zeroRowScale.item<float>(), 1.0f);
  EXPECT_THROW(model::quantizeFp8Rows(at::full({2, 2}, INFINITY)), Error);
}

// The CPU dequantizer (a table per code) rounds as ATen's float8 -> float32 -> product -> dtype does, for
// every code (NaN included) and scales across the range, in each compute dtype.
// A weight larger than one block of rows (2^24 elements) is quantized block by block: the same bits as one
// pass over all its rows.
TEST(Fp8, LargeWeightsQuantizeInBlocksWithTheSameBits) {
  at::manual_seed(21);
  const at::Tensor w = (at::randn({4500, 4000}) * at::rand({4500, 1})).to(at::kBFloat16);
  const model::Fp8Rows q = model::quantizeFp8Rows(w);
  const at::Tensor f = w.to(at::kFloat), amax = f.abs().amax(1);
  const at::Tensor scale = at::where(amax > 0, amax / 448.0, at::ones_like(amax));
  const at::Tensor values = (f / scale.unsqueeze(1)).clamp(-448.0, 448.0).to(at::kFloat8_e4m3fn);
  EXPECT_TRUE(at::equal(q.scale, scale));
  EXPECT_TRUE(at::equal(q.values.view(at::kByte), values.view(at::kByte)));
}

TEST(Fp8, DequantizerMatchesATen) {
  const at::Tensor codes = at::arange(256, at::kInt).to(at::kByte).repeat({5, 3}).view(at::kFloat8_e4m3fn);  // [5, 768]
  const at::Tensor scale = at::tensor({1.0f, 3.1e-3f, 7.7f, 1e-30f, 2.5e30f});
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const at::Tensor fast = model::dequantizeFp8Rows(codes, scale, dtype);
    const at::Tensor slow = (codes.to(at::kFloat) * scale.unsqueeze(1)).to(dtype);
    const at::Tensor differ = (fast.to(at::kFloat) != slow.to(at::kFloat)) & ~(fast.isnan() & slow.isnan());
    EXPECT_TRUE(sameBits(fast.masked_fill(fast.isnan(), 0), slow.masked_fill(slow.isnan(), 0)))
        << c10::toString(dtype) << ": " << differ.sum().item<int64_t>() << " values differ";
    EXPECT_TRUE(at::equal(fast.isnan(), slow.isnan())) << c10::toString(dtype);
  }
}

// The transformer with FP8 block weights computes what diffusers computes with the same dequantized
// weights (both layouts: per-row scales commute with the q|k|v and linear1 fusions), in fp32 and bf16.
TEST(Fp8, ForwardMatchesDiffusersWithTheSameFp8Weights) {
  const at::Tensor dense = io::SafetensorsFile::open(fixture("forward_tiny_dev.safetensors"))->read("sample");
  for (const std::string model : {"flux_tiny_dev/diffusers", "flux_tiny_dev/flux1-tiny-dev.safetensors"}) {
    const at::Tensor out = forward(model, at::kFloat, model::WeightFormat::kFp8, "forward_tiny_dev.safetensors");
    const double err = maxRelError(out, reference()->read("rowwise_fp32"));
    const at::Tensor outBf16 = forward(model, at::kBFloat16, model::WeightFormat::kFp8, "forward_tiny_dev.safetensors");
    const double errBf16 = maxRelError(outBf16, reference()->read("rowwise_bf16"));
    const double vsDense = relL2(out, dense);
    std::printf(
        "[fp8] %s: fp32 max relative error %.3e, bf16 %.3e against diffusers with FP8 weights; "
        "relative L2 %.3e against the dense weights\n",
        model.c_str(), err, errBf16, vsDense);
    EXPECT_LE(err, 1e-5);
    EXPECT_LE(errBf16, 8e-3);
    EXPECT_GT(vsDense, 1e-4) << "FP8 weights must change the result (else the FP8 path did not run)";
  }
}

// The FP8 single files users keep: plain float8 casts, and ComfyUI's scaled fp8 (one scale per tensor,
// a "scaled_fp8" marker, input scales). Both load as FP8 (auto), nothing is reported unused, and the
// forward is diffusers' with the weights their convention defines, whether kept in FP8 or dequantized.
TEST(Fp8, SingleFileConventionsLoad) {
  for (const std::string kind : {"plain", "scaled"}) {
    const std::string file = kind == "plain" ? "fp8_conventions/flux1-tiny-schnell-fp8.safetensors"
                                             : "fp8_conventions/flux1-tiny-schnell-fp8-scaled.safetensors";
    const auto ck = io::FluxCheckpoint::open(fixture(file));
    EXPECT_EQ(ck.storedFormat(), model::WeightFormat::kFp8) << kind;
    EXPECT_TRUE(ck.findings().empty()) << kind << ": " << (ck.findings().empty() ? "" : ck.findings()[0]);
    const auto format = pipeline::resolveWeightFormat(pipeline::WeightDtype::kAuto, &ck);
    EXPECT_EQ(format, model::WeightFormat::kFp8);
    const at::Tensor expected = reference()->read(kind + "_fp32");
    const at::Tensor fp8 = forward(file, at::kFloat, format, "forward_tiny_schnell.safetensors");
    const at::Tensor dense = forward(file, at::kFloat, model::WeightFormat::kDense, "forward_tiny_schnell.safetensors");
    std::printf("[fp8] %s fp8 file: max relative error %.3e (FP8 kept), %.3e (dequantized on loading)\n", kind.c_str(),
                maxRelError(fp8, expected), maxRelError(dense, expected));
    EXPECT_LE(maxRelError(fp8, expected), 1e-5) << kind;
    EXPECT_LE(maxRelError(dense, expected), 1e-5) << kind;
  }
  // The two conventions differ (the scaled one keeps more precision): the scales were applied.
  EXPECT_GT(relL2(reference()->read("plain_fp32"), reference()->read("scaled_fp32")), 1e-6);
}

// quantize -> write -> load: the FP8 checkpoint holds exactly what quantizing while loading gives, in
// both layouts (and the two layouts agree); every other tensor is copied; the forward is bit-identical.
TEST(Fp8, QuantizeRoundTripIsExact) {
  test::TempDir dir;
  std::map<std::string, model::Fp8Rows> first;
  for (const std::string model : {"flux_tiny_dev/diffusers", "flux_tiny_dev/flux1-tiny-dev.safetensors"}) {
    const std::string out = dir.file(model.find("diffusers") != std::string::npos ? "d" : "b");
    const io::QuantizeResult r = io::quantizeCheckpoint(fixture(model), out);
    EXPECT_EQ(r.weightsQuantized, model.find("diffusers") != std::string::npos ? 2 * 14 + 2 * 6 : 2 * 10 + 2 * 3);
    EXPECT_LT(r.bytesOut, r.bytesIn / 2);
    const auto in = io::FluxCheckpoint::open(fixture(model));
    const auto q = io::FluxCheckpoint::open(r.modelPath);
    EXPECT_EQ(q.storedFormat(), model::WeightFormat::kFp8);
    EXPECT_TRUE(q.findings().empty()) << q.findings().front();
    for (const auto& g : model::fluxWeightGroups(in.config()))
      for (const auto& t : g.tensors) {
        if (model::fluxFp8Eligible(t.name)) {
          const model::Fp8Rows a = in.loadFp8(t.name), b = q.loadFp8(t.name);
          EXPECT_TRUE(q.storedFp8(t.name)) << t.name;
          EXPECT_TRUE(sameBits(a.values, b.values) && sameBits(a.scale, b.scale)) << model << " " << t.name;
          if (first.count(t.name)) {
            EXPECT_TRUE(sameBits(first[t.name].values, b.values)) << "layouts differ: " << t.name;
          } else {
            first[t.name] = b;
          }
        } else {
          EXPECT_TRUE(sameBits(in.load(t.name, at::kFloat), q.load(t.name, at::kFloat))) << t.name;
        }
      }
    const at::Tensor onLoad = forward(model, at::kFloat, model::WeightFormat::kFp8, "forward_tiny_dev.safetensors");
    const at::Tensor fromFile =
        pipeline::loadFlux(r.modelPath, at::kFloat, at::kCPU, nullptr, q.storedFormat())
            .transformer->forward(
                test::fixtureInputs(*io::SafetensorsFile::open(fixture("forward_tiny_dev.safetensors")), at::kFloat));
    EXPECT_TRUE(at::equal(onLoad, fromFile)) << model;
  }
  // An FP8 checkpoint is not quantized again, and the output never replaces the input.
  try {
    io::quantizeCheckpoint(dir.file("b"), dir.file("again"));
    ADD_FAILURE() << "quantizing an FP8 checkpoint must fail";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("already an FP8 checkpoint"), std::string::npos) << e.message();
  }
  EXPECT_THROW(io::quantizeCheckpoint(dir.file("d"), dir.file("d")), Error);
}

// A pipeline folder quantizes whole: the transformer and T5 in FP8, everything else linked; T5 runs from
// FP8 as it runs from the dense weights it was quantized from, within FP8's rounding.
TEST(Fp8, PipelineFolderWithT5) {
  test::TempDir dir;
  const io::QuantizeResult r = io::quantizeCheckpoint(fixture("flux_tiny_pipeline"), dir.file("q"));
  EXPECT_TRUE(r.t5Quantized);
  EXPECT_FALSE(r.linked.empty());
  const auto dense = io::T5Checkpoint::open(fixture("flux_tiny_pipeline"));
  const auto fp8 = io::T5Checkpoint::open(dir.file("q"));
  EXPECT_EQ(dense.storedFormat(), model::WeightFormat::kDense);
  EXPECT_EQ(fp8.storedFormat(), model::WeightFormat::kFp8);
  auto text = io::SafetensorsFile::open(fixture("text_tiny.safetensors"));
  const at::Tensor ids = text->read("t5_ids.0");
  auto getterOf = [](const io::T5Checkpoint& ck, model::WeightFormat f) {
    const io::TensorStore* s = &ck.store;
    return pipeline::getterOf(
        pipeline::formatReader(
            f, [s](const std::string& n, c10::ScalarType t, c10::Device d) { return s->load(n, t, d); },
            [s](const std::string& n, c10::Device d) { return s->loadFp8(n, d); }, model::t5Fp8Eligible),
        at::kFloat);
  };
  const at::Tensor ref = model::T5Encoder(dense.config, getterOf(dense, model::WeightFormat::kDense)).forward(ids);
  const at::Tensor onLoad = model::T5Encoder(dense.config, getterOf(dense, model::WeightFormat::kFp8)).forward(ids);
  const at::Tensor fromFile = model::T5Encoder(fp8.config, getterOf(fp8, model::WeightFormat::kFp8)).forward(ids);
  const at::Tensor dequantized = model::T5Encoder(fp8.config, getterOf(fp8, model::WeightFormat::kDense)).forward(ids);
  EXPECT_TRUE(at::equal(onLoad, fromFile));
  EXPECT_TRUE(at::equal(fromFile, dequantized));  // FP8 on the CPU is the GEMM of the dequantized weight
  const double err = relL2(fromFile, ref);
  std::printf("[fp8] tiny T5 with FP8 layer weights: relative L2 %.3e against the dense weights\n", err);
  EXPECT_GT(err, 1e-5);
  EXPECT_LT(err, 0.1);
}

// FP8 against bf16 on the small preset (random weights): the relative L2 error of one forward and of 4-step
// latents against the fp32 weights, next to bf16's own. FP8 e4m3 keeps 3 mantissa bits to bf16's 7.
TEST(Fp8, SmallPresetErrorAgainstBf16) {
  const model::FluxConfig c = model::FluxConfig::preset("small");
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& g : model::fluxWeightGroups(c))
    for (const auto& t : g.tensors) shapes[t.name] = t.shape;
  const pipeline::TensorReader dense = [shapes](const std::string& n, c10::ScalarType t, c10::Device d) {
    return io::synthTensor(0, n, shapes.at(n)).to(t).to(d);
  };
  const pipeline::TensorReader fp8 =
      pipeline::formatReader(model::WeightFormat::kFp8, dense, [shapes](const std::string& n, c10::Device) {
        return model::quantizeFp8Rows(io::synthTensor(0, n, shapes.at(n)));
      });
  const pipeline::LatentGeometry geom{128, 128, 16};
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const pipeline::PromptEmbeddings prompt{at::randn({1, 32, c.contextInDim}, gen), at::randn({1, c.vecInDim}, gen)};
  auto run = [&](const pipeline::TensorReader& read, at::ScalarType dtype) {
    auto w = std::make_shared<model::ResidentFluxWeights>(c, pipeline::getterOf(read, dtype));
    auto t = std::make_shared<model::FluxTransformer>(c, w, std::make_shared<model::LocalAttention>());
    model::FluxInputs in;
    in.img = pipeline::initialNoise(2, 1, geom, at::kFloat).to(dtype);
    in.txt = prompt.promptEmbeds.to(dtype);
    in.pooled = prompt.pooled.to(dtype);
    in.timestep = at::tensor({0.6f});
    in.guidance = at::tensor({3.5f});
    in.imgIds = pipeline::imageIds(geom);
    in.txtIds = pipeline::textIds(32);
    const at::Tensor once = t->forward(in).to(at::kFloat);
    const pipeline::PromptEmbeddings p{prompt.promptEmbeds.to(dtype), prompt.pooled.to(dtype)};
    auto d =
        pipeline::TransformerDenoiser::local(pipeline::localTransformer(t), pipeline::imageIds(geom), p, std::nullopt);
    pipeline::FlowMatchEulerScheduler s(pipeline::SchedulerConfig::dev(), 4, geom.tokens());
    const at::Tensor noise = pipeline::initialNoise(1, 1, geom, at::kFloat).to(dtype);  // the same noise for all
    const at::Tensor latents = pipeline::denoise(*d, noise, s, {true, 3.5, 1.0});
    return std::make_pair(once, latents.to(at::kFloat));
  };
  const auto ref = run(dense, at::kFloat);
  const auto bf16 = run(dense, at::kBFloat16);
  const auto f8 = run(fp8, at::kFloat);
  const auto f8bf16 = run(fp8, at::kBFloat16);
  // FP8's own error (fp32 activations, against fp32 weights) and FP8 against bf16 as GPUs run it (bf16
  // activations both: the weights' rounding is the only difference).
  const double fwdFp8 = relL2(f8.first, ref.first), latFp8 = relL2(f8.second, ref.second);
  const double fwdVsBf16 = relL2(f8bf16.first, bf16.first), latVsBf16 = relL2(f8bf16.second, bf16.second);
  std::printf(
      "[fp8] small preset, relative L2: FP8 weights against fp32 weights (fp32 activations): forward %.3e, "
      "4-step latents %.3e; FP8 against bf16 weights (bf16 activations): forward %.3e, 4-step latents %.3e; "
      "bf16 itself against fp32: forward %.3e, latents %.3e\n",
      fwdFp8, latFp8, fwdVsBf16, latVsBf16, relL2(bf16.first, ref.first), relL2(bf16.second, ref.second));
  EXPECT_LT(fwdFp8, 0.02);
  EXPECT_LT(latFp8, 0.02);
  EXPECT_LT(fwdVsBf16, 0.02);
  EXPECT_LT(latVsBf16, 0.02);
  EXPECT_GT(fwdFp8, 1e-4);  // FP8 did run
}
