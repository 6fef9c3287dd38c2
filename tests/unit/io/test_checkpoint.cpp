#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/synth.h"
#include "test_util.h"

using namespace pardit;
using pardit::test::fixture;
using pardit::test::TempDir;

namespace {
std::string openError(const std::string& path) {
  try {
    io::FluxCheckpoint::open(path);
  } catch (const Error& e) {
    return e.message();
  }
  return "";
}
}  // namespace

TEST(Checkpoint, DiffusersAndBflLayoutsOfTheSameModelAgreeTensorForTensor) {
  for (const std::string name : {"tiny_dev", "tiny_schnell"}) {
    auto d = io::FluxCheckpoint::open(fixture("flux_" + name + "/diffusers"));
    std::string bflName = "flux1-" + name + ".safetensors";
    std::replace(bflName.begin(), bflName.end(), '_', '-');
    auto b = io::FluxCheckpoint::open(fixture("flux_" + name + "/" + bflName));
    EXPECT_EQ(d.layout(), io::CheckpointLayout::kDiffusers);
    EXPECT_EQ(b.layout(), io::CheckpointLayout::kBfl);
    EXPECT_EQ(d.config().describe(), b.config().describe());
    for (const auto& g : model::fluxWeightGroups(d.config()))
      for (const auto& t : g.tensors)
        EXPECT_TRUE(at::equal(d.load(t.name, at::kFloat), b.load(t.name, at::kFloat))) << name << " " << t.name;
  }
}

TEST(Checkpoint, InfersConfigFromDiffusersJsonAndFromBflShapes) {
  auto dev = io::FluxCheckpoint::open(fixture("flux_tiny_dev/flux1-tiny-dev.safetensors"));
  EXPECT_EQ(dev.config().hiddenSize, 64);
  EXPECT_EQ(dev.config().numHeads, 4);
  EXPECT_EQ(dev.config().depth, 2);
  EXPECT_EQ(dev.config().depthSingle, 2);
  EXPECT_EQ(dev.config().contextInDim, 32);
  EXPECT_TRUE(dev.config().guidanceEmbed);
  EXPECT_EQ(dev.config().axesDim, (std::vector<int64_t>{4, 4, 8}));
  auto schnell = io::FluxCheckpoint::open(fixture("flux_tiny_schnell/diffusers"));
  EXPECT_FALSE(schnell.config().guidanceEmbed);
  EXPECT_EQ(schnell.config().numHeads, 2);
  EXPECT_GT(schnell.files().size(), 1u);  // sharded with an index
}

TEST(Checkpoint, FinalLayerHalvesAreSwappedForDiffusers) {
  model::FluxConfig c = model::FluxConfig::preset("tiny");
  auto pieces = io::diffusersSourcesOf("final_layer.adaLN_modulation.1.weight", c);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].name, "norm_out.linear.weight");
  EXPECT_EQ(pieces[0].rowBegin, c.hiddenSize);  // shift comes from diffusers' second half
  EXPECT_EQ(pieces[1].rowBegin, 0);
  auto qkv = io::diffusersSourcesOf("double_blocks.1.txt_attn.qkv.bias", c);
  ASSERT_EQ(qkv.size(), 3u);
  EXPECT_EQ(qkv[2].name, "transformer_blocks.1.attn.add_v_proj.bias");
}

TEST(Checkpoint, LoadingOneTensorReadsOnlyItsBytes) {
  auto ck = io::FluxCheckpoint::open(fixture("flux_tiny_schnell/diffusers"));
  EXPECT_EQ(ck.bytesRead(), 0u);
  ck.load("single_blocks.0.linear1.weight", at::kFloat);
  EXPECT_EQ(ck.bytesRead(), ck.source("single_blocks.0.linear1.weight").nbytes());
  EXPECT_EQ(ck.source("single_blocks.0.linear1.weight").nbytes(), (3u * 32 + 128) * 32 * 4);
}

