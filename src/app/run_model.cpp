// pardit forward / pardit generate
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <filesystem>

#include "commands.h"
#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/core/sysinfo.h"
#include "pardit/io/safetensors.h"
#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/sampler.h"
#include "pardit/parallel/cfg_parallel.h"
#include "parallel_setup.h"
#include "pardit/metrics/metrics.h"
#include "pardit/memory/planner.h"
#include "pardit/memory/streamer.h"
#include <optional>

namespace pardit::app {

namespace {

std::string gib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f GiB", static_cast<double>(bytes) / (1ULL << 30));
  return buf;
}

// Reads a tensor that must exist, naming the file, the tensor and why it is needed.
at::Tensor requireTensor(const io::SafetensorsFile& f, const std::string& name, const std::string& why) {
  PARDIT_CHECK(f.contains(name), f.path(), ": tensor '", name, "' not found (", why, ")");
  return f.read(name);
}

void checkShape(const io::SafetensorsFile& f, const std::string& name, const at::Tensor& t,
                const std::vector<int64_t>& expect) {
  bool ok = t.dim() == static_cast<int64_t>(expect.size());
  for (size_t i = 0; ok && i < expect.size(); ++i) ok = expect[i] < 0 || t.size(static_cast<int64_t>(i)) == expect[i];
  if (!ok) {
    std::ostringstream e;
    e << "[";
    for (size_t i = 0; i < expect.size(); ++i) e << (i ? ", " : "") << (expect[i] < 0 ? std::string("*") : std::to_string(expect[i]));
    e << "]";
    PARDIT_THROW(f.path(), ": tensor '", name, "' has shape ", t.sizes(), ", expected ", e.str());
  }
}

// Reads prompt embeddings from a file holding prompt_embeds / pooled_prompt_embeds (or the negative_*
// names) and checks them against the model.
pipeline::PromptEmbeddings readEmbeddings(const std::string& path, const model::FluxConfig& mc, const char* flag) {
  auto f = io::SafetensorsFile::open(path);
  std::string pe = "prompt_embeds", pp = "pooled_prompt_embeds";
  if (!f->contains(pe) && f->contains("negative_prompt_embeds")) {
    pe = "negative_prompt_embeds";
    pp = "negative_pooled_prompt_embeds";
  }
  pipeline::PromptEmbeddings e;
  const std::string why = std::string("expected by ") + flag;
  e.promptEmbeds = requireTensor(*f, pe, why);
  e.pooled = requireTensor(*f, pp, why);
  checkShape(*f, pe, e.promptEmbeds, {-1, -1, mc.contextInDim});
  checkShape(*f, pp, e.pooled, {e.promptEmbeds.size(0), mc.vecInDim});
  return e;
}

}  // namespace

void applyRuntimeOptions(const config::EngineConfig& c) {
  if (c.quiet) {
    setLogLevel(LogLevel::kError);
  } else if (c.logLevel == "debug") {
    setLogLevel(LogLevel::kDebug);
  } else if (c.logLevel == "info") {
    setLogLevel(LogLevel::kInfo);
  } else if (c.logLevel == "warn") {
    setLogLevel(LogLevel::kWarn);
  } else if (c.logLevel == "error") {
    setLogLevel(LogLevel::kError);
  } else {
    PARDIT_THROW("--log-level must be debug, info, warn or error, got '", c.logLevel, "'");
  }
  PARDIT_CHECK(c.threads >= 0, "--threads must be >= 0, got ", c.threads);
  if (c.threads > 0) {
    at::set_num_threads(c.threads);
    at::set_num_interop_threads(1);
  }
}

