// pipeline::Engine on in-process ranks: every layout of `generate` and `forward` equals one rank, the
// weights are kept between runs, and bad requests end every rank before anything is loaded.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <mutex>

#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/dist/in_process.h"
#include "pardit/dist/runtime.h"
#include "pardit/io/png.h"
#include "pardit/io/synth.h"
#include "pardit/io/vae_checkpoint.h"
#include "pardit/model/vae.h"
#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/job_plan.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/op_profile.h"
#include "test_util.h"

using namespace pardit;

namespace {

struct Layout {
  const char* name;
  int ranks;
  pipeline::EngineOptions options;
};

pipeline::EngineOptions withDegrees(pipeline::EngineOptions c, int cfg, int pp, int ring, int ulysses, int warmup = 1) {
  c.cfgDegree = cfg;
  c.pipefusionDegree = pp;
  c.ringDegree = ring;
  c.ulyssesDegree = ulysses;
  c.warmupSteps = warmup;
  return c;
}

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setLogLevel(LogLevel::kWarn);
    io::SynthOptions o;
    o.config = model::FluxConfig::preset("tiny");
    o.outDir = dir_.file("m");
    o.textLen = 8;
    model_ = io::synthesizeCheckpoint(o);
    base_ = pipeline::EngineOptions{};
    base_.model = model_.modelPath;
    base_.dtype = pipeline::Dtype::kFp32;
    base_.device = dist::DeviceKind::kCpu;
  }
  void TearDown() override { setLogLevel(LogLevel::kInfo); }

  pipeline::GenerateRequest request(bool trueCfg) const {
    pipeline::GenerateRequest r;
    r.prompt.embeddingsFile = model_.promptEmbedsPath;
    if (trueCfg) {
      r.negativePrompt.embeddingsFile = model_.negativeEmbedsPath;
      r.trueCfgScale = 2.5;
    }
    r.height = 64;
    r.width = 96;
    r.steps = 3;
    r.seed = 7;
    return r;
  }

  // Runs `generate` on `ranks` in-process ranks; returns rank 0's latents and checks all ranks agree.
  // Point-to-point with NCCL's semantics (nothing buffered): every layout's exchanges would also complete
  // between GPUs.
  at::Tensor generate(int ranks, const pipeline::EngineOptions& options, const pipeline::GenerateRequest& r) {
    std::mutex m;
    std::vector<at::Tensor> out(ranks);
    dist::runInProcess(
        ranks,
        [&](dist::Runtime& rt) {
          pipeline::Engine engine(options, rt);
          at::Tensor l = engine.generate(r).latents;
          std::lock_guard<std::mutex> lock(m);
          out[rt.worldRank()] = l;
        },
        dist::PointToPoint::kRendezvous);
    for (int i = 1; i < ranks; ++i) EXPECT_TRUE(at::equal(out[0], out[i])) << "rank " << i;
    return out[0];
  }

  test::TempDir dir_;
  io::SynthResult model_;
  pipeline::EngineOptions base_;
};

}  // namespace

TEST_F(EngineTest, GenerateLayoutsMatchOneRank) {
  for (bool trueCfg : {false, true}) {
    const at::Tensor ref = generate(1, base_, request(trueCfg));
    std::vector<Layout> layouts = {{"U2", 2, withDegrees(base_, 1, 1, 1, 2)},
                                   {"R2", 2, withDegrees(base_, 1, 1, 2, 1)},
                                   {"PP2 warm-up=all", 2, withDegrees(base_, 1, 2, 1, 1, 3)},
                                   {"U2xR2", 4, withDegrees(base_, 1, 1, 2, 2)},
                                   {"PP2xU2 warm-up=all", 4, withDegrees(base_, 1, 2, 1, 2, 3)}};
    if (trueCfg) {
      layouts.push_back({"CFG2", 2, withDegrees(base_, 2, 1, 1, 1)});
      layouts.push_back({"CFG2xR2", 4, withDegrees(base_, 2, 1, 2, 1)});
      layouts.push_back({"CFG2xPP2 warm-up=all", 4, withDegrees(base_, 2, 2, 1, 1, 3)});
    }
    for (const auto& l : layouts) {
      const double err = test::maxRelError(generate(l.ranks, l.options, request(trueCfg)), ref);
      std::printf("[engine] generate %s%s: max relative error %.3e\n", l.name, trueCfg ? " true CFG" : "", err);
      EXPECT_LE(err, 1e-5) << l.name;
    }
  }
  // Stale K/V: a real patch pipeline differs, within the PipeFusion bound.
  const at::Tensor ref = generate(1, base_, request(false));
  const double err = test::maxRelError(generate(2, withDegrees(base_, 1, 2, 1, 1, 1), request(false)), ref);
  EXPECT_GT(err, 1e-7);
  EXPECT_LE(err, 2e-2);
}

