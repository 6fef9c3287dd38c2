// pipeline::Engine on in-process ranks: every layout of `generate` and `forward` equals one rank, the
// weights are kept between runs, and bad requests end every rank before anything is loaded.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>

#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/dist/in_process.h"
#include "pardit/dist/runtime.h"
#include "pardit/io/synth.h"
#include "pardit/pipeline/engine.h"
#include "test_util.h"

using namespace pardit;

namespace {

struct Layout {
  const char* name;
  int ranks;
  config::EngineConfig options;
};

config::EngineConfig withDegrees(config::EngineConfig c, int cfg, int pp, int ring, int ulysses, int warmup = 1) {
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
    base_ = config::defaults(config::Command::kGenerate);
    base_.model = model_.modelPath;
    base_.dtype = config::Dtype::kFp32;
    base_.device = config::DeviceKind::kCpu;
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
  at::Tensor generate(int ranks, const config::EngineConfig& options, const pipeline::GenerateRequest& r) {
    std::mutex m;
    std::vector<at::Tensor> out(ranks);
    dist::runInProcess(ranks, [&](dist::Runtime& rt) {
      pipeline::Engine engine(options, rt);
      at::Tensor l = engine.generate(r).latents;
      std::lock_guard<std::mutex> lock(m);
      out[rt.worldRank()] = l;
    });
    for (int i = 1; i < ranks; ++i) EXPECT_TRUE(at::equal(out[0], out[i])) << "rank " << i;
    return out[0];
  }

  test::TempDir dir_;
  io::SynthResult model_;
  config::EngineConfig base_;
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
  config::EngineConfig fwd = base_;
  fwd.command = config::Command::kForward;
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
  for (const auto& [name, ranks, options] : std::vector<Layout>{{"U2", 2, withDegrees(fwd, 1, 1, 1, 2)},
                                                                 {"R2", 2, withDegrees(fwd, 1, 1, 2, 1)},
                                                                 {"CFG2", 2, withDegrees(fwd, 2, 1, 1, 1)},
                                                                 {"PP2", 2, withDegrees(fwd, 1, 2, 1, 1)},
                                                                 {"CFG2xU2", 4, withDegrees(fwd, 2, 1, 1, 2)}}) {
    std::mutex m;
    at::Tensor out;
    dist::runInProcess(ranks, [&](dist::Runtime& rt) {
      pipeline::Engine e(options, rt);
      at::Tensor o = e.forward(in).output;
      if (rt.worldRank() == ranks - 1) {
        std::lock_guard<std::mutex> lock(m);
        out = o;
      }
    });
    EXPECT_LE(test::maxRelError(out, ref), 1e-5) << name;
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
  auto expectFailure = [&](const pipeline::GenerateRequest& r, const config::EngineConfig& options) {
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
  // Options that differ between ranks are refused when the engine is built.
  failures = 0;
  dist::runInProcess(2, [&](dist::Runtime& rt) {
    config::EngineConfig o = withDegrees(base_, 1, 1, 1, 2);
    o.offload = rt.worldRank() == 0 ? config::Offload::kAuto : config::Offload::kSequential;
    try {
      pipeline::Engine engine(o, rt);
    } catch (const dist::CollectiveFailure&) {
      ++failures;
    }
  });
  EXPECT_EQ(failures.load(), 2);
}
