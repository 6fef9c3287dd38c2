// CLIPTextModel and T5EncoderModel against transformers on the tiny pipeline's random encoders
// (fixtures from tests/reference/make_text_fixtures.py), and the tiny tokenizers on both file forms.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/model/text_encoders.h"
#include "pardit/text/clip_tokenizer.h"
#include "pardit/text/t5_tokenizer.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;

namespace {
std::shared_ptr<io::SafetensorsFile> textFixture() {
  return io::SafetensorsFile::open(fixture("text_tiny.safetensors"));
}
int promptCount(const io::SafetensorsFile& f) {
  return static_cast<int>(nlohmann::json::parse(f.metadata().at("prompts")).size());
}
}  // namespace

TEST(TextEncoders, ClipPooledOutputMatchesTransformers) {
  auto f = textFixture();
  const auto ck = io::ClipTextCheckpoint::open(fixture("flux_tiny_pipeline"));
  EXPECT_EQ(ck.config.numLayers, 2);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    model::ClipTextModel clip(ck.config, ck.store.getter(dtype));
    double worst = 0;
    for (int i = 0; i < promptCount(*f); ++i) {
      const std::string s = std::to_string(i);
      const at::Tensor out = clip.pooled(f->read("clip_ids." + s)).to(at::kFloat);
      worst = std::max(
          worst, test::maxRelError(
                     out, f->read(std::string(dtype == at::kFloat ? "clip_pooled_fp32." : "clip_pooled_bf16.") + s)));
    }
    std::printf("[fidelity] CLIP pooled %s: max relative error %.3e\n", dtype == at::kFloat ? "fp32" : "bf16", worst);
    EXPECT_LE(worst, dtype == at::kFloat ? 1e-5 : 2e-2);
  }
}

TEST(TextEncoders, T5HiddenStatesMatchTransformers) {
  auto f = textFixture();
  const auto ck = io::T5Checkpoint::open(fixture("flux_tiny_pipeline"));
  EXPECT_EQ(ck.config.numHeads, 4);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    model::T5Encoder t5(ck.config, ck.store.getter(dtype));
    double worst = 0;
    for (int i = 0; i < promptCount(*f); ++i) {
      const std::string s = std::to_string(i);
      const at::Tensor out = t5.forward(f->read("t5_ids." + s)).to(at::kFloat);
      worst = std::max(worst,
                       test::maxRelError(
                           out, f->read(std::string(dtype == at::kFloat ? "t5_hidden_fp32." : "t5_hidden_bf16.") + s)));
    }
    std::printf("[fidelity] T5 hidden states %s: max relative error %.3e\n", dtype == at::kFloat ? "fp32" : "bf16",
                worst);
    EXPECT_LE(worst, dtype == at::kFloat ? 1e-5 : 3e-2);
  }
  // Relative position buckets of transformers' _relative_position_bucket (bidirectional, 32 buckets, 128).
  const at::Tensor b = model::t5RelativeBuckets(200, 32, 128);
  EXPECT_EQ(b[0][0].item<int64_t>(), 0);
  EXPECT_EQ(b[0][1].item<int64_t>(), 17);  // key after query: the upper half
  EXPECT_EQ(b[1][0].item<int64_t>(), 1);
  EXPECT_EQ(b[0][7].item<int64_t>(), 23);    // exact below 8
  EXPECT_EQ(b[0][8].item<int64_t>(), 24);    // 8 + floor(log(8/8)/log(16)*8) = 8
  EXPECT_EQ(b[0][199].item<int64_t>(), 31);  // capped at the last bucket
}