TEST_F(EngineTest, ForwardLayoutsMatchOneRankAndWriteTheOutput) {
  pipeline::EngineOptions fwd = base_;
  // Batch 2 (split by CFG), 4 x 8 image tokens (split by sequence parallelism), 6 text tokens (replicated).
  const model::FluxConfig mc = model::FluxConfig::preset("tiny");
  at::manual_seed(17);
  model::FluxInputs in;
  in.img = at::randn({2, 32, mc.inChannels});
  in.txt = at::randn({2, 6, mc.contextInDim});
  in.pooled = at::randn({2, mc.vecInDim});
  in.timestep = at::tensor({0.9f, 0.4f});
  in.guidance = at::tensor({3.5f, 3.5f});
  in.imgIds = model::imagePositionIds(4, 8);
  in.txtIds = model::textPositionIds(6);
  at::Tensor ref;
  dist::runInProcess(1, [&](dist::Runtime& rt) {
    pipeline::Engine e(fwd, rt);
    ref = e.forward(in, dir_.file("ref.safetensors")).output;
  });
  EXPECT_TRUE(std::filesystem::exists(dir_.file("ref.safetensors")));
  // (The lambda uses the struct's members: clang before 16 does not capture structured bindings.)
  for (const auto& layout : std::vector<Layout>{{"U2", 2, withDegrees(fwd, 1, 1, 1, 2)},
                                                {"R2", 2, withDegrees(fwd, 1, 1, 2, 1)},
                                                {"CFG2", 2, withDegrees(fwd, 2, 1, 1, 1)},
                                                {"PP2", 2, withDegrees(fwd, 1, 2, 1, 1)},
                                                {"CFG2xU2", 4, withDegrees(fwd, 2, 1, 1, 2)}}) {
    std::mutex m;
    at::Tensor out;
    dist::runInProcess(layout.ranks, [&](dist::Runtime& rt) {
      pipeline::Engine e(layout.options, rt);
      at::Tensor o = e.forward(in).output;
      if (rt.worldRank() == layout.ranks - 1) {
        std::lock_guard<std::mutex> lock(m);
        out = o;
      }
    });
    EXPECT_LE(test::maxRelError(out, ref), 1e-5) << layout.name;
  }
}

TEST_F(EngineTest, KeepsTheWeightsBetweenRunsWithTheSamePlan) {
  dist::runInProcess(2, [&](dist::Runtime& rt) {
    pipeline::Engine engine(withDegrees(base_, 1, 2, 1, 1), rt);
    const auto first = engine.generate(request(false));
    EXPECT_GT(first.report.bytesRead, 0u);
    auto r = request(false);
    r.seed = 8;
    const auto second = engine.generate(r);
    EXPECT_EQ(second.report.bytesRead, first.report.bytesRead);  // nothing read again
    EXPECT_EQ(second.report.loadSeconds, 0.0);
    EXPECT_FALSE(at::equal(first.latents, second.latents));
  });
}

TEST_F(EngineTest, BadRequestsEndEveryRankBeforeLoading) {
  std::atomic<int> failures{0};
  auto expectFailure = [&](const pipeline::GenerateRequest& r, const pipeline::EngineOptions& options) {
    failures = 0;
    dist::runInProcess(2, [&](dist::Runtime& rt) {
      pipeline::Engine engine(options, rt);
      try {
        engine.generate(r);
      } catch (const dist::CollectiveFailure&) {
        ++failures;
      }
      EXPECT_EQ(engine.options().model, options.model);
    });
    EXPECT_EQ(failures.load(), 2);
  };
  auto r = request(false);
  r.trueCfgScale = 3;  // no negative prompt
  expectFailure(r, withDegrees(base_, 1, 1, 1, 2));
  r = request(false);
  r.saveLatents = dir_.file("missing/dir/x.safetensors");  // checked before loading
  expectFailure(r, withDegrees(base_, 1, 1, 1, 2));
  expectFailure(request(false), withDegrees(base_, 2, 1, 1, 1));  // CFG degree 2 without true CFG
  r = request(false);
  r.height = 48;  // 3 token rows for 2 sequence-parallel ranks
  r.width = 16;
  expectFailure(r, withDegrees(base_, 1, 1, 2, 1));
  // A metrics file in a missing directory is refused when the engine is built, not after the run.
  failures = 0;
  dist::runInProcess(2, [&](dist::Runtime& rt) {
    pipeline::EngineOptions o = withDegrees(base_, 1, 1, 1, 2);
    o.metrics = dir_.file("missing/m.h5");
    try {
      pipeline::Engine engine(o, rt);
    } catch (const dist::CollectiveFailure&) {
      ++failures;
    }
  });
  EXPECT_EQ(failures.load(), 2);
  // Options that differ between ranks are refused when the engine is built.
  failures = 0;
  dist::runInProcess(2, [&](dist::Runtime& rt) {
    pipeline::EngineOptions o = withDegrees(base_, 1, 1, 1, 2);
    o.offload = rt.worldRank() == 0 ? memory::Offload::kAuto : memory::Offload::kSequential;
    try {
      pipeline::Engine engine(o, rt);
    } catch (const dist::CollectiveFailure&) {
      ++failures;
    }
  });
  EXPECT_EQ(failures.load(), 2);
}

