// Parallel results against the single-rank result: USP (Ulysses, Ring, both) and CFG parallelism for
// `forward` and a 3-step `generate`, on the fixtures' tiny models, at a non-square resolution, with
// text split across ranks and replicated; and the communication volume against its analytic value.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "mpi_env.h"
#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/parallel/cfg_parallel.h"
#include "pardit/parallel/sequence_parallel.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/sampler.h"

using namespace pardit;

namespace {

std::string fixture(const std::string& rel) { return std::string(PARDIT_FIXTURE_DIR) + "/" + rel; }

double maxRelError(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() / b.to(at::kDouble).abs().max().item<double>();
}

struct Layout {
  int cfg, ring, ulysses;
};

// Every layout of the given world size that the group structure allows.
std::vector<Layout> layouts(int world) {
  std::vector<Layout> out;
  for (int cfg : {1, 2})
    for (int ring = 1; ring <= world; ++ring)
      for (int ulysses = 1; ulysses <= world; ++ulysses)
        if (cfg * ring * ulysses == world) out.push_back({cfg, ring, ulysses});
  return out;
}

std::string name(const Layout& l) {
  return "cfg" + std::to_string(l.cfg) + "xR" + std::to_string(l.ring) + "xU" + std::to_string(l.ulysses);
}

struct Model {
  model::FluxConfig config;
  std::shared_ptr<model::FluxWeightProvider> weights;
};

Model loadModel(const std::string& path) {
  auto ck = io::FluxCheckpoint::open(fixture(path));
  return {ck.config(), std::make_shared<model::ResidentFluxWeights>(ck.config(), ck.getter(at::kFloat))};
}

model::FluxInputs makeInputs(const model::FluxConfig& c, const pipeline::LatentGeometry& g, int64_t B, int64_t T,
                             uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  model::FluxInputs in;
  in.img = at::randn({B, g.tokens(), c.inChannels}, gen);
  in.txt = at::randn({B, T, c.contextInDim}, gen);
  in.pooled = at::randn({B, c.vecInDim}, gen);
  in.timestep = at::tensor({0.7f, 0.25f}).narrow(0, 0, B);
  if (c.guidanceEmbed) in.guidance = at::tensor({3.5f, 4.0f}).narrow(0, 0, B);
  in.imgIds = pipeline::imageIds(g);
  in.txtIds = pipeline::textIds(T);
  return in;
}

struct ParallelModel {
  std::shared_ptr<parallel::UspAttention> usp;
  std::shared_ptr<parallel::SequenceParallelTransformer> sp;
};

ParallelModel makeParallel(dist::Runtime& rt, const Model& m) {
  ParallelModel p;
  p.usp = std::make_shared<parallel::UspAttention>(rt.group(dist::GroupKind::kUlysses), rt.group(dist::GroupKind::kRing));
  auto t = std::make_shared<model::FluxTransformer>(m.config, m.weights, p.usp);
  p.sp = std::make_shared<parallel::SequenceParallelTransformer>(t, p.usp, rt.group(dist::GroupKind::kSequence));
  return p;
}

void resetStats(dist::Runtime& rt) {
  for (auto k : {dist::GroupKind::kUlysses, dist::GroupKind::kRing, dist::GroupKind::kSequence, dist::GroupKind::kCfg})
    rt.group(k).resetStats();
}

}  // namespace