TEST(Checkpoint, SynthLayoutsLoadToIdenticalModels) {
  TempDir dir;
  io::SynthOptions o;
  o.config = model::FluxConfig::preset("tiny");
  o.presetName = "tiny";
  o.seed = 5;
  o.outDir = dir.file("d");
  o.shardSize = 300'000;  // forces several shards and an index
  auto rd = io::synthesizeCheckpoint(o);
  EXPECT_GT(rd.files, 1);
  o.layout = io::CheckpointLayout::kBfl;
  o.outDir = dir.file("b");
  auto rb = io::synthesizeCheckpoint(o);
  auto d = io::FluxCheckpoint::open(rd.modelPath);
  auto b = io::FluxCheckpoint::open(rb.modelPath);
  EXPECT_EQ(d.config().describe(), o.config.describe());
  EXPECT_EQ(b.config().describe(), o.config.describe());
  EXPECT_EQ(d.totalBytes(), b.totalBytes());
  for (const auto& g : model::fluxWeightGroups(o.config))
    for (const auto& t : g.tensors) {
      at::Tensor expect = io::synthTensor(5, t.name, t.shape);
      EXPECT_TRUE(at::equal(d.load(t.name, at::kFloat), expect)) << t.name;
      EXPECT_TRUE(at::equal(b.load(t.name, at::kFloat), expect)) << t.name;
    }
}

TEST(Checkpoint, FluxDevShapesWithZeroFillAreInstantAndExact) {
  TempDir dir;
  io::SynthOptions o;
  o.config = model::FluxConfig::preset("flux-dev");
  o.presetName = "flux-dev";
  o.dtype = at::kBFloat16;
  o.zeros = true;
  o.outDir = dir.file("dev");
  o.textLen = 4;
  auto r = io::synthesizeCheckpoint(o);
  EXPECT_EQ(r.tensorBytes, 23'802'816'640ULL);  // the real FLUX.1-dev transformer
  EXPECT_EQ(r.files, 3);
  auto ck = io::FluxCheckpoint::open(r.modelPath);
  EXPECT_EQ(ck.totalBytes(), 23'802'816'640ULL);
  EXPECT_EQ(ck.config().describe(), o.config.describe());
  EXPECT_EQ(ck.storedDtype(), at::kBFloat16);
  size_t count = 0;
  for (const auto& f : ck.files()) count += f->tensors().size();
  EXPECT_EQ(count, 1160u);  // diffusers tensor count of FLUX.1-dev
}

TEST(Checkpoint, ErrorsNameTheFileAndTheTensor) {
  TempDir dir;
  // A directory without a model.
  std::filesystem::create_directories(dir.file("empty"));
  EXPECT_NE(openError(dir.file("empty")).find("no FLUX transformer found"), std::string::npos);
  EXPECT_NE(openError(dir.file("missing")).find("no such file"), std::string::npos);

  // A BFL file missing a tensor, and one with a wrong shape.
  auto src = io::SafetensorsFile::open(fixture("flux_tiny_dev/flux1-tiny-dev.safetensors"));
  std::map<std::string, at::Tensor> all;
  for (const auto& t : src->tensors()) all[t.name] = src->read(t.name);
  auto dropped = all;
  dropped.erase("single_blocks.1.linear2.bias");
  io::writeSafetensors(dir.file("dropped.safetensors"), dropped, {{"axes_dims_rope", "4,4,8"}});
  std::string msg = openError(dir.file("dropped.safetensors"));
  EXPECT_NE(msg.find("single_blocks.1.linear2.bias' not found"), std::string::npos) << msg;
  EXPECT_NE(msg.find("dropped.safetensors"), std::string::npos) << msg;

  auto reshaped = all;
  reshaped["double_blocks.0.txt_mlp.2.weight"] = at::zeros({64, 100});
  io::writeSafetensors(dir.file("shape.safetensors"), reshaped, {{"axes_dims_rope", "4,4,8"}});
  msg = openError(dir.file("shape.safetensors"));
  EXPECT_NE(msg.find("double_blocks.0.txt_mlp.2.weight' has shape [64, 100], expected [64, 256]"), std::string::npos)
      << msg;

  // Without the axes metadata a head dim other than 128 cannot be interpreted.
  io::writeSafetensors(dir.file("noaxes.safetensors"), all);
  EXPECT_NE(openError(dir.file("noaxes.safetensors")).find("RoPE axes"), std::string::npos);

  // A diffusers shard index naming a missing shard.
  std::filesystem::create_directories(dir.file("idx"));
  std::ofstream(dir.file("idx/config.json")) << R"({"_class_name": "FluxTransformer2DModel", "num_layers": 1})";
  std::ofstream(dir.file("idx/diffusion_pytorch_model.safetensors.index.json"))
      << R"({"metadata": {}, "weight_map": {"x_embedder.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}})";
  msg = openError(dir.file("idx"));
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
}