// The decode plan: patch-parallel when it fits; else tiles from diffusers' size (the VAE's sample_size),
// halved until they fit, none below 64 px; --vae-tiling on/off and --vae-tile-size as asked.
TEST(DecodePlan, PatchesWhenTheyFitElseTheLargestTilesThatDo) {
  using Mode = pipeline::DecodePlan::Mode;
  const auto flux = model::VaeConfig::preset("flux");
  pipeline::EngineOptions c;
  const int64_t px = 2048;
  const uint64_t patches4 = model::vaeDecodeActivationBytes(flux, 1, px, px, 4, 2);
  auto plan = [&](uint64_t free, int ranks = 4) {
    return pipeline::planDecode(flux, c, 1, px, px, ranks, at::kBFloat16, free);
  };
  const uint64_t weights = plan(0).weightBytes;
  EXPECT_GT(weights, 90u << 20);  // FLUX.1's decoder: ~100 MB in bf16
  auto d = plan(weights + patches4);
  EXPECT_EQ(d.mode, Mode::kPatches);
  EXPECT_TRUE(d.fits);
  EXPECT_EQ(d.activationBytes, patches4);
  // Less: 1024 px tiles (diffusers' for FLUX.1) when they fit, then 512, 256, 128, 64.
  const uint64_t tiles1024 = model::vaeTiledDecodeBytes(flux, 1, px, px, 128, 2);
  const uint64_t tiles512 = model::vaeTiledDecodeBytes(flux, 1, px, px, 64, 2);
  ASSERT_LT(tiles1024, patches4 * 4);
  d = plan(weights + tiles1024);
  EXPECT_EQ(d.mode, patches4 <= tiles1024 ? Mode::kPatches : Mode::kTiles);
  d = plan(weights + std::min(tiles1024, patches4) - 1);
  EXPECT_EQ(d.mode, Mode::kTiles);
  EXPECT_EQ(d.tile * d.factor, tiles1024 < patches4 ? 1024 : 512);
  d = plan(weights + tiles512 - 1);
  EXPECT_EQ(d.tile * d.factor, 256);
  EXPECT_TRUE(d.fits);
  d = plan(weights + 1000);
  EXPECT_EQ(d.tile * d.factor, 64);
  EXPECT_FALSE(d.fits);
  // Fewer latent rows than ranks: every rank decodes the whole image.
  EXPECT_EQ(pipeline::planDecode(flux, c, 1, 16, 64, 4, at::kBFloat16, 1ull << 40).mode, Mode::kWhole);
  // off: never tiles (it does not fit); on: tiles even when patches fit; --vae-tile-size as given.
  c.vaeTiling = pipeline::VaeTiling::kOff;
  d = plan(weights + 1000);
  EXPECT_EQ(d.mode, Mode::kPatches);
  EXPECT_FALSE(d.fits);
  c.vaeTiling = pipeline::VaeTiling::kOn;
  d = plan(1ull << 40);
  EXPECT_EQ(d.mode, Mode::kTiles);
  EXPECT_EQ(d.tile * d.factor, 1024);
  c.vaeTileSize = 384;
  EXPECT_EQ(plan(1ull << 40).tile * 8, 384);
  EXPECT_EQ(plan(1000).tile * 8, 384);  // as given, even when it does not fit
  c.vaeTileSize = 100;
  EXPECT_THROW(plan(1ull << 40), Error);  // not a multiple of 8
}