// forward: every layout of this world size, text split (8 tokens) and replicated (7 tokens), two models.
TEST(UspCfg, ForwardMatchesSingleRank) {
  auto& rt = test::runtime();
  const pipeline::LatentGeometry geom{64, 128, 16};  // 4 x 8 = 32 image tokens: non-square
  for (const std::string path : {"flux_tiny_dev/diffusers", "flux_tiny_schnell/flux1-tiny-schnell.safetensors"}) {
    const Model m = loadModel(path);
    for (int64_t T : {8, 7}) {
      const model::FluxInputs in = makeInputs(m.config, geom, 2, T, 11);
      model::FluxTransformer local(m.config, m.weights, std::make_shared<model::LocalAttention>());
      const at::Tensor ref = local.forward(in);
      for (const Layout& l : layouts(rt.worldSize())) {
        if (m.config.numHeads % l.ulysses != 0) continue;
        rt.setTopology({l.cfg, 1, l.ring, l.ulysses}, c10::kCPU);
        ParallelModel p = makeParallel(rt, m);
        const int64_t part = 2 / l.cfg, first = rt.topology().cfgRank() * part;
        model::FluxInputs mine = in;
        mine.img = in.img.narrow(0, first, part);
        mine.txt = in.txt.narrow(0, first, part);
        mine.pooled = in.pooled.narrow(0, first, part);
        mine.timestep = in.timestep.narrow(0, first, part);
        if (in.guidance.defined()) mine.guidance = in.guidance.narrow(0, first, part);
        at::Tensor out = p.sp->forward(mine);
        if (l.cfg > 1) out = dist::allGather(rt.group(dist::GroupKind::kCfg), out).reshape(ref.sizes());
        const double err = maxRelError(out, ref);
        if (rt.worldRank() == 0)
          std::printf("[equivalence] forward %s %s text %lld: max relative error %.3e\n", path.c_str(),
                      name(l).c_str(), static_cast<long long>(T), err);
        EXPECT_LE(err, 1e-5) << path << " " << name(l) << " T=" << T;
        EXPECT_EQ(p.usp->textMode(), (T % (l.ring * l.ulysses) == 0 || l.ring * l.ulysses == 1)
                                         ? parallel::TextMode::kSplit
                                         : parallel::TextMode::kReplicated);
      }
    }
  }
}

// generate: 3 steps with true CFG on every layout; the CFG degree puts the branches on two rank groups.
TEST(UspCfg, GenerateMatchesSingleRank) {
  auto& rt = test::runtime();
  const pipeline::LatentGeometry geom{64, 128, 16};
  const Model m = loadModel("flux_tiny_dev/flux1-tiny-dev.safetensors");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  pipeline::PromptEmbeddings pos{at::randn({1, 8, m.config.contextInDim}, gen), at::randn({1, m.config.vecInDim}, gen)};
  pipeline::PromptEmbeddings neg{at::randn({1, 8, m.config.contextInDim}, gen), at::randn({1, m.config.vecInDim}, gen)};
  const at::Tensor ids = pipeline::imageIds(geom);
  pipeline::FlowMatchEulerScheduler sched(pipeline::SchedulerConfig::dev(), 3, geom.tokens());
  const at::Tensor noise = pipeline::initialNoise(123, 1, geom, at::kFloat);
  auto local = std::make_shared<model::FluxTransformer>(m.config, m.weights, std::make_shared<model::LocalAttention>());
  pipeline::LocalDenoiser ld(local, pos, ids, neg, 2.5);
  const at::Tensor ref = pipeline::denoise(ld, noise, sched, true, 3.5);
  for (const Layout& l : layouts(rt.worldSize())) {
    if (m.config.numHeads % l.ulysses != 0) continue;
    rt.setTopology({l.cfg, 1, l.ring, l.ulysses}, c10::kCPU);
    ParallelModel p = makeParallel(rt, m);
    pipeline::TransformerFn fn = [sp = p.sp](const model::FluxInputs& in) { return sp->forward(in); };
    std::unique_ptr<pipeline::Denoiser> d;
    if (l.cfg == 2) {
      d = std::make_unique<parallel::CfgParallelDenoiser>(fn, rt.topology().cfgRank() == 0 ? pos : neg, ids,
                                                          rt.group(dist::GroupKind::kCfg), 2.5);
    } else {
      d = std::make_unique<pipeline::LocalDenoiser>(fn, pos, ids, neg, 2.5);
    }
    const at::Tensor out = pipeline::denoise(*d, noise, sched, true, 3.5);
    const double err = maxRelError(out, ref);
    if (rt.worldRank() == 0)
      std::printf("[equivalence] generate 3 steps %s: max relative error %.3e\n", name(l).c_str(), err);
    EXPECT_LE(err, 1e-5) << name(l);
    // Every rank ends with the same latents.
    at::Tensor all = dist::allGather(rt.world(), out);
    EXPECT_TRUE(at::equal(all.select(0, 0), all.select(0, rt.worldSize() - 1)));
  }
}

