// pardit synth / pardit bench
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "commands.h"
#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/io/synth.h"
#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/sampler.h"
#include "pardit/version.h"
#include "parallel_setup.h"
#include "pardit/core/sysinfo.h"
#include "pardit/memory/planner.h"
#include "pardit/metrics/metrics.h"
#include <ATen/CPUGeneratorImpl.h>
#include <optional>
#include <tuple>

namespace pardit::app {

int runSynth(const config::EngineConfig& c) {
  PARDIT_CHECK(!c.out.empty(), "--out is required (the directory to write the checkpoint to)");
  io::SynthOptions o;
  o.config = model::FluxConfig::preset(c.preset);
  o.presetName = c.preset;
  if (c.depth >= 0) o.config.depth = c.depth;
  if (c.depthSingle >= 0) o.config.depthSingle = c.depthSingle;
  PARDIT_CHECK(c.layout == "diffusers" || c.layout == "bfl", "--layout must be diffusers or bfl, got '", c.layout, "'");
  o.layout = c.layout == "bfl" ? io::CheckpointLayout::kBfl : io::CheckpointLayout::kDiffusers;
  o.outDir = c.out;
  o.seed = c.seed;
  const bool big = c.preset == "flux-dev" || c.preset == "flux-schnell" || c.preset == "medium";
  if (c.dtype == "auto") {
    o.dtype = big ? c10::kBFloat16 : c10::kFloat;
  } else {
    try {
      o.dtype = parseDtype(c.dtype);
    } catch (const Error& e) {
      PARDIT_THROW("--dtype: ", e.message());
    }
  }
  PARDIT_CHECK(c.fill == "random" || c.fill == "zeros", "--fill must be random or zeros, got '", c.fill, "'");
  o.zeros = c.fill == "zeros";
  PARDIT_CHECK(c.shardSize > 0, "--shard-size must be positive");
  o.shardSize = c.shardSize;
  PARDIT_CHECK(c.textLen >= 0, "--text-len must be >= 0");
  o.textLen = c.textLen > 0 ? c.textLen : (c.preset == "flux-dev" ? 512 : c.preset == "flux-schnell" ? 256 : c.preset == "small" ? 64 : 16);
  Timer timer;
  io::SynthResult r = io::synthesizeCheckpoint(o);
  logInfo0("wrote ", c.preset, " (", o.config.describe(), ") in the ", c.layout, " layout as ", dtypeName(o.dtype),
           ": ", r.tensorBytes, " tensor bytes in ", r.files, " file(s), ", timer.seconds(), " s");
  logInfo0("model: ", r.modelPath);
  logInfo0("prompt embeddings: ", r.promptEmbedsPath, " (negative: ", r.negativeEmbedsPath, ")");
  return 0;
}

namespace {

// FLOPs of one forward: every Linear (2*M*K*N) plus attention (QK^T and PV: 4*B*H*L^2*D).
double forwardFlops(const model::FluxConfig& m, int64_t B, int64_t Li, int64_t Lt) {
  const double h = m.hiddenSize, L = static_cast<double>(Li + Lt), mlp = m.mlpHidden;
  auto lin = [](double rows, double in, double out) { return 2.0 * rows * in * out; };
  double f = 0;
  f += lin(B * Li, m.inChannels, h) + lin(B * Lt, m.contextInDim, h);
  f += lin(B, 256, h) + lin(B, h, h) + lin(B, m.vecInDim, h) + lin(B, h, h);
  if (m.guidanceEmbed) f += lin(B, 256, h) + lin(B, h, h);
  const double attn = 4.0 * B * L * L * h;
  for (int64_t i = 0; i < m.depth; ++i) {
    f += 2 * lin(B, h, 6 * h);
    f += lin(B * L, h, 3 * h) + lin(B * L, h, h) + lin(B * L, h, mlp) + lin(B * L, mlp, h);
    f += attn;
  }
  for (int64_t i = 0; i < m.depthSingle; ++i) {
    f += lin(B, h, 3 * h) + lin(B * L, h, 3 * h + mlp) + lin(B * L, h + mlp, h) + attn;
  }
  f += lin(B, h, 2 * h) + lin(B * Li, h, m.outChannels);
  return f;
}

// Best-of-n GEMM rate in GFLOP/s for an n x n x n product.
double gemmRate(c10::ScalarType dtype, int64_t n, int reps) {
  at::Tensor a = at::randn({n, n}).to(dtype), b = at::randn({n, n}).to(dtype);
  at::mm(a, b);
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    Timer t;
    at::Tensor c = at::mm(a, b);
    best = std::min(best, t.seconds());
  }
  return 2.0 * n * n * n / best / 1e9;
}

// Times the forward's GEMMs alone (every Linear with its real shape, weights random) and its
// attention calls alone, so the rest of the forward time (norms, RoPE, modulation, copies) follows.
std::pair<double, double> componentTimes(const model::FluxConfig& m, int64_t B, int64_t Li, int64_t Lt,
                                         c10::ScalarType dtype, const c10::Device& device) {
  const int64_t h = m.hiddenSize, mlp = m.mlpHidden, L = Li + Lt;
  std::vector<std::array<int64_t, 3>> shapes;  // rows, in, out
  shapes.push_back({B * Li, m.inChannels, h});
  shapes.push_back({B * Lt, m.contextInDim, h});
  for (int64_t i = 0; i < m.depth; ++i) {
    for (int64_t s = 0; s < 2; ++s) {
      const int64_t rows = B * (s == 0 ? Li : Lt);
      shapes.push_back({B, h, 6 * h});
      shapes.push_back({rows, h, 3 * h});
      shapes.push_back({rows, h, h});
      shapes.push_back({rows, h, mlp});
      shapes.push_back({rows, mlp, h});
    }
  }
  for (int64_t i = 0; i < m.depthSingle; ++i) {
    shapes.push_back({B, h, 3 * h});
    shapes.push_back({B * L, h, 3 * h + mlp});
    shapes.push_back({B * L, h + mlp, h});
  }
  shapes.push_back({B * Li, h, m.outChannels});
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  std::vector<std::array<at::Tensor, 3>> args;
  for (const auto& s : shapes) args.push_back({at::randn({s[0], s[1]}, opts), at::randn({s[2], s[1]}, opts), at::randn({s[2]}, opts)});
  auto gemms = [&] {
    for (const auto& a : args) at::linear(a[0], a[1], a[2]);
  };
  at::Tensor q = at::randn({B, m.numHeads, L, m.headDim()}, opts);
  at::Tensor k = at::randn_like(q), v = at::randn_like(q);
  auto attention = [&] {
    for (int64_t i = 0; i < m.depth + m.depthSingle; ++i) model::localAttention(q, k, v, false);
  };
  gemms();
  attention();
  double g = 1e30, a = 1e30;
  for (int r = 0; r < 3; ++r) {
    Timer t;
    gemms();
    g = std::min(g, t.seconds());
    t.reset();
    attention();
    a = std::min(a, t.seconds());
  }
  return {g, a};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

// PipeFusion: time the denoising loop (warm-up steps, then patch-pipelined steps) and the share of each
// pipelined step a rank spends waiting for the previous stage (pipeline bubbles and transfers).
int benchPipeFusion(const config::EngineConfig& c, dist::Runtime& rt, const model::FluxConfig& mc,
                    std::shared_ptr<model::FluxWeightProvider> weights, const PipeFusionSetup& pf,
                    const pipeline::LatentGeometry& geom, c10::ScalarType dtype, const c10::Device& device,
                    const std::string& modelName) {
  auto runner = makePipeFusionRunner(rt, mc, std::move(weights), pf, device);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  pipeline::PromptEmbeddings emb{at::randn({c.batch, c.textLen, mc.contextInDim}, gen, f32).to(dtype).to(device),
                                 at::randn({c.batch, mc.vecInDim}, gen, f32).to(dtype).to(device)};
  const int steps = pf.warmupSteps + c.iters;
  pipeline::FlowMatchEulerScheduler scheduler(pipeline::SchedulerConfig::dev(), steps, geom.tokens());
  at::Tensor latents = pipeline::initialNoise(0, c.batch, geom, dtype).to(device);
  logInfo0("bench ", modelName, " (", mc.describe(), "), ", dtypeName(dtype), ", ", rt.worldSize(), " rank(s) (",
           rt.topology().degrees().describe(), "), stages ", pf.partition.describe(mc), ", ", pf.layout.patches,
           " patches, ", pf.warmupSteps, " warm-up step(s) + ", c.iters, " pipelined steps, ", at::get_num_threads(),
           " thread(s) per rank");
  rt.world().barrier();
  runner->denoise(latents, emb, std::nullopt, 1.0, scheduler, mc.guidanceEmbed, 3.5, pf.warmupSteps);
  const auto& st = runner->stats();
  std::vector<double> pipelined(st.stepSeconds.begin() + pf.warmupSteps, st.stepSeconds.end());
  double wait = 0, total = 0;
  for (size_t i = pf.warmupSteps; i < st.stepSeconds.size(); ++i) {
    wait += st.stepWaitSeconds[i];
    total += st.stepSeconds[i];
  }
  at::Tensor med = at::tensor({median(pipelined)}, at::kDouble), share = at::tensor({wait / total}, at::kDouble);
  at::Tensor shareMean = share.clone();
  rt.world().allReduce(med, dist::ReduceOp::kMax);
  rt.world().allReduce(share, dist::ReduceOp::kMax);
  rt.world().allReduce(shareMean, dist::ReduceOp::kSum);
  const double meanShare = shareMean.item<double>() / rt.worldSize();
  logInfo0("pipelined step: median ", med.item<double>(), " s (slowest rank); waiting for the previous stage: ",
           100 * meanShare, "% of the step on average, ", 100 * share.item<double>(), "% on the worst rank");
  if (rt.worldRank() == 0) {
    std::printf("BENCH pardit-pipefusion model=%s dtype=%s ranks=%d pipefusion=%d patches=%d ulysses=%d ring=%d "
                "threads=%d image_tokens=%lld text_tokens=%lld step_median_s=%.6f bubble_share_mean=%.4f "
                "bubble_share_max=%.4f\n",
                modelName.c_str(), dtypeName(dtype).c_str(), rt.worldSize(), rt.topology().degrees().pipefusion,
                pf.layout.patches, rt.topology().degrees().ulysses, rt.topology().degrees().ring, at::get_num_threads(),
                static_cast<long long>(geom.tokens()), static_cast<long long>(c.textLen), med.item<double>(), meanShare,
                share.item<double>());
    std::fflush(stdout);
  }
  if (!c.benchOutput.empty()) {
    rt.agree([&] {
      if (rt.worldRank() != 0) return;
      nlohmann::ordered_json j;
      j["tool"] = "pardit";
      j["commit"] = PARDIT_GIT_COMMIT;
      j["model"] = modelName;
      j["ranks"] = rt.worldSize();
      j["pipefusion"] = rt.topology().degrees().pipefusion;
      j["patches"] = pf.layout.patches;
      j["warmup_steps"] = pf.warmupSteps;
      j["step_s"] = st.stepSeconds;
      j["median_s"] = med.item<double>();
      j["bubble_share_mean"] = meanShare;
      j["bubble_share_max"] = share.item<double>();
      std::ofstream out(c.benchOutput);
      PARDIT_CHECK(out.good(), c.benchOutput, ": cannot write (--output)");
      out << j.dump(2) << "\n";
    });
  }
  return 0;
}

int runBench(const config::EngineConfig& c, dist::Runtime& rt) {
  if (c.benchComm) return runCommBench(c, rt);
  const dist::ParallelDegrees degrees = degreesOf(c);
  c10::Device device = c10::kCPU;
  c10::ScalarType dtype = c10::kFloat;
  pipeline::LatentGeometry geom{c.height, c.width, 16};
  model::FluxConfig mc;
  std::optional<io::FluxCheckpoint> ck;
  std::optional<PipeFusionSetup> pf;
  rt.agree([&] {
    checkConsistentOptions(rt, c);
    dist::Topology::validate(degrees, rt.worldSize());
    PARDIT_CHECK(c.iters >= 1 && c.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
    PARDIT_CHECK(c.batch >= 1 && c.batch % degrees.cfg == 0, "--batch must be >= 1 and divisible by --cfg-degree");
    PARDIT_CHECK(c.textLen >= 1, "--text-len must be >= 1 for bench");
    device = dist::deviceForRank(c.device, rt.localRank());
    dtype = pipeline::resolveDtype(c.dtype, device);
    geom.validate();
    if (!c.model.empty()) {
      ck.emplace(io::FluxCheckpoint::open(c.model));
      mc = ck->config();
    } else {
      mc = model::FluxConfig::preset(c.preset);
    }
    PARDIT_CHECK(mc.inChannels == geom.packedChannels(), "bench needs a model with ", geom.packedChannels(),
                 " input channels");
    if (degrees.pipefusion > 1) {
      pf = checkPipeFusion(c, degrees, mc, geom.tokenRows(), geom.tokenCols(), /*patched=*/true);
      PARDIT_CHECK(degrees.cfg == 1, "bench: --pipefusion-degree with --cfg-degree is not benchmarked; use generate");
      PARDIT_CHECK(pf->warmupSteps >= 1, "bench with PipeFusion needs --warmup-steps >= 1");
    } else {
      parallel::checkSequenceParallel(degrees, mc.numHeads, geom.tokens());
    }
  });
  rt.setTopology(degrees, device);
  std::shared_ptr<model::FluxWeightProvider> weights;
  std::string modelName;
  rt.agree([&] {
    std::vector<std::string> groups;
    for (const auto& g : model::fluxWeightGroups(mc)) groups.push_back(g.name);
    if (pf) groups = pf->partition.groupsOf(rt.topology().pipefusionRank(), mc);
    if (ck) {
      weights = std::make_shared<model::ResidentFluxWeights>(mc, ck->getter(dtype, device), groups);
      modelName = c.model;
    } else {
      std::map<std::string, std::vector<int64_t>> shapes;
      for (const auto& g : model::fluxWeightGroups(mc))
        for (const auto& t : g.tensors) shapes[t.name] = t.shape;
      weights = std::make_shared<model::ResidentFluxWeights>(
          mc, [&](const std::string& name) { return io::synthTensor(0, name, shapes.at(name)).to(dtype).to(device); },
          groups);
      modelName = "preset:" + c.preset;
    }
  });
  if (pf) return benchPipeFusion(c, rt, mc, weights, *pf, geom, dtype, device, modelName);
  RankModel rm = makeRankModel(rt, mc, weights);

  const int64_t B = c.batch, Li = geom.tokens(), Lt = c.textLen, part = B / degrees.cfg;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  model::FluxInputs in;
  in.img = at::randn({B, Li, mc.inChannels}, gen, opts).to(dtype);
  in.txt = at::randn({B, Lt, mc.contextInDim}, gen, opts).to(dtype);
  in.pooled = at::randn({B, mc.vecInDim}, gen, opts).to(dtype);
  in.timestep = at::full({B}, 0.5, opts);
  if (mc.guidanceEmbed) in.guidance = at::full({B}, 3.5, opts);
  const int64_t first = rt.topology().cfgRank() * part;
  auto mine = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, first, part).to(device) : t; };
  model::FluxInputs dx{mine(in.img), mine(in.txt), mine(in.pooled), mine(in.timestep), mine(in.guidance),
                       pipeline::imageIds(geom).to(device), pipeline::textIds(Lt).to(device)};
  auto step = [&] {
    at::Tensor out = rm.fn(dx);
    if (degrees.cfg > 1) out = dist::allGather(rt.group(dist::GroupKind::kCfg), out.contiguous());
    if (device.is_cuda()) out = out.cpu();
  };

  const int threads = at::get_num_threads();
  logInfo0("bench ", modelName, " (", mc.describe(), "), ", dtypeName(dtype), " on ", device.str(), ", ",
           rt.worldSize(), " rank(s) (", degrees.describe(), "), ", threads, " thread(s) per rank, batch ", B, ", ",
           Li, " image + ", Lt, " text tokens");
  for (int i = 0; i < c.warmup; ++i) step();
  rt.world().barrier();
  std::vector<double> samples, commShares;
  metrics::MetricsRecorder recorder(rt);
  for (int i = 0; i < c.iters; ++i) {
    const auto before = rt.collectiveTotals();
    Timer t;
    recorder.beginStep();
    step();
    recorder.endStep();
    const double local = t.seconds();
    double comm = 0;
    for (const auto& [name, s] : rt.collectiveTotals())
      if (name != "barrier") comm += s.seconds - before.at(name).seconds;
    // A sample is the slowest rank's time; the communication share is this rank's.
    at::Tensor v = at::tensor({local}, at::kDouble);
    rt.world().allReduce(v, dist::ReduceOp::kMax);
    samples.push_back(v.item<double>());
    commShares.push_back(comm / local);
  }
  at::Tensor share = at::tensor({median(commShares)}, at::kDouble);
  rt.world().allReduce(share, dist::ReduceOp::kMax);
  const double flops = forwardFlops(mc, B, Li, Lt);
  const double med = median(samples), best = *std::min_element(samples.begin(), samples.end());
  const double mean = std::accumulate(samples.begin(), samples.end(), 0.0) / samples.size();
  const double achieved = flops / med / 1e9;
  const bool single = rt.worldSize() == 1;
  const double gemm = device.is_cpu() ? gemmRate(dtype, 1024, 5) : 0.0;
  logInfo0("forward: median ", med, " s, min ", best, " s, mean ", mean, " s over ", c.iters, " iterations");
  logInfo0("work: ", flops / 1e9, " GFLOP per forward -> ", achieved, " GFLOP/s", single ? "" : " (all ranks)");
  logInfo0("communication: ", 100.0 * share.item<double>(), "% of the step time (largest rank); ",
           collectiveSummary(rt));
  if (gemm > 0)
    logInfo0("machine GEMM rate (", dtypeName(dtype), ", 1024^3, ", threads, " thread(s)): ", gemm,
             " GFLOP/s per rank -> forward reaches ", 100.0 * achieved / (gemm * rt.worldSize()), "% of it");
  double gemmSeconds = 0, attnSeconds = 0, restSeconds = 0;
  if (single) {
    std::tie(gemmSeconds, attnSeconds) = componentTimes(mc, B, Li, Lt, dtype, device);
    restSeconds = std::max(0.0, med - gemmSeconds - attnSeconds);
    logInfo0("time split: GEMMs ", gemmSeconds, " s (", 100 * gemmSeconds / med, "%), attention ", attnSeconds,
             " s (", 100 * attnSeconds / med, "%), other ops ", restSeconds, " s (", 100 * restSeconds / med, "%)");
  }
  if (rt.worldRank() == 0) {
    std::printf("BENCH pardit model=%s dtype=%s ranks=%d ulysses=%d ring=%d cfg=%d threads=%d batch=%lld "
                "image_tokens=%lld text_tokens=%lld median_s=%.6f min_s=%.6f gflops=%.3f comm_share=%.4f "
                "gemm_gflops=%.3f\n",
                modelName.c_str(), dtypeName(dtype).c_str(), rt.worldSize(), degrees.ulysses, degrees.ring,
                degrees.cfg, threads, static_cast<long long>(B), static_cast<long long>(Li),
                static_cast<long long>(Lt), med, best, achieved, share.item<double>(), gemm);
    std::fflush(stdout);
  }
  if (!c.metrics.empty()) {
    double sum = 0;
    for (double x : samples) sum += x;
    recorder.setTotalSeconds(sum);
    recorder.setLoad(0.0, ck ? ck->bytesRead() : 0);
    recorder.setPeaks(memory::devicePeakBytes(device.is_cuda(), device.is_cuda() ? device.index() : 0), peakRssBytes());
    const std::string id = recorder.write(c.metrics, {"bench", config::toMap(c), modelName, device.str(), 0,
                                                      B * c.iters});
    logInfo0("metrics: appended run ", id, " to ", c.metrics);
  }
  if (!c.benchOutput.empty()) {
    rt.agree([&] {
      if (rt.worldRank() != 0) return;
      nlohmann::ordered_json j;
      j["tool"] = "pardit";
      j["version"] = PARDIT_VERSION;
      j["commit"] = PARDIT_GIT_COMMIT;
      j["model"] = modelName;
      j["config"] = mc.describe();
      j["dtype"] = dtypeName(dtype);
      j["device"] = device.str();
      j["ranks"] = rt.worldSize();
      j["degrees"] = {{"cfg", degrees.cfg}, {"ring", degrees.ring}, {"ulysses", degrees.ulysses}};
      j["threads"] = threads;
      j["batch"] = B;
      j["image_tokens"] = Li;
      j["text_tokens"] = Lt;
      j["warmup"] = c.warmup;
      j["samples_s"] = samples;
      j["median_s"] = med;
      j["comm_share"] = share.item<double>();
      j["flops"] = flops;
      j["gflops"] = achieved;
      j["gemm_gflops"] = gemm;
      if (single) j["split_s"] = {{"gemm", gemmSeconds}, {"attention", attnSeconds}, {"other", restSeconds}};
      std::ofstream out(c.benchOutput);
      PARDIT_CHECK(out.good(), c.benchOutput, ": cannot write (--output)");
      out << j.dump(2) << "\n";
    });
  }
  return 0;
}

}  // namespace pardit::app