namespace {

// Weights of the whole model on this rank's device, read from the checkpoint.
// The memory plan of this rank; a plan that cannot fit is a one-line error on every rank, before any
// weight is read.
memory::RankPlan makePlan(const config::EngineConfig& c, dist::Runtime& rt, const model::FluxConfig& mc,
                          const std::optional<PipeFusionSetup>& pf, c10::ScalarType dtype, int64_t batch,
                          int64_t imageTokens, int64_t textTokens, const c10::Device& device) {
  memory::RankPlan plan;
  rt.agree([&] {
    plan = planFor(c, workloadOf(rt.topology(), mc, pf, dtype, batch, imageTokens, textTokens), device, rt.localSize());
    PARDIT_CHECK(plan.fits, "rank ", rt.worldRank(), ": ", plan.problem);
  });
  if (plan.anyStreamed()) {
    size_t n = 0;
    for (const auto& g : plan.groups) n += g.streamed;
    logInfo0("memory plan (", c.offload, ", budget ", memory::formatBytes(plan.budget), "): ", n, " weight groups (",
             memory::formatBytes(plan.streamedBytes), ") streamed, ", memory::formatBytes(plan.residentBytes),
             " resident, planned peak ", memory::formatBytes(plan.total()));
  }
  return plan;
}

// This rank's weights under its plan (a failure on any rank ends every rank), and the load summary.
std::shared_ptr<model::FluxWeightProvider> loadRankWeights(const config::EngineConfig& c, dist::Runtime& rt,
                                                           const io::FluxCheckpoint& ck, const memory::RankPlan& plan,
                                                           c10::ScalarType dtype, const c10::Device& device,
                                                           double* seconds) {
  std::shared_ptr<model::FluxWeightProvider> weights;
  rt.agree([&] {
    Timer t;
    weights = loadPlannedWeights(c, ck, plan, dtype, device);
    *seconds = t.seconds();
  });
  logInfo0("model ", c.model, " (", io::layoutName(ck.layout()), "): ", ck.config().describe());
  logInfo0("loaded ", gib(ck.bytesRead()), " of weights in ", *seconds, " s as ", dtypeName(dtype), " on ",
           device.str(), " (", rt.topology().degrees().describe(), ")");
  return weights;
}

// One line from every rank: what it read and its peak memory.
void rankSummary(dist::Runtime& rt, const io::FluxCheckpoint& ck, const std::string& role,
                 const std::shared_ptr<model::FluxWeightProvider>& weights = nullptr,
                 const c10::Device& device = c10::kCPU) {
  std::string streaming;
  if (device.is_cuda())
    streaming += ", peak device memory " + std::to_string(memory::devicePeakBytes(true, device.index())) +
                 " bytes (caching allocator)";
  if (auto s = std::dynamic_pointer_cast<memory::StreamingFluxWeights>(weights))
    streaming = ", weights on the device peaked at " + std::to_string(s->accountant().peak()) + " bytes (" +
                std::to_string(s->streamedGroupsFetched()) + " groups streamed, " + std::to_string(s->waitSeconds()) +
                " s waiting for them)";
  logInfo("rank summary: ", role, "read ", ck.bytesRead(), " bytes of ", ck.totalBytes(), " in the checkpoint (",
          ck.tensorsLoaded().size(), " tensors), peak host RSS ", peakRssBytes(), " bytes", streaming);
}

}  // namespace