// Bytes each rank sends per forward equal the analytic volume.
TEST(UspCfg, CommunicationVolumeIsAnalytic) {
  auto& rt = test::runtime();
  const int N = rt.worldSize();
  if (N == 1) GTEST_SKIP() << "needs at least 2 ranks";
  const pipeline::LatentGeometry geom{64, 128, 16};
  const Model m = loadModel("flux_tiny_dev/diffusers");
  const auto& c = m.config;
  const int64_t B = 2, Li = geom.tokens(), layers = c.depth + c.depthSingle, H = c.numHeads, D = c.headDim();
  for (int64_t T : {8, 7}) {
    const model::FluxInputs in = makeInputs(c, geom, B, T, 3);
    for (const Layout& l : {Layout{1, 1, N}, Layout{1, N, 1}}) {
      if (H % l.ulysses != 0) continue;
      rt.setTopology({l.cfg, 1, l.ring, l.ulysses}, c10::kCPU);
      ParallelModel p = makeParallel(rt, m);
      resetStats(rt);
      p.sp->forward(in);
      const bool split = T % N == 0;
      const int64_t sImg = Li / N, sTxt = split ? T / N : T;
      const uint64_t elem = 4;
      uint64_t expectA2A = 0, expectRing = 0;
      if (l.ulysses > 1) {
        const int64_t U = l.ulysses;
        // q (with the text rows when replicated), k, v (image rows only when replicated), output.
        const int64_t qRows = sTxt + sImg, kvRows = split ? sTxt + sImg : sImg;
        const uint64_t perRow = static_cast<uint64_t>(B * H * D) * elem;
        expectA2A = layers * perRow * static_cast<uint64_t>(2 * qRows + 2 * kvRows) * (U - 1) / U;
      } else {
        const int64_t R = l.ring;
        const int64_t kvRows = split ? sTxt + sImg : sImg;
        expectRing = layers * static_cast<uint64_t>(R - 1) * 2 * B * H * kvRows * D * elem;
      }
      const uint64_t expectGather = static_cast<uint64_t>(N - 1) * B * sImg * c.outChannels * elem;
      EXPECT_EQ(rt.group(dist::GroupKind::kUlysses).stats(dist::CollectiveKind::kAllToAll).bytes, expectA2A) << name(l);
      EXPECT_EQ(rt.group(dist::GroupKind::kRing).stats(dist::CollectiveKind::kSendRecv).bytes, expectRing) << name(l);
      EXPECT_EQ(rt.group(dist::GroupKind::kSequence).stats(dist::CollectiveKind::kAllGather).bytes, expectGather);
      if (rt.worldRank() == 0)
        std::printf("[volume] %s text %lld: all-to-all %llu B, ring %llu B, output all-gather %llu B per rank\n",
                    name(l).c_str(), static_cast<long long>(T), static_cast<unsigned long long>(expectA2A),
                    static_cast<unsigned long long>(expectRing), static_cast<unsigned long long>(expectGather));
    }
  }
}

TEST(Topology, RankOrderAndGroups) {
  // rank = u + U * (r + R * (p + P * c)), checked on every rank of a 16-rank layout.
  const dist::ParallelDegrees d{2, 2, 2, 2};
  for (int rank = 0; rank < 16; ++rank) {
    dist::Topology t(d, rank);
    EXPECT_EQ(t.rankOf(t.cfgRank(), t.pipefusionRank(), t.ringRank(), t.ulyssesRank()), rank);
    EXPECT_EQ(t.group(dist::GroupKind::kUlysses).size(), 2u);
    EXPECT_EQ(t.group(dist::GroupKind::kSequence).size(), 4u);
    EXPECT_EQ(t.group(dist::GroupKind::kSequence)[t.spRank()], rank);
  }
  dist::Topology t(d, 13);  // u=1, r=0, p=1, c=1
  EXPECT_EQ(t.group(dist::GroupKind::kRing), (std::vector<int>{13, 15}));
  EXPECT_EQ(t.group(dist::GroupKind::kPipeFusion), (std::vector<int>{9, 13}));
  EXPECT_EQ(t.group(dist::GroupKind::kCfg), (std::vector<int>{5, 13}));
  EXPECT_THROW(dist::Topology::validate(d, 8), Error);
}
