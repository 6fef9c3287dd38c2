#include "parallel_cases.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <set>

#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/synth.h"
#include "pardit/parallel/pipefusion.h"
#include "pardit/parallel/sequence_parallel.h"
#include "pardit/pipeline/denoise.h"
#include "pardit/pipeline/latents.h"
#include "test_util.h"

namespace pardit::test {

namespace {

struct Layout {
  int cfg, ring, ulysses;
};

// Every layout of the given world size that the group structure allows.
// Every USP x CFG layout of `world` ranks (at least 2: one rank would be compared with itself).
std::vector<Layout> layouts(int world) {
  std::vector<Layout> out;
  for (int cfg : {1, 2})
    for (int ring = 1; ring <= world; ++ring)
      for (int ulysses = 1; ulysses <= world; ++ulysses)
        if (cfg * ring * ulysses == world) out.push_back({cfg, ring, ulysses});
  EXPECT_GE(world, 2) << "the layouts of " << world << " rank(s) against one rank: run with at least 2 ranks";
  EXPECT_FALSE(out.empty());
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
  p.usp =
      std::make_shared<parallel::UspAttention>(rt.group(dist::GroupKind::kUlysses), rt.group(dist::GroupKind::kRing));
  auto t = std::make_shared<model::FluxTransformer>(m.config, m.weights, p.usp);
  p.sp = std::make_shared<parallel::SequenceParallelTransformer>(t, p.usp, rt.group(dist::GroupKind::kSequence));
  return p;
}

void resetStats(dist::Runtime& rt) {
  for (auto k : {dist::GroupKind::kUlysses, dist::GroupKind::kRing, dist::GroupKind::kSequence, dist::GroupKind::kCfg})
    rt.group(k).resetStats();
}

struct Run {
  std::string name;
  dist::ParallelDegrees degrees;
  int patches;
  int warmup;
  bool exact;  // expected to match the single-rank result up to reassociation
};

struct Problem {
  model::FluxConfig config;
  model::WeightGetter get;
  pipeline::LatentGeometry geom{128, 64, 16};  // 8 x 4 token grid: non-square
  pipeline::PromptEmbeddings pos, neg;
  double trueCfg = 2.0;
  int steps = 4;
};

Problem makeProblem(const model::FluxConfig& c, model::WeightGetter get) {
  Problem p;
  p.config = c;
  p.get = std::move(get);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  p.pos = {at::randn({1, 8, c.contextInDim}, gen), at::randn({1, c.vecInDim}, gen)};
  p.neg = {at::randn({1, 8, c.contextInDim}, gen), at::randn({1, c.vecInDim}, gen)};
  return p;
}

at::Tensor singleRank(const Problem& pr) {
  auto w = std::make_shared<model::ResidentFluxWeights>(pr.config, pr.get);
  auto t = std::make_shared<model::FluxTransformer>(pr.config, w, std::make_shared<model::LocalAttention>());
  auto d =
      pipeline::TransformerDenoiser::local(pipeline::localTransformer(t), pipeline::imageIds(pr.geom), pr.pos, pr.neg);
  pipeline::FlowMatchEulerScheduler s(pipeline::SchedulerConfig::dev(), pr.steps, pr.geom.tokens());
  return pipeline::denoise(*d, pipeline::initialNoise(8, 1, pr.geom, at::kFloat), s,
                           {pr.config.guidanceEmbed, 3.5, pr.trueCfg});
}

at::Tensor pipeFusion(dist::Runtime& rt, const Problem& pr, const Run& run) {
  rt.setTopology(run.degrees, c10::kCPU);
  const auto& topo = rt.topology();
  auto partition = parallel::partitionStages(pr.config, run.degrees.pipefusion, parallel::Partition{});
  auto w = std::make_shared<model::ResidentFluxWeights>(pr.config, pr.get,
                                                        partition.groupsOf(topo.pipefusionRank(), pr.config));
  auto usp =
      std::make_shared<parallel::UspAttention>(rt.group(dist::GroupKind::kUlysses), rt.group(dist::GroupKind::kRing));
  auto t = std::make_shared<model::FluxTransformer>(pr.config, w, usp);
  parallel::PipeFusionOptions options{
      partition,
      topo.pipefusionRank(),
      {pr.geom.tokenRows(), pr.geom.tokenCols(), run.patches, topo.spDegree(), topo.spRank()},
      c10::kCPU};
  parallel::PipeFusionComms comms{&rt.group(dist::GroupKind::kPipeFusion), &rt.group(dist::GroupKind::kSequence),
                                  &rt.pipelineReturn()};
  auto runner = std::make_shared<parallel::PipeFusionRunner>(t, usp, options, comms);
  pipeline::FlowMatchEulerScheduler s(pipeline::SchedulerConfig::dev(), pr.steps, pr.geom.tokens());
  const bool cfg = run.degrees.cfg > 1;
  const bool positive = !cfg || topo.cfgRank() == 0;
  pipeline::PipeFusionDenoiser d(runner, positive ? pr.pos : pr.neg, cfg ? std::nullopt : std::optional(pr.neg),
                                 cfg ? &rt.group(dist::GroupKind::kCfg) : nullptr, run.warmup);
  return pipeline::denoise(d, pipeline::initialNoise(8, 1, pr.geom, at::kFloat), s,
                           {pr.config.guidanceEmbed, 3.5, pr.trueCfg});
}

std::vector<Run> runsFor(int world, int steps) {
  std::vector<Run> runs;
  if (world != 2 && world != 4 && world >= 2) {  // other world sizes: every rank a stage
    const std::string pp = "pp" + std::to_string(world);
    runs = {{pp + " warm-up=all", {1, world, 1, 1}, world, steps, true},
            {pp + " M=" + std::to_string(world) + " stale", {1, world, 1, 1}, world, 1, false}};
  } else if (world == 2) {
    runs = {{"pp2 warm-up=all", {1, 2, 1, 1}, 2, steps, true},
            {"pp2 M=1", {1, 2, 1, 1}, 1, 1, true},
            {"pp2 M=2 stale", {1, 2, 1, 1}, 2, 1, false},
            {"pp2 M=4 stale", {1, 2, 1, 1}, 4, 1, false}};
  } else if (world == 4) {
    runs = {
        {"pp4 warm-up=all", {1, 4, 1, 1}, 4, steps, true},    {"pp4 M=4 stale", {1, 4, 1, 1}, 4, 1, false},
        {"pp2xU2 warm-up=all", {1, 2, 1, 2}, 2, steps, true}, {"pp2xU2 M=2 stale", {1, 2, 1, 2}, 2, 1, false},
        {"pp2xR2 M=2 stale", {1, 2, 2, 1}, 2, 1, false},      {"pp2xCFG2 warm-up=all", {2, 2, 1, 1}, 2, steps, true},
        {"pp2xCFG2 M=2 stale", {2, 2, 1, 1}, 2, 1, false}};
  }
  return runs;
}

// Stale-K/V bound: the measured errors are about 1e-3 (tiny) after 4 steps; 2e-2 leaves a wide margin
// while still catching a broken buffer layout (which gives errors of order 1).
constexpr double kStaleBound = 2e-2;

void checkRuns(dist::Runtime& rt, const Problem& pr, const std::string& model) {
  const std::vector<Run> runs = runsFor(rt.worldSize(), pr.steps);
  ASSERT_FALSE(runs.empty()) << "PipeFusion against one rank needs at least 2 ranks, got " << rt.worldSize();
  const at::Tensor ref = singleRank(pr);
  for (const Run& run : runs) {
    const at::Tensor out = pipeFusion(rt, pr, run);
    const double err = maxRelError(out, ref);
    if (rt.worldRank() == 0)
      std::printf("[pipefusion] %s %s, %d steps: max relative error %.3e\n", model.c_str(), run.name.c_str(), pr.steps,
                  err);
    if (run.exact) {
      EXPECT_LE(err, 1e-5) << run.name;
    } else {
      EXPECT_LE(err, kStaleBound) << run.name;
      EXPECT_GT(err, 1e-7) << run.name << ": stale K/V must change the result (the patch pipeline did not run)";
    }
  }
}

}  // namespace

void uspCfgForwardMatchesSingleRank(dist::Runtime& rt) {
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
          std::printf("[equivalence] forward %s %s text %lld: max relative error %.3e\n", path.c_str(), name(l).c_str(),
                      static_cast<long long>(T), err);
        EXPECT_LE(err, 1e-5) << path << " " << name(l) << " T=" << T;
        EXPECT_EQ(p.usp->textMode(), (T % (l.ring * l.ulysses) == 0 || l.ring * l.ulysses == 1)
                                         ? parallel::TextMode::kSplit
                                         : parallel::TextMode::kReplicated);
      }
    }
  }
}