TEST(TextEncoders, TinyTokenizersOnBothFileForms) {
  auto f = textFixture();
  const auto expect = nlohmann::json::parse(f->metadata().at("tiny_tokenizer_ids"));
  const auto clip = text::ClipTokenizer::open(fixture("flux_tiny_pipeline/tokenizer"));  // tokenizer.json only
  const auto t5json = text::T5Tokenizer::fromTokenizerJson(fixture("flux_tiny_pipeline/tokenizer_2/tokenizer.json"));
  const auto t5spm = text::T5Tokenizer::fromSentencePiece(fixture("flux_tiny_pipeline/tokenizer_2/spiece.model"));
  size_t clipSame = 0, jsonSame = 0, spmSame = 0;
  const auto& texts = expect["texts"];
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string t = texts[i];
    std::vector<int64_t> c = clip.encode(t);
    c.insert(c.begin(), clip.bosId());
    c.push_back(clip.eosId());
    clipSame += c == expect["clip"][i].get<std::vector<int64_t>>();
    auto a = t5json.encode(t), b = t5spm.encode(t);
    a.push_back(1);
    b.push_back(1);
    jsonSame += a == expect["t5"][i].get<std::vector<int64_t>>();
    spmSame += b == expect["t5"][i].get<std::vector<int64_t>>();
  }
  std::printf("[tokenizer] tiny: CLIP %zu, T5 tokenizer.json %zu, T5 spiece.model %zu of %zu prompts\n", clipSame,
              jsonSame, spmSame, texts.size());
  EXPECT_EQ(clipSame, texts.size());
  EXPECT_EQ(jsonSame, texts.size());
  EXPECT_EQ(spmSame, texts.size());
}

// Single files as ComfyUI and stable-diffusion.cpp users keep them: t5xxl_fp8_e4m3fn.safetensors holds
// float8 (e4m3) weights, upcast to the compute dtype as they load; clip_l.safetensors carries the
// "text_model." prefix. Both give the encoders of the same weights.
TEST(TextEncoders, SingleFilesIncludingFloat8T5) {
  test::TempDir dir;
  const auto t5 = io::T5Checkpoint::open(fixture("flux_tiny_pipeline"));
  std::map<std::string, at::Tensor> fp8, f32;
  for (const auto& t : model::t5EncoderTensors(t5.config)) {
    fp8[t.name] = t5.store.load(t.name, at::kFloat).to(at::kFloat8_e4m3fn);
    f32[t.name] = fp8[t.name].to(at::kFloat);  // what the fp8 file holds, in fp32
  }
  io::writeSafetensors(dir.file("t5xxl_fp8_e4m3fn.safetensors"), fp8);
  const auto single = io::T5Checkpoint::open(dir.file("t5xxl_fp8_e4m3fn.safetensors"));
  EXPECT_EQ(single.config.describe(), t5.config.describe());
  EXPECT_EQ(single.store.info("shared.weight").dtype, "F8_E4M3");
  const at::Tensor ids = textFixture()->read("t5_ids.0");
  const at::Tensor fromFile = model::T5Encoder(single.config, single.store.getter(at::kFloat)).forward(ids);
  const at::Tensor expected = model::T5Encoder(t5.config, [&](const std::string& n) { return f32.at(n); }).forward(ids);
  EXPECT_TRUE(at::equal(fromFile, expected));
  // The fp8 weights are close to the originals: the encoder output moves by float8's rounding only.
  const at::Tensor original = model::T5Encoder(t5.config, t5.store.getter(at::kFloat)).forward(ids);
  std::printf("[fidelity] T5 from float8 e4m3 weights: max relative error %.3e against the fp32 weights\n",
              test::maxRelError(fromFile, original));
  EXPECT_LE(test::maxRelError(fromFile, original), 0.25);

  const auto clip = io::ClipTextCheckpoint::open(fixture("flux_tiny_pipeline"));
  std::map<std::string, at::Tensor> prefixed;
  for (const auto& t : model::clipTextTensors(clip.config))
    prefixed["text_model." + t.name] = clip.store.load(t.name, at::kFloat);
  io::writeSafetensors(dir.file("clip_l.safetensors"), prefixed,
                       {{"num_attention_heads", std::to_string(clip.config.numHeads)}});
  const auto clipFile = io::ClipTextCheckpoint::open(dir.file("clip_l.safetensors"));
  EXPECT_EQ(clipFile.config.describe(), clip.config.describe());
  const at::Tensor cids = textFixture()->read("clip_ids.0");
  EXPECT_TRUE(at::equal(model::ClipTextModel(clipFile.config, clipFile.store.getter(at::kFloat)).pooled(cids),
                        model::ClipTextModel(clip.config, clip.store.getter(at::kFloat)).pooled(cids)));
}