int runForward(const config::EngineConfig& c, dist::Runtime& rt) {
  const dist::ParallelDegrees degrees = degreesOf(c);
  c10::Device device = c10::kCPU;
  c10::ScalarType dtype = c10::kFloat;
  std::optional<io::FluxCheckpoint> ck;
  model::FluxInputs x;
  std::shared_ptr<io::SafetensorsFile> in;
  std::optional<PipeFusionSetup> pf;
  // Every check runs on every rank before any weight is read; a failure on any rank ends all of them.
  rt.agree([&] {
    checkConsistentOptions(rt, c);
    dist::Topology::validate(degrees, rt.worldSize());
    PARDIT_CHECK(!c.model.empty(), "--model is required");
    PARDIT_CHECK(!c.inputs.empty(), "--inputs is required (a safetensors file with the transformer inputs)");
    PARDIT_CHECK(!c.output.empty(), "--output is required");
    device = dist::deviceForRank(c.device, rt.localRank());
    dtype = pipeline::resolveDtype(c.dtype, device);
    ck.emplace(io::FluxCheckpoint::open(c.model));
    const auto& mc = ck->config();
    in = io::SafetensorsFile::open(c.inputs);
    x.img = requireTensor(*in, "hidden_states", "packed latents [B, L, C]");
    x.txt = requireTensor(*in, "encoder_hidden_states", "text embeddings [B, T, D]");
    x.pooled = requireTensor(*in, "pooled_projections", "pooled text embedding [B, P]");
    x.timestep = requireTensor(*in, "timestep", "[B] sigma in [0, 1]");
    x.imgIds = requireTensor(*in, "img_ids", "[L, 3] image position ids");
    x.txtIds = requireTensor(*in, "txt_ids", "[T, 3] text position ids");
    if (mc.guidanceEmbed) x.guidance = requireTensor(*in, "guidance", "the model has guidance embeddings");
    if (x.imgIds.dim() == 3) x.imgIds = x.imgIds[0];  // the deprecated batched form
    if (x.txtIds.dim() == 3) x.txtIds = x.txtIds[0];
    checkShape(*in, "hidden_states", x.img, {-1, -1, mc.inChannels});
    const int64_t B = x.img.size(0), L = x.img.size(1);
    checkShape(*in, "encoder_hidden_states", x.txt, {B, -1, mc.contextInDim});
    checkShape(*in, "pooled_projections", x.pooled, {B, mc.vecInDim});
    PARDIT_CHECK(x.timestep.numel() == B || x.timestep.numel() == 1, in->path(), ": tensor 'timestep' has ",
                 x.timestep.numel(), " values, expected ", B);
    x.timestep = x.timestep.reshape({-1}).expand({B});
    checkShape(*in, "img_ids", x.imgIds, {L, 3});
    checkShape(*in, "txt_ids", x.txtIds, {x.txt.size(1), 3});
    if (x.guidance.defined()) {
      PARDIT_CHECK(x.guidance.numel() == B || x.guidance.numel() == 1, in->path(), ": tensor 'guidance' has ",
                   x.guidance.numel(), " values, expected ", B);
      x.guidance = x.guidance.reshape({-1}).expand({B});
    }
    PARDIT_CHECK(B % degrees.cfg == 0, "--cfg-degree ", degrees.cfg, " splits the batch, but ", in->path(),
                 " has batch ", B);
    if (degrees.pipefusion > 1) {
      pf = checkPipeFusion(c, degrees, mc, L, 1, /*patched=*/false);
    } else {
      parallel::checkSequenceParallel(degrees, mc.numHeads, L);
    }
  });
  rt.setTopology(degrees, device);
  const auto& mc = ck->config();
  std::shared_ptr<model::FluxWeightProvider> weights;
  double loadSeconds = 0;
  memory::RankPlan plan = makePlan(c, rt, mc, pf, dtype, x.img.size(0) / degrees.cfg, x.img.size(1), x.txt.size(1), device);
  weights = loadRankWeights(c, rt, *ck, plan, dtype, device, &loadSeconds);
  if (pf) logInfo0("pipeline stages: ", pf->partition.describe(mc));
  RankModel rm;
  std::unique_ptr<parallel::PipeFusionRunner> runner;
  if (pf) {
    runner = makePipeFusionRunner(rt, mc, weights, *pf, device);
    rm.fn = [&runner](const model::FluxInputs& in) { return runner->forward(in); };
  } else {
    rm = makeRankModel(rt, mc, weights);
  }

  // CFG parallelism splits the batch: cfg rank i takes the i-th half.
  const int64_t B = x.img.size(0), part = B / degrees.cfg, first = rt.topology().cfgRank() * part;
  auto mine = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, first, part).to(device) : t; };
  model::FluxInputs dx{mine(x.img), mine(x.txt), mine(x.pooled), mine(x.timestep), mine(x.guidance),
                       x.imgIds.to(device), x.txtIds.to(device)};
  metrics::MetricsRecorder recorder(rt);
  recorder.setLoad(loadSeconds, ck->bytesRead());
  Timer timer;
  recorder.beginStep();
  at::Tensor out = rm.fn(dx);
  if (degrees.cfg > 1) {
    at::Tensor all = dist::allGather(rt.group(dist::GroupKind::kCfg), out.contiguous());  // [cfg, B/cfg, L, C]
    out = all.reshape({B, out.size(1), out.size(2)});
  }
  recorder.endStep();
  const double seconds = timer.seconds();
  if (!c.metrics.empty()) {
    recorder.setTotalSeconds(seconds);
    recorder.setPeaks(memory::devicePeakBytes(device.is_cuda(), device.is_cuda() ? device.index() : 0), peakRssBytes());
    const std::string id = recorder.write(c.metrics, {"forward", config::toMap(c), c.model, device.str(), 0, B});
    logInfo0("metrics: appended run ", id, " to ", c.metrics);
  }
  rt.agree([&] {
    if (rt.worldRank() == 0) io::writeSafetensors(c.output, {{"sample", out.cpu()}}, {{"format", "pt"}});
  });
  logInfo0("forward [", B, ", ", x.img.size(1), ", ", mc.inChannels, "] in ", seconds, " s; wrote 'sample' ",
           out.sizes(), " to ", c.output);
  logInfo0("communication: ", collectiveSummary(rt));
  rankSummary(rt, *ck, pf ? "stage " + std::to_string(rt.topology().pipefusionRank()) + ": " : "", weights, device);
  return 0;
}