void uspCfgGenerateMatchesSingleRank(dist::Runtime& rt) {
  const pipeline::LatentGeometry geom{64, 128, 16};
  const Model m = loadModel("flux_tiny_dev/flux1-tiny-dev.safetensors");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  pipeline::PromptEmbeddings pos{at::randn({1, 8, m.config.contextInDim}, gen), at::randn({1, m.config.vecInDim}, gen)};
  pipeline::PromptEmbeddings neg{at::randn({1, 8, m.config.contextInDim}, gen), at::randn({1, m.config.vecInDim}, gen)};
  const at::Tensor ids = pipeline::imageIds(geom);
  pipeline::FlowMatchEulerScheduler sched(pipeline::SchedulerConfig::dev(), 3, geom.tokens());
  const at::Tensor noise = pipeline::initialNoise(123, 1, geom, at::kFloat);
  auto local = std::make_shared<model::FluxTransformer>(m.config, m.weights, std::make_shared<model::LocalAttention>());
  auto ld = pipeline::TransformerDenoiser::local(pipeline::localTransformer(local), ids, pos, neg);
  const at::Tensor ref = pipeline::denoise(*ld, noise, sched, {true, 3.5, 2.5});
  for (const Layout& l : layouts(rt.worldSize())) {
    if (m.config.numHeads % l.ulysses != 0) continue;
    rt.setTopology({l.cfg, 1, l.ring, l.ulysses}, c10::kCPU);
    ParallelModel p = makeParallel(rt, m);
    pipeline::TransformerFn fn = [sp = p.sp](const model::FluxInputs& in) { return sp->forward(in); };
    std::unique_ptr<pipeline::Denoiser> d;
    if (l.cfg == 2) {
      d = pipeline::TransformerDenoiser::cfgParallel(fn, ids, rt.topology().cfgRank() == 0 ? pos : neg,
                                                     rt.group(dist::GroupKind::kCfg));
    } else {
      d = pipeline::TransformerDenoiser::local(fn, ids, pos, neg);
    }
    const at::Tensor out = pipeline::denoise(*d, noise, sched, {true, 3.5, 2.5});
    const double err = maxRelError(out, ref);
    if (rt.worldRank() == 0)
      std::printf("[equivalence] generate 3 steps %s: max relative error %.3e\n", name(l).c_str(), err);
    EXPECT_LE(err, 1e-5) << name(l);
    // Every rank ends with the same latents.
    at::Tensor all = dist::allGather(rt.world(), out);
    EXPECT_TRUE(at::equal(all.select(0, 0), all.select(0, rt.worldSize() - 1)));
  }
}