TEST(Checkpoint, UnusedTensorsAndAForeignModelIndexAreFindingsNotSilence) {
  TempDir dir;
  io::SynthOptions o;
  o.config = model::FluxConfig::preset("tiny");
  o.presetName = "tiny";
  o.outDir = dir.file("d");
  auto rd = io::synthesizeCheckpoint(o);
  EXPECT_TRUE(io::FluxCheckpoint::open(rd.modelPath).findings().empty());
  // A BFL file with one tensor the model does not use.
  const std::string bfl = dir.file("flux1-tiny.safetensors");
  {
    o.layout = io::CheckpointLayout::kBfl;
    o.outDir = dir.file("b");
    auto rb = io::synthesizeCheckpoint(o);
    auto f = io::SafetensorsFile::open(rb.modelPath);
    std::map<std::string, at::Tensor> tensors;
    for (const auto& t : f->tensors()) tensors[t.name] = f->read(t.name);
    tensors["lora_unet.extra.weight"] = at::zeros({2, 2});
    io::writeSafetensors(bfl, tensors, f->metadata());
  }
  const auto ck = io::FluxCheckpoint::open(bfl);
  ASSERT_EQ(ck.findings().size(), 1u);
  EXPECT_NE(ck.findings()[0].find("1 tensor(s) the model does not use, e.g. 'lora_unet.extra.weight'"),
            std::string::npos)
      << ck.findings()[0];
  // model_index.json of another pipeline beside a FLUX transformer.
  std::ofstream(rd.modelPath + "/model_index.json") << "{\"_class_name\": \"StableDiffusionPipeline\"}";
  const auto d = io::FluxCheckpoint::open(rd.modelPath);
  ASSERT_EQ(d.findings().size(), 1u);
  EXPECT_NE(d.findings()[0].find("expected a FLUX pipeline"), std::string::npos) << d.findings()[0];
  std::ofstream(rd.modelPath + "/model_index.json") << "{not json";
  EXPECT_NE(io::FluxCheckpoint::open(rd.modelPath).findings().at(0).find("not valid JSON"), std::string::npos);
}

TEST(Checkpoint, AFolderOfBflFilesPicksTheTransformerAndSkipsADamagedNeighbour) {
  TempDir dir;
  io::SynthOptions o;
  o.config = model::FluxConfig::preset("tiny");
  o.presetName = "tiny";
  o.layout = io::CheckpointLayout::kBfl;
  o.outDir = dir.file("b");
  auto rb = io::synthesizeCheckpoint(o);
  std::ofstream(dir.file("b/zz_damaged.safetensors")) << "not a safetensors file";
  const auto ck = io::FluxCheckpoint::open(dir.file("b"));  // flux1-tiny.safetensors by its name
  EXPECT_NE(ck.choice().find("flux1-tiny.safetensors"), std::string::npos) << ck.choice();
  // Renamed: found by its tensors; the damaged file is skipped, not fatal.
  std::filesystem::rename(rb.modelPath, dir.file("b/my-finetune.safetensors"));
  const auto renamed = io::FluxCheckpoint::open(dir.file("b"));
  EXPECT_NE(renamed.choice().find("my-finetune.safetensors"), std::string::npos) << renamed.choice();
  // Two transformers: ambiguous, named.
  std::filesystem::copy_file(dir.file("b/my-finetune.safetensors"), dir.file("b/other.safetensors"));
  EXPECT_NE(openError(dir.file("b")).find("2 FLUX transformer files found"), std::string::npos)
      << openError(dir.file("b"));
}