int runGenerate(const config::EngineConfig& c, dist::Runtime& rt) {
  const dist::ParallelDegrees degrees = degreesOf(c);
  c10::Device device = c10::kCPU;
  c10::ScalarType dtype = c10::kFloat;
  std::optional<io::FluxCheckpoint> ck;
  pipeline::LatentGeometry geom{c.height, c.width, 16};
  pipeline::PromptEmbeddings pos;
  std::optional<pipeline::PromptEmbeddings> neg;
  pipeline::SchedulerConfig schedCfg;
  std::optional<PipeFusionSetup> pf;
  rt.agree([&] {
    checkConsistentOptions(rt, c);
    dist::Topology::validate(degrees, rt.worldSize());
    PARDIT_CHECK(!c.model.empty(), "--model is required");
    PARDIT_CHECK(!c.promptEmbeds.empty(),
                 "--prompt-embeds is required (safetensors with prompt_embeds and pooled_prompt_embeds)");
    PARDIT_CHECK(c.steps >= 1, "--steps must be at least 1, got ", c.steps);
    PARDIT_CHECK(std::isfinite(c.guidanceScale), "--guidance-scale must be finite");
    PARDIT_CHECK(std::isfinite(c.trueCfgScale), "--true-cfg-scale must be finite");
    PARDIT_CHECK(!(c.trueCfgScale > 1.0 && c.negativePromptEmbeds.empty()), "--true-cfg-scale ", c.trueCfgScale,
                 " needs --negative-prompt-embeds");
    PARDIT_CHECK(degrees.cfg == 1 || (c.trueCfgScale > 1.0 && !c.negativePromptEmbeds.empty()),
                 "--cfg-degree 2 runs the two branches of true CFG and needs --negative-prompt-embeds and "
                 "--true-cfg-scale > 1");
    device = dist::deviceForRank(c.device, rt.localRank());
    dtype = pipeline::resolveDtype(c.dtype, device);
    geom.validate();
    ck.emplace(io::FluxCheckpoint::open(c.model));
    const auto& mc = ck->config();
    PARDIT_CHECK(mc.inChannels == geom.packedChannels(), c.model, ": the model takes ", mc.inChannels,
                 " input channels; text-to-image needs ", geom.packedChannels());
    pos = readEmbeddings(c.promptEmbeds, mc, "--prompt-embeds");
    if (!c.negativePromptEmbeds.empty()) {
      neg = readEmbeddings(c.negativePromptEmbeds, mc, "--negative-prompt-embeds");
      PARDIT_CHECK(neg->promptEmbeds.size(0) == pos.promptEmbeds.size(0), c.negativePromptEmbeds, ": batch ",
                   neg->promptEmbeds.size(0), " differs from the batch ", pos.promptEmbeds.size(0), " of ",
                   c.promptEmbeds);
    }
    schedCfg = pipeline::resolveSchedule(c.schedule, *ck);
    if (degrees.pipefusion > 1) {
      pf = checkPipeFusion(c, degrees, mc, geom.tokenRows(), geom.tokenCols(), /*patched=*/true);
      PARDIT_CHECK(!(neg && degrees.cfg == 1) || neg->promptEmbeds.size(1) == pos.promptEmbeds.size(1),
                   "with --pipefusion-degree > 1 and without --cfg-degree 2, the prompt and negative prompt "
                   "embeddings need the same token count (", pos.promptEmbeds.size(1), " vs ",
                   neg ? neg->promptEmbeds.size(1) : 0, ")");
    } else {
      parallel::checkSequenceParallel(degrees, mc.numHeads, geom.tokens());
    }
  });
  rt.setTopology(degrees, device);
  const auto& mc = ck->config();
  const int64_t B = pos.promptEmbeds.size(0);
  std::shared_ptr<model::FluxWeightProvider> weights;
  double loadSeconds = 0;
  const int64_t branchBatch = B * ((pf && degrees.cfg == 1 && neg && c.trueCfgScale > 1.0) ? 2 : 1);
  memory::RankPlan plan = makePlan(c, rt, mc, pf, dtype, branchBatch, geom.tokens(), pos.promptEmbeds.size(1), device);
  weights = loadRankWeights(c, rt, *ck, plan, dtype, device, &loadSeconds);
  if (pf) logInfo0("pipeline stages: ", pf->partition.describe(mc), "; ", pf->layout.patches, " patches, ",
                   pf->warmupSteps, " warm-up step(s)");
  auto onDevice = [&](pipeline::PromptEmbeddings e) {
    e.promptEmbeds = e.promptEmbeds.to(device).to(dtype);
    e.pooled = e.pooled.to(device).to(dtype);
    return e;
  };
  const at::Tensor ids = pipeline::imageIds(geom).to(device);
  std::unique_ptr<pipeline::Denoiser> denoiser;
  bool trueCfg = neg.has_value() && c.trueCfgScale > 1.0;
  RankModel rm;
  std::unique_ptr<parallel::PipeFusionRunner> runner;
  if (pf) {
    runner = makePipeFusionRunner(rt, mc, weights, *pf, device);
  } else {
    rm = makeRankModel(rt, mc, weights);
  }
  if (pf) {
    // PipeFusion runs its own per-patch loop.
  } else if (degrees.cfg == 2) {
    const bool positive = rt.topology().cfgRank() == 0;
    denoiser = std::make_unique<parallel::CfgParallelDenoiser>(rm.fn, onDevice(positive ? pos : *neg), ids,
                                                               rt.group(dist::GroupKind::kCfg), c.trueCfgScale);
  } else {
    if (neg) neg = onDevice(*neg);
    denoiser = std::make_unique<pipeline::LocalDenoiser>(rm.fn, onDevice(pos), ids, neg, c.trueCfgScale);
  }
  pipeline::FlowMatchEulerScheduler scheduler(schedCfg, c.steps, geom.tokens());
  // The same noise on every rank: a pure function of the seed and the shape.
  at::Tensor latents = pipeline::initialNoise(c.seed, B, geom, dtype).to(device);
  logInfo0("generate ", c.width, "x", c.height, " (", geom.tokens(), " image tokens, ", pos.promptEmbeds.size(1),
           " text tokens), batch ", B, ", ", c.steps, " steps, ", schedCfg.dynamicShift ? "shifted" : "plain",
           " schedule", mc.guidanceEmbed ? ", guidance " + std::to_string(c.guidanceScale) : std::string(),
           trueCfg ? ", true CFG " + std::to_string(c.trueCfgScale) : std::string());
  metrics::MetricsRecorder recorder(rt);
  recorder.setLoad(loadSeconds, ck->bytesRead());
  const uint64_t rssBeforeLoop = currentRssBytes();
  Timer total;
  recorder.beginStep();
  auto progress = [&](const pipeline::StepReport& r) {
    recorder.endStep();
    recorder.beginStep();
    const double eta = total.seconds() / (r.step + 1) * (r.steps - r.step - 1);
    char line[128];
    std::snprintf(line, sizeof(line), "step %d/%d  %.3f s  eta %.1f s", r.step + 1, r.steps, r.seconds, eta);
    logInfo0(line);
  };
  if (runner) {
    const bool positive = degrees.cfg == 1 || rt.topology().cfgRank() == 0;
    const pipeline::PromptEmbeddings branch = onDevice(positive ? pos : *neg);
    std::optional<pipeline::PromptEmbeddings> pairNeg;
    if (degrees.cfg == 1 && trueCfg) pairNeg = onDevice(*neg);
    latents = runner->denoise(latents, branch, pairNeg, trueCfg ? c.trueCfgScale : 1.0, scheduler, mc.guidanceEmbed,
                              c.guidanceScale, pf->warmupSteps, progress);
    logInfo0("pipeline: ", runner->stats().waitSeconds, " s of ", runner->stats().seconds,
             " s waiting for the previous stage on rank 0; K/V buffers ", runner->kvBuffers().bytes(), " bytes");
  } else {
    latents = pipeline::denoise(*denoiser, latents, scheduler, mc.guidanceEmbed, c.guidanceScale, progress);
  }
  const double denoiseSeconds = total.seconds();
  logInfo0("denoised in ", denoiseSeconds, " s");
  if (device.is_cpu() && !plan.anyStreamed()) {
    // On the CPU the loop's memory growth is its activations (and buffers): compare with the plan's estimate.
    const uint64_t grown = peakRssBytes() > rssBeforeLoop ? peakRssBytes() - rssBeforeLoop : 0;
    logInfo0("activations and buffers: planned ", plan.activationBytes + plan.kvBytes + plan.commBytes,
             " bytes, measured ", grown, " bytes (peak RSS growth during the loop)");
  }
  if (!c.metrics.empty()) {
    recorder.setTotalSeconds(denoiseSeconds);
    recorder.setPeaks(memory::devicePeakBytes(device.is_cuda(), device.is_cuda() ? device.index() : 0), peakRssBytes());
    metrics::RunInfo info{"generate", config::toMap(c), c.model, device.str(), pf ? pf->warmupSteps : 0, B};
    const std::string id = recorder.write(c.metrics, info);
    logInfo0("metrics: appended run ", id, " to ", c.metrics);
  }
  logInfo0("communication: ", collectiveSummary(rt));
  if (!c.saveLatents.empty()) {
    rt.agree([&] {
      if (rt.worldRank() == 0) io::writeSafetensors(c.saveLatents, {{"latents", latents.cpu()}}, {{"format", "pt"}});
    });
    logInfo0("wrote 'latents' ", latents.sizes(), " to ", c.saveLatents);
  } else {
    logWarn("no output requested: pass --save-latents FILE to keep the result");
  }
  rankSummary(rt, *ck, pf ? "stage " + std::to_string(rt.topology().pipefusionRank()) + ": " : "", weights, device);
  return 0;
}

}  // namespace pardit::app