void communicationVolumeIsAnalytic(dist::Runtime& rt) {
  const int N = rt.worldSize();
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

void pipeFusionTinyMatchesSingleRank(dist::Runtime& rt) {
  auto ck = std::make_shared<io::FluxCheckpoint>(
      io::FluxCheckpoint::open(fixture("flux_tiny_dev/flux1-tiny-dev.safetensors")));
  checkRuns(rt, makeProblem(ck->config(), ck->getter(at::kFloat)), "tiny");
}

void pipeFusionSmallMatchesSingleRank(dist::Runtime& rt) {
  const model::FluxConfig c = model::FluxConfig::preset("small");
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& g : model::fluxWeightGroups(c))
    for (const auto& t : g.tensors) shapes[t.name] = t.shape;
  Problem pr = makeProblem(c, [shapes](const std::string& n) { return io::synthTensor(0, n, shapes.at(n)); });
  pr.steps = 3;
  checkRuns(rt, pr, "small");
}

void pipeFusionRanksReadTheirStage(dist::Runtime& rt) {
  const int P = rt.worldSize();
  io::FluxCheckpoint ck = io::FluxCheckpoint::open(fixture("flux_tiny_schnell/diffusers"));  // sharded files
  const auto& c = ck.config();
  if (c.depth + c.depthSingle < P) return;  // more stages than blocks
  rt.setTopology({1, P, 1, 1}, c10::kCPU);
  const int stage = rt.topology().pipefusionRank();
  for (const auto mode : {parallel::Partition::Mode::kCompute, parallel::Partition::Mode::kMemory}) {
    io::FluxCheckpoint fresh = io::FluxCheckpoint::open(fixture("flux_tiny_schnell/diffusers"));
    auto partition = parallel::partitionStages(c, P, parallel::Partition{mode, {}});
    const auto groups = partition.groupsOf(stage, c);
    model::ResidentFluxWeights w(c, fresh.getter(at::kFloat), groups);
    std::set<std::string> expect;
    uint64_t bytes = 0;
    for (const auto& g : model::fluxWeightGroups(c))
      if (std::find(groups.begin(), groups.end(), g.name) != groups.end())
        for (const auto& t : g.tensors) {
          expect.insert(t.name);
          bytes += fresh.source(t.name).nbytes();
        }
    EXPECT_EQ(fresh.tensorsLoaded(), expect) << static_cast<int>(mode) << " stage " << stage;
    EXPECT_EQ(fresh.bytesRead(), bytes) << static_cast<int>(mode) << " stage " << stage;
    if (P > 1) {
      EXPECT_LT(fresh.bytesRead(), fresh.totalBytes());
    }
    // Together the stages cover every block exactly once.
    at::Tensor n = at::full({1}, partition.end(stage) - partition.begin(stage), at::kLong);
    rt.world().allReduce(n, dist::ReduceOp::kSum);
    EXPECT_EQ(n.item<int64_t>(), c.depth + c.depthSingle);
  }
}

}  // namespace pardit::test