// generate decodes in tiles when asked (or when the patches do not fit): on 2 ranks as on one, and as
// the one-rank tiled decode of the same latents.
TEST_F(EngineTest, TiledDecodeOnRanksEqualsOneRank) {
  auto o = base_;
  o.vaeTiling = pipeline::VaeTiling::kOn;
  o.vaeTileSize = 32;
  auto r = request(false);
  r.decode = true;
  std::vector<at::Tensor> images(2), latents(2);
  for (int ranks : {1, 2}) {
    r.output = dir_.file("tiled" + std::to_string(ranks) + ".png");
    std::mutex m;
    dist::runInProcess(ranks, [&](dist::Runtime& rt) {
      pipeline::Engine engine(withDegrees(o, 1, 1, 1, ranks), rt);
      auto out = engine.generate(r);
      std::lock_guard<std::mutex> lock(m);
      if (rt.worldRank() == 0) {
        images[ranks - 1] = out.images;
        latents[ranks - 1] = out.latents;
      }
    });
  }
  ASSERT_TRUE(images[0].defined() && images[1].defined());
  EXPECT_EQ(images[0].sizes(), (std::vector<int64_t>{1, 64, 96, 3}));
  const auto vae = io::VaeCheckpoint::open(model_.vaePath);
  const model::VaeDecoder decoder(vae.config(), vae.getter(at::kFloat));
  const pipeline::LatentGeometry geom{64, 96, 16};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor z = model::denormalizeLatents(pipeline::unpackLatents(latents[i], geom), vae.config());
    EXPECT_TRUE(at::equal(images[i], model::imagesToBytes(model::decodeTiled(decoder, z, 4)))) << i + 1 << " rank(s)";
  }
  const int maxDiff = (images[0].to(at::kInt) - images[1].to(at::kInt)).abs().max().item<int>();
  EXPECT_LE(maxDiff, 1);  // the latents of 2 Ulysses ranks differ from one rank's by round-off
  // The PNG says that it was decoded in tiles (not the exact decode).
  const auto png = io::readPng(dir_.file("tiled1.png"));
  EXPECT_TRUE(at::equal(png.pixels, images[0][0]));
  ASSERT_FALSE(png.text.empty());
  EXPECT_EQ(png.text[0].first, "parameters");
  EXPECT_NE(png.text[0].second.find("VAE tiles: 32 px"), std::string::npos) << png.text[0].second;
}

// Communication is a class of its own in operator profiles: every backend opens a named scope per call,
// and the copies it makes inside are the call's.
TEST(OpProfile, CountsCommunicationAsItsOwnClass) {
  auto world = dist::makeInProcessWorld(1);
  at::Tensor t = at::ones({1, 8});  // all-to-all: dim 0 is the group size
  std::map<std::string, int64_t> calls;
  {
    pipeline::OpProfile profile;
    world[0]->allReduce(t);
    (void)dist::allToAll(*world[0], t);
    (void)dist::allGather(*world[0], t);
    for (const auto& op : profile.ops()) calls[op.name] = op.calls;
  }
  EXPECT_EQ(calls["pardit::all_reduce"], 1);
  EXPECT_EQ(calls["pardit::all_to_all"], 1);
  EXPECT_EQ(calls["pardit::all_gather"], 1);
  for (const auto& name : {"pardit::all_reduce", "pardit::all_to_all", "pardit::send_recv", "pardit::wait"})
    EXPECT_EQ(pipeline::OpProfile::classOf(name), "communication") << name;
  EXPECT_EQ(pipeline::OpProfile::classOf("aten::rms_norm"), "norms/RoPE/modulation");
}

// The operator profiler counts the top-level operators of its thread: calls inside another operator
// (addmm inside linear) count in their caller, and nothing is recorded once it is gone.
TEST(OpProfile, CountsTopLevelOperatorsOfItsThread) {
  const at::Tensor x = at::randn({64, 32}), w = at::randn({16, 32}), b = at::randn({16});
  std::vector<pipeline::OpProfile::Op> ops;
  {
    pipeline::OpProfile profile;
    for (int i = 0; i < 3; ++i) (void)at::linear(x, w, b);
    (void)at::gelu(x);
    ops = profile.ops();
  }
  std::map<std::string, int64_t> calls;
  for (const auto& op : ops) calls[op.name] = op.calls;
  EXPECT_EQ(calls["aten::linear"], 3);
  EXPECT_EQ(calls["aten::gelu"], 1);
  EXPECT_EQ(calls.count("aten::addmm"), 0u) << "addmm runs inside linear";
  EXPECT_EQ(pipeline::OpProfile::classOf("aten::linear"), "GEMM");
  EXPECT_EQ(pipeline::OpProfile::classOf("aten::_scaled_dot_product_flash_attention_for_cpu"), "attention");
  {
    pipeline::OpProfile again;  // a second profile starts empty
    EXPECT_TRUE(again.ops().empty());
  }
}
