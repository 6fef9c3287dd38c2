#include "pardit/pipeline/engine.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <numeric>
#include <optional>

#include "engine_impl.h"
#include "options_sync.h"
#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/sysinfo.h"
#include "pardit/core/timer.h"
#include "pardit/dist/runtime.h"
#include "pardit/dist/watchdog.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/png.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/synth.h"
#include "pardit/io/vae_checkpoint.h"
#include "pardit/memory/streamer.h"
#include "pardit/metrics/metrics.h"
#include "pardit/model/vae.h"
#include "pardit/parallel/patch_vae.h"
#include "pardit/pipeline/inputs.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "pardit/version.h"
#include "rank_setup.h"

namespace pardit::pipeline {

using detail::PipeFusionLayout;

namespace {
// The hash of a tensor's bytes (what ranks compare to know they hold the same input).
std::string tensorHash(const at::Tensor& t) {
  const at::Tensor c = t.contiguous().cpu();
  return formatHash(fnv1a(c.data_ptr(), c.nbytes()));
}

}  // namespace

std::vector<std::string> GenerateRequest::imagePaths(int64_t images) const {
  return outputs.empty() ? pipeline::imagePaths(output, images) : outputs;
}

std::vector<std::string> imagePaths(const std::string& path, int64_t count) {
  if (count == 1) return {path};
  const std::filesystem::path p(path);
  std::vector<std::string> out;
  for (int64_t i = 0; i < count; ++i) {
    std::filesystem::path q = p;
    q.replace_filename(p.stem().string() + "-" + std::to_string(i) +
                       (p.has_extension() ? p.extension().string() : ".png"));
    out.push_back(q.string());
  }
  return out;
}

Engine::Engine(EngineOptions options, dist::Runtime& runtime)
    : impl_(std::make_unique<Impl>(std::move(options), runtime)) {
  impl_->open();
}

Engine::~Engine() = default;

const EngineOptions& Engine::options() const { return impl_->options; }
const model::FluxConfig& Engine::modelConfig() const { return impl_->config; }
const std::string& Engine::modelName() const { return impl_->modelName; }
c10::Device Engine::device() const { return impl_->device; }
c10::ScalarType Engine::dtype() const { return impl_->dtype; }

void Engine::Impl::open() {
  degrees = options.degrees();
  // A stopped or unreachable rank ends the job instead of hanging it (one rank has nobody to wait for).
  rt.watchdog().setTimeout(rt.worldSize() > 1 ? options.collectiveTimeout : 0.0);
  rt.watchdog().setContext("opening the model");
  std::vector<std::pair<std::string, std::string>> checkpointFiles;
  rt.agree([&] {
    options.check();
    rt.checkSame(detail::syncedFields(options), "options");
    PARDIT_CHECK(options.dataParallelDegree == 1 || rt.worldSize() == degrees.worldSize(), "--data-parallel-degree ",
                 options.dataParallelDegree,
                 ": an Engine runs on one replica group (dist::Runtime::replicaGroup); pipeline::runQueue deals "
                 "requests to the groups");
    dist::Topology::validate(degrees, rt.worldSize());
    device = dist::deviceForRank(options.device, rt.localRank());
    dtype = resolveDtype(options.dtype, device);
    if (!options.model.empty()) {
      checkpoint.emplace(io::FluxCheckpoint::open(options.model));
      if (!checkpoint->choice().empty()) logInfo0(checkpoint->choice());
      for (const auto& finding : checkpoint->findings()) {
        PARDIT_CHECK(!options.strict, finding, " (--strict)");
        logWarn0(finding, " (ignored; --strict makes this an error)");
      }
      config = checkpoint->config();
      modelName = options.model;
      weightFormat = resolveWeightFormat(options.weightDtype, &*checkpoint);
      read = checkpointReader(*checkpoint, weightFormat);
      // The same path may name another file on another node: every rank must read the same checkpoint
      // (compared in the next phase: a collective must not follow a check that may fail on some ranks only).
      for (const auto& f : checkpoint->files())
        checkpointFiles.emplace_back("--model file " + std::filesystem::path(f->path()).filename().string(),
                                     "size " + std::to_string(f->fileSize()) + ", header hash " +
                                         formatHash(f->headerHash()) + ", data sample hash " +
                                         formatHash(f->sampleHash()));
    } else {
      PARDIT_CHECK(!options.preset.empty(), "--model is required (or --preset for an in-memory model)");
      config = model::FluxConfig::preset(options.preset);
      modelName = "preset:" + options.preset;
      std::map<std::string, std::vector<int64_t>> shapes;
      for (const auto& g : model::fluxWeightGroups(config))
        for (const auto& t : g.tensors) shapes[t.name] = t.shape;
      weightFormat = resolveWeightFormat(options.weightDtype, nullptr);
      read = formatReader(
          weightFormat,
          [shapes](const std::string& n, c10::ScalarType t, c10::Device d) {
            return io::synthTensor(0, n, shapes.at(n)).to(t).to(d);
          },
          [shapes](const std::string& n, c10::Device d) {
            return model::quantizeFp8Rows(io::synthTensor(0, n, shapes.at(n)).to(d));
          });
    }
    // The metrics file is appended to after the run: checked now (after the checkpoint's files are known
    // as inputs), before any weight is read.
    if (!options.metrics.empty()) metrics::checkMetricsFile(options.metrics);
  });
  rt.agree([&] {
    rt.checkSame(checkpointFiles, "the checkpoint files",
                 "every rank must read the same checkpoint (a node with another copy under the same path?)");
  });
  rt.setTopology(degrees, device);
  if (checkpoint) logInfo0("model ", modelName, " (", io::layoutName(checkpoint->layout()), "): ", config.describe());
}

// ---- plan and load -------------------------------------------------------------------------------------

memory::RankPlan Engine::Impl::planRun(Run& run, int64_t batch, int64_t imageTokens, int64_t textTokens) {
  batch = std::max(batch, capacity.batch);  // Engine::reserve: one plan for every request up to its size
  imageTokens = std::max(imageTokens, capacity.imageTokens);
  textTokens = std::max(textTokens, capacity.textTokens);
  memory::RankPlan plan;
  rt.agree([&] {
    const auto work =
        detail::workloadOf(rt.topology(), config, run.pipefusion, dtype, weightFormat, batch, imageTokens, textTokens);
    plan = memory::planRank(work, detail::budgetOf(options, device, rt.localSize()), options.offload);
    PARDIT_CHECK(plan.fits, "rank ", rt.worldRank(), ": ", plan.problem);
    memory::chooseStreamSource(plan, options.streamFrom, device.is_cuda(),
                               detail::hostBudgetOf(options, rt.localSize()));
    if (options.cudaGraphs) detail::checkCudaGraphs(device, rt.topology(), run.pipefusion.has_value(), plan);
    model::checkAttentionKernel(detail::attentionKernelOf(options.attention), device, dtype);
  });
  logDebug("plan: streamed_bytes=", plan.streamedBytes, " resident_bytes=", plan.residentBytes,
           " total_bytes=", plan.total());
  return plan;
}

std::shared_ptr<model::FluxWeightProvider> Engine::Impl::loadRun(Run& run, const memory::RankPlan& plan) {
  std::string key;
  for (const auto& g : plan.groups) key += g.name + (g.streamed ? "~" : "=") + ";";
  if (loaded && loaded->key == key) return loaded->weights;
  loaded.reset();  // release the previous weights before loading others
  if (plan.anyStreamed()) {
    logInfo0("memory plan (offload ", offloadName(options.offload), ", budget ", formatBytes(plan.budget),
             "): ", plan.streamedGroups(), " weight groups (", formatBytes(plan.streamedBytes), ") streamed from ",
             plan.streamFromHost ? "a host copy" : "the file", " (", formatBytes(plan.hostBytes), " of host memory, ",
             plan.prefetchDepth, " ahead), ", formatBytes(plan.residentBytes), " resident, planned peak ",
             formatBytes(plan.total()));
  }
  std::shared_ptr<model::FluxWeightProvider> weights;
  rt.agree([&] {
    Timer t;
    const LoadingAllocations loading;
    weights = detail::loadPlannedWeights(config, read, checkpoint ? &*checkpoint : nullptr, plan, dtype, weightFormat,
                                         device);
    run.loadSeconds = t.seconds();
  });
  logInfo0(checkpoint ? "loaded " : "made ", formatBytes(plan.residentBytes + plan.streamedBytes), " of ",
           checkpoint ? "weights" : "synthetic weights", " in ", formatSeconds(run.loadSeconds), " as ", weightsName(),
           " on ", device.str(), " (", degrees.describe(), ")");
  if (run.pipefusion) logInfo0("pipeline stages: ", run.pipefusion->partition.describe(config));
  loaded = Loaded{plan, key, weights};
  return weights;
}

std::shared_ptr<model::FluxWeightProvider> Engine::Impl::prepare(Run& run, int64_t batch, int64_t imageTokens,
                                                                 int64_t textTokens) {
  return loadRun(run, planRun(run, batch, imageTokens, textTokens));
}

// ---- outputs, metrics, summaries -----------------------------------------------------------------------

std::string Engine::Impl::weightsName() const {
  return weightFormat == model::WeightFormat::kFp8 ? "fp8 e4m3 (row scales) + " + dtypeName(dtype) : dtypeName(dtype);
}

void Engine::Impl::writeOutput(const std::string& path, const std::string& flag, const std::string& tensorName,
                               const at::Tensor& value, std::map<std::string, std::string> metadata) const {
  if (path.empty()) return;
  metadata["format"] = "pt";
  rt.agree([&] {
    if (rt.worldRank() == 0) io::writeSafetensors(path, {{tensorName, value.cpu()}}, metadata);
  });
  logInfo0("wrote '", tensorName, "' ", value.sizes(), " to ", path, " (", flag, ")");
}

std::string Engine::Impl::finishMetrics(Run& run, const std::string& command, double seconds, int warmupSteps,
                                        int64_t images, const std::map<std::string, double>& queue) {
  if (options.metrics.empty()) return "";
  run.recorder.setLoad(run.loadSeconds, bytesRead());
  run.recorder.setTotalSeconds(seconds);
  run.recorder.setPeaks(memory::devicePeakBytes(device.is_cuda(), device.is_cuda() ? device.index() : 0),
                        peakRssBytes());
  auto resolved = options.provenance;
  if (resolved.empty())
    for (const auto& [name, value] : detail::syncedFields(options)) resolved[name] = value;
  resolved["weight-dtype"] = weightFormat == model::WeightFormat::kFp8 ? "fp8" : "compute";  // auto resolved
  metrics::RunInfo info{command,    resolved,  modelName, device.str(),     warmupSteps, images,
                        run.height, run.width, run.steps, dtypeName(dtype), queue};
  const std::string id = run.recorder.write(options.metrics, info);
  logInfo0("metrics: appended run ", id, " to ", options.metrics);
  return id;
}

void Engine::Impl::rankSummary(const std::shared_ptr<model::FluxWeightProvider>& weights,
                               const std::optional<PipeFusionLayout>& pf) const {
  std::string detail;
  if (device.is_cuda())
    detail +=
        ", peak device memory " + formatBytes(memory::devicePeakBytes(true, device.index())) + " (caching allocator)";
  if (auto s = std::dynamic_pointer_cast<memory::StreamingFluxWeights>(weights)) {
    detail += ", weights on the device peaked at " + formatBytes(s->accountant().peak()) + " (" +
              std::to_string(s->streamedGroupsFetched()) + " groups streamed from " +
              (s->fromHost() ? "a host copy" : "the file") + ", " + formatSeconds(s->waitSeconds()) +
              " waiting for them on the host" +
              (device.is_cuda() ? ", " + formatSeconds(s->deviceWaitSeconds()) + " on the GPU's compute stream"
                                : std::string()) +
              "); streaming held " + formatBytes(s->hostBytes()) + " of host memory";
    if (s->storedReadSeconds() > 0)
      detail += "; read " + formatBytes(s->storedBytesRead()) + " from the file at " +
                formatRate(static_cast<double>(s->storedBytesRead()) / s->storedReadSeconds()) + " with " +
                std::to_string(s->readThreads()) + " threads";
  }
  const std::string role = pf ? "stage " + std::to_string(rt.topology().pipefusionRank()) + ": " : "";
  const std::string source = checkpoint ? "read " + formatBytes(checkpoint->bytesRead()) + " of " +
                                              formatBytes(checkpoint->totalBytes()) + " in the checkpoint (" +
                                              std::to_string(checkpoint->tensorsLoaded().size()) + " tensors), "
                                        : std::string();
  logInfo("rank summary: ", role, source, "peak host RSS ", formatBytes(peakRssBytes()), detail);
  // Exact counts for scripts (bench/memory_proof.sh): --log-level debug.
  logDebug("rank bytes: stage=", pf ? rt.topology().pipefusionRank() : 0,
           " read=", checkpoint ? checkpoint->bytesRead() : 0, " vae_read=", vae ? vae->bytesRead() : 0,
           " text_read=", textBytesRead, " total=", checkpoint ? checkpoint->totalBytes() : 0,
           " tensors=", checkpoint ? checkpoint->tensorsLoaded().size() : 0, " peak_rss=", peakRssBytes(),
           " peak_device=", memory::devicePeakBytes(device.is_cuda(), device.is_cuda() ? device.index() : 0));
  if (auto s = std::dynamic_pointer_cast<memory::StreamingFluxWeights>(weights))
    logDebug("rank streaming: source=", s->fromHost() ? "host" : "file", " groups=", s->streamedGroupsFetched(),
             " stored_read=", s->storedBytesRead(), " stored_read_seconds=", s->storedReadSeconds(),
             " getter_read=", s->getterBytesRead(), " host_bytes=", s->hostBytes(), " wait_seconds=", s->waitSeconds(),
             " device_wait_seconds=", s->deviceWaitSeconds(), " read_threads=", s->readThreads());
}

std::string detail::collectiveSummary(const dist::Runtime& rt) {
  std::string out;
  for (const auto& [name, s] : rt.collectiveTotals()) {
    if (s.calls == 0) continue;
    out += (out.empty() ? "" : "; ") + name + ": " + std::to_string(s.calls) + " calls, " + formatBytes(s.bytes) +
           " sent, " + formatSeconds(s.seconds);
  }
  return out.empty() ? "no communication" : out;
}

at::Tensor detail::cfgShare(const at::Tensor& t, const dist::Topology& topo, const c10::Device& device) {
  if (!t.defined()) return t;
  const int64_t part = t.size(0) / topo.degrees().cfg;
  return t.narrow(0, topo.cfgRank() * part, part).to(device);
}

at::Tensor detail::cfgGather(dist::Runtime& rt, const at::Tensor& mine) {
  if (rt.topology().degrees().cfg == 1) return mine;
  at::Tensor all = dist::allGather(rt.group(dist::GroupKind::kCfg), mine.contiguous());  // [cfg, B/cfg, ...]
  std::vector<int64_t> shape(mine.sizes().begin(), mine.sizes().end());
  shape[0] *= all.size(0);
  return all.reshape(shape);
}

// ---- forward -------------------------------------------------------------------------------------------

TransformerFn Engine::Impl::forwardFn(Run& run, const model::FluxInputs& inputs, const std::string& outputPath) {
  rt.agree([&] {
    const int64_t B = inputs.img.size(0);
    PARDIT_CHECK(B % degrees.cfg == 0, "--cfg-degree ", degrees.cfg, " splits the batch, but the inputs have batch ",
                 B);
    run.pipefusion = detail::checkLayout(options, degrees, config, inputs.img.size(1), 1, /*patched=*/false);
    if (!outputPath.empty()) io::checkOutputPath(outputPath, "--output");
  });
  run.weights = prepare(run, inputs.img.size(0) / degrees.cfg, inputs.img.size(1), inputs.txt.size(1));
  const auto& topo = rt.topology();
  run.inputs = model::FluxInputs{detail::cfgShare(inputs.img, topo, device),
                                 detail::cfgShare(inputs.txt, topo, device),
                                 detail::cfgShare(inputs.pooled, topo, device),
                                 detail::cfgShare(inputs.timestep, topo, device),
                                 detail::cfgShare(inputs.guidance, topo, device),
                                 inputs.imgIds.to(device),
                                 inputs.txtIds.to(device)};
  if (run.pipefusion) {
    auto runner = detail::makePipeFusionRunner(rt, config, run.weights, *run.pipefusion, device,
                                               detail::attentionKernelOf(options.attention));
    return [runner](const model::FluxInputs& in) { return runner->forward(in); };
  }
  auto rank =
      detail::makeRankModel(rt, config, run.weights, options.cudaGraphs, detail::attentionKernelOf(options.attention));
  run.graphs = rank.graphs;
  return rank.fn;
}

ForwardResult Engine::forward(const model::FluxInputs& inputs, const std::string& outputPath) {
  Impl& m = *impl_;
  m.releaseTextEncoders();  // its plan does not count them
  Impl::Run run(m.rt);
  const TransformerFn fn = m.forwardFn(run, inputs, outputPath);
  const int64_t B = inputs.img.size(0);
  const auto& weights = run.weights;
  Timer timer;
  run.recorder.beginStep();
  ForwardResult result;
  result.output = detail::cfgGather(m.rt, fn(run.inputs));
  if (weights) weights->endOfRun();
  m.finishCudaGraphs(run);  // one call: eager (a graph pays from the second call of a shape)
  run.recorder.endStep();
  result.report.runSeconds = timer.seconds();
  result.report.stepSeconds = {result.report.runSeconds};
  result.report.loadSeconds = run.loadSeconds;
  m.writeOutput(outputPath, "--output", "sample", result.output);
  result.report.metricsRun = m.finishMetrics(run, "forward", result.report.runSeconds, 0, B);
  result.report.bytesRead = m.bytesRead();
  logInfo0("forward ", inputs.img.sizes(), " in ", formatSeconds(result.report.runSeconds));
  logInfo0("communication: ", detail::collectiveSummary(m.rt));
  m.rankSummary(weights, run.pipefusion);
  return result;
}

// ---- generate ------------------------------------------------------------------------------------------

namespace {

// The encode stage: prompt embeddings from tensors or files, checked against the model.
PromptEmbeddings encodePrompt(const PromptInput& in, const model::FluxConfig& mc, const std::string& flag) {
  if (!in.embeddingsFile.empty()) return readPromptEmbeddings(in.embeddingsFile, mc, flag);
  checkPromptEmbeddings(in.embeddings, mc, flag);
  return in.embeddings;
}

void checkRequest(const GenerateRequest& r, const dist::ParallelDegrees& d) {
  r.check();
  PARDIT_CHECK(d.cfg == 1 || (r.trueCfgScale > 1.0 && r.negativePrompt.given()),
               "--cfg-degree 2 runs the two branches of true CFG and needs a negative prompt (--negative-prompt or "
               "--negative-prompt-embeds) and --true-cfg-scale > 1");
}

}  // namespace

void GenerateRequest::check() const {
  const GenerateRequest& r = *this;
  PARDIT_CHECK(r.prompt.given(), "a prompt is required: --prompt TEXT, --prompt-file FILE or --prompt-embeds FILE");
  PARDIT_CHECK(r.steps >= 1, "--steps must be at least 1, got ", r.steps);
  PARDIT_CHECK(std::isfinite(r.guidanceScale), "--guidance-scale must be finite");
  PARDIT_CHECK(std::isfinite(r.trueCfgScale), "--true-cfg-scale must be finite");
  PARDIT_CHECK(r.maxSequenceLength >= 0, "--max-sequence-length must be at least 0, got ", r.maxSequenceLength);
  PARDIT_CHECK(!(r.trueCfgScale > 1.0 && !r.negativePrompt.given()), "--true-cfg-scale ", r.trueCfgScale,
               " needs a negative prompt: --negative-prompt TEXT or --negative-prompt-embeds FILE");
  LatentGeometry{r.height, r.width, 16}.validate();
  PARDIT_CHECK(r.output.empty() || r.output != r.saveLatents, "--output and --save-latents name the same file ",
               r.output);
}

Engine::Impl::Prompts Engine::Impl::validateAndEncode(Run& run, const GenerateRequest& request,
                                                      const LatentGeometry& geom) {
  Prompts p;
  std::vector<std::pair<std::string, std::string>> inputs;  // what identifies the prompts, compared across ranks
  rt.agree([&] {
    checkRequest(request, degrees);
    PARDIT_CHECK(config.inChannels == geom.packedChannels(), modelName, ": the model takes ", config.inChannels,
                 " input channels; text-to-image needs ", geom.packedChannels());
    const bool trueCfg = request.trueCfgScale > 1.0;
    int64_t T = 0, Tneg = 0;
    if (request.prompt.isText()) {
      // Text: checked here, encoded after planning (on one rank).
      p.text = readTextPrompts(request.prompt, request.negativePrompt, trueCfg, request.maxSequenceLength);
      checkTextEncoders();
      T = Tneg = p.text.maxLength;
    } else {
      p.positive = encodePrompt(request.prompt, config, "--prompt-embeds");
      if (trueCfg) {
        p.negative = encodePrompt(request.negativePrompt, config, "--negative-prompt-embeds");
        PARDIT_CHECK(p.negative->promptEmbeds.size(0) == p.positive.promptEmbeds.size(0),
                     "--negative-prompt-embeds: batch ", p.negative->promptEmbeds.size(0), " differs from the batch ",
                     p.positive.promptEmbeds.size(0), " of --prompt-embeds");
      }
      T = p.positive.promptEmbeds.size(1);
      Tneg = p.negative ? p.negative->promptEmbeds.size(1) : T;
    }
    // Every rank must denoise the same prompts, whichever file or text each was given.
    if (request.prompt.isText()) {
      std::string all;
      for (const auto* list : {&p.text.clip, &p.text.t5, &p.text.negativeClip, &p.text.negativeT5})
        for (const auto& text : *list) all += text + '\0';
      inputs.emplace_back("the prompts", formatHash(fnv1a(all.data(), all.size())));
    } else {
      inputs.emplace_back("--prompt-embeds contents",
                          tensorHash(p.positive.promptEmbeds) + tensorHash(p.positive.pooled));
      if (p.negative)
        inputs.emplace_back("--negative-prompt-embeds contents",
                            tensorHash(p.negative->promptEmbeds) + tensorHash(p.negative->pooled));
    }

    p.schedule =
        checkpoint ? resolveSchedule(request.schedule, *checkpoint) : resolveSchedule(request.schedule, config);
    run.pipefusion = detail::checkLayout(options, degrees, config, geom.tokenRows(), geom.tokenCols(), true);
    PARDIT_CHECK(!(run.pipefusion && degrees.cfg == 1) || T == Tneg,
                 "with --pipefusion-degree > 1 and without --cfg-degree 2, the prompt and negative prompt embeddings "
                 "need the same token count (",
                 T, " vs ", Tneg, ")");
    const int64_t B = p.text.empty() ? p.positive.promptEmbeds.size(0) : static_cast<int64_t>(p.text.clip.size());
    for (const auto& [list, name] : {std::pair<size_t, const char*>{request.seeds.size(), "seeds"},
                                     {request.outputs.size(), "outputs"},
                                     {request.indices.size(), "indices"}})
      PARDIT_CHECK(list == 0 || static_cast<int64_t>(list) == B, "a request of ", B, " images with ", list, " ", name);
    if (request.decode || request.writesImages()) {
      openVae(geom);
      if (request.writesImages())
        for (const auto& path : request.imagePaths(B)) io::checkOutputPath(path, "--output");
    }
    // Every input is open by now: no output may replace one (the writers check again before renaming).
    if (!request.saveLatents.empty()) io::checkOutputPath(request.saveLatents, "--save-latents");
    if (!options.metrics.empty()) metrics::checkMetricsFile(options.metrics);
  });
  rt.agree([&] { rt.checkSame(inputs, "the inputs", "every rank must be given the same prompt"); });
  return p;
}

std::unique_ptr<Denoiser> Engine::Impl::makeDenoiser(Run& run, const Prompts& p, const LatentGeometry& geom) {
  auto onDevice = [&](const PromptEmbeddings& e) {
    return PromptEmbeddings{e.promptEmbeds.to(device).to(dtype), e.pooled.to(device).to(dtype)};
  };
  // With CFG parallelism each CFG rank holds one branch; else the negative branch runs on this rank too.
  const bool cfgParallel = degrees.cfg == 2;
  const PromptEmbeddings branch = onDevice(cfgParallel && rt.topology().cfgRank() == 1 ? *p.negative : p.positive);
  std::optional<PromptEmbeddings> second;
  if (p.negative && !cfgParallel) second = onDevice(*p.negative);
  dist::Communicator* cfg = cfgParallel ? &rt.group(dist::GroupKind::kCfg) : nullptr;
  if (run.pipefusion) {
    auto runner = detail::makePipeFusionRunner(rt, config, run.weights, *run.pipefusion, device,
                                               detail::attentionKernelOf(options.attention));
    logInfo0("pipeline: ", run.pipefusion->layout.patches, " patches, ", run.pipefusion->warmupSteps,
             " warm-up step(s)");
    return std::make_unique<PipeFusionDenoiser>(runner, branch, second, cfg, run.pipefusion->warmupSteps);
  }
  const auto rank =
      detail::makeRankModel(rt, config, run.weights, options.cudaGraphs, detail::attentionKernelOf(options.attention));
  run.graphs = rank.graphs;
  const at::Tensor ids = imageIds(geom).to(device);
  return cfg ? TransformerDenoiser::cfgParallel(rank.fn, ids, branch, *cfg)
             : TransformerDenoiser::local(rank.fn, ids, branch, second);
}

void Engine::Impl::finishCudaGraphs(Run& run) const {
  if (!run.graphs) return;
  const CudaGraphStats st = run.graphs->stats();
  logInfo0("CUDA graphs: ", st.replays, " of ", st.eagerCalls + st.replays, " transformer calls replayed from ",
           st.captures, st.captures == 1 ? " graph" : " graphs", " (the first call of each input shape runs eagerly)");
  run.graphs->release();
  run.graphs.reset();
}

void Engine::Impl::reportLoop(const Denoiser& denoiser, double seconds, uint64_t rssBeforeLoop) {
  logInfo0("denoised in ", formatSeconds(seconds));
  if (const auto* pipe = dynamic_cast<const PipeFusionDenoiser*>(&denoiser)) {
    lastPipeline = pipe->runner().stats();
    logInfo0("pipeline: ", formatSeconds(lastPipeline.waitSeconds), " of ", formatSeconds(seconds),
             " waiting for the previous stage on rank 0; K/V buffers ",
             formatBytes(pipe->runner().kvBuffers().bytes()));
  }
  if (device.is_cpu() && !loaded->plan.anyStreamed()) {
    // On the CPU the loop's memory growth is its activations (and buffers): compare with the plan's estimate.
    const auto& plan = loaded->plan;
    const uint64_t grown = peakRssBytes() > rssBeforeLoop ? peakRssBytes() - rssBeforeLoop : 0;
    logInfo0("activations and buffers: planned ", formatBytes(plan.activationBytes + plan.kvBytes + plan.commBytes),
             ", measured ", formatBytes(grown), " (peak RSS growth during the loop)");
  }
}

void Engine::Impl::openVae(const LatentGeometry& geom) {
  if (decoder) return;
  std::string path = options.vae;
  if (path.empty() && checkpoint) path = io::VaeCheckpoint::findBeside(*checkpoint);
  PARDIT_CHECK(!path.empty(), "--output needs the VAE: none found beside ", modelName,
               " (vae/ or ae.safetensors); pass --vae PATH");
  vae.emplace(io::VaeCheckpoint::open(path));
  const auto& c = vae->config();
  PARDIT_CHECK(c.latentChannels == geom.channels && c.spatialFactor() == 8, path, ": a VAE with ", c.latentChannels,
               " latent channels and ", c.spatialFactor(), "x upsampling; FLUX needs ", geom.channels, " and 8x");
}

DecodePlan Engine::Impl::planImageDecode(int64_t batch, const LatentGeometry& geom, uint64_t freeBytes) {
  const auto free =
      static_cast<uint64_t>(detail::worldReduce(rt, static_cast<double>(freeBytes), dist::ReduceOp::kMin));
  DecodePlan d;
  rt.agree([&] {
    d = planDecode(vae->config(), options, batch, geom.height, geom.width, rt.worldSize(), dtype, free);
    PARDIT_CHECK(d.fits || options.vaeTiling != VaeTiling::kAuto, "the VAE decode does not fit: even in ",
                 d.tile * d.factor, " px tiles it needs ", formatBytes(d.activationBytes),
                 " per rank beside the transformer, and --device-memory-budget leaves ", formatBytes(d.freeBytes),
                 " (raise it, or decode on more ranks)");
  });
  if (!d.fits)
    logWarn0("the VAE decode (", d.describe(), ") exceeds the budget; --vae-tiling ", vaeTilingName(options.vaeTiling),
             " was asked for");
  logDebug("decode plan: ", d.describe());
  return d;
}

at::Tensor Engine::Impl::runDecode(const model::VaeDecoder& dec, const at::Tensor& z, const DecodePlan& plan) {
  switch (plan.mode) {
    case DecodePlan::Mode::kTiles:  // the latents are on the rank's device: NCCL between GPUs
      return parallel::decodeTiledParallel(dec, z, rt.deviceWorld(), plan.tile);
    case DecodePlan::Mode::kPatches:
      return parallel::decodeParallel(dec, z, rt.deviceWorld());
    case DecodePlan::Mode::kWhole:
      break;
  }
  return dec.decode(z);
}

at::Tensor Engine::Impl::decodeImages(Run& run, const at::Tensor& latents, const LatentGeometry& geom) {
  Timer timer;
  const uint64_t before = vae->bytesRead();
  if (!decoder) {
    const LoadingAllocations loading;
    decoder = std::make_unique<model::VaeDecoder>(vae->config(), vae->getter(dtype, device));
  }
  const at::Tensor z = model::denormalizeLatents(unpackLatents(latents, geom), vae->config());
  PARDIT_CHECK(run.decode.has_value(), "internal: the decode stage was not planned");
  const DecodePlan& plan = *run.decode;
  const at::Tensor images = model::imagesToBytes(runDecode(*decoder, z, plan));
  releaseFreedMemory();  // the decoder's activations
  const double seconds = timer.seconds();
  run.recorder.addStage("decode", seconds, vae->bytesRead() - before);
  const std::string how = plan.mode == DecodePlan::Mode::kTiles
                              ? " in " + std::to_string(plan.tile * plan.factor) + " px tiles"
                          : plan.mode == DecodePlan::Mode::kPatches && rt.worldSize() > 1 ? " patch-parallel"
                                                                                          : "";
  logInfo0("decoded ", images.size(0), images.size(0) == 1 ? " image " : " images ", images.size(2), "x",
           images.size(1), how, " in ", formatSeconds(seconds),
           rt.worldSize() > 1 && plan.mode != DecodePlan::Mode::kWhole
               ? " on " + std::to_string(rt.worldSize()) + " ranks"
               : "");
  return images;
}

std::vector<std::string> Engine::Impl::writeImages(Run& run, const GenerateRequest& request, const Prompts& prompts,
                                                   const at::Tensor& images) {
  Timer timer;
  const auto paths = request.imagePaths(images.size(0));
  // The run's parameters in a tEXt chunk, as other image tools write and read them.
  auto promptText = [&](size_t i) {
    if (!prompts.text.empty()) return prompts.text.clip.at(i);
    return request.prompt.embeddingsFile.empty() ? std::string("(prompt embeddings)")
                                                 : "(prompt embeddings: " + request.prompt.embeddingsFile + ")";
  };
  auto negativeText = [&](size_t i) {
    if (!prompts.negative) return std::string();
    if (!prompts.text.empty()) return "\nNegative prompt: " + prompts.text.negativeClip.at(i);
    return "\nNegative prompt: (prompt embeddings" +
           (request.negativePrompt.embeddingsFile.empty() ? "" : ": " + request.negativePrompt.embeddingsFile) + ")";
  };
  std::string parameters;
  const auto& d = degrees;
  parameters += "Steps: " + std::to_string(request.steps) +
                ", Sampler: flow-match Euler, Schedule: " + (prompts.schedule.dynamicShift ? "shifted" : "plain") +
                ", Guidance: " + formatNumber(request.guidanceScale) +
                ", CFG scale: " + formatNumber(prompts.negative ? request.trueCfgScale : 1.0) +
                ", Size: " + std::to_string(request.width) + "x" + std::to_string(request.height) +
                ", Model: " + modelName + ", Dtype: " + weightsName() + ", Parallel: cfg " + std::to_string(d.cfg) +
                " x pipefusion " + std::to_string(d.pipefusion) + " x ring " + std::to_string(d.ring) + " x ulysses " +
                std::to_string(d.ulysses);
  if (run.decode && run.decode->mode == DecodePlan::Mode::kTiles)  // not the exact decode: say so
    parameters += ", VAE tiles: " + std::to_string(run.decode->tile * run.decode->factor) + " px";
  rt.agree([&] {
    if (rt.worldRank() != 0) return;
    for (size_t i = 0; i < paths.size(); ++i) {
      const std::string seed =
          (request.seeds.empty() ? ", Seed: " + std::to_string(request.seed) +
                                       (paths.size() > 1 ? ", Batch index: " + std::to_string(i) : std::string())
                                 : ", Seed: " + std::to_string(request.seeds[i])) +
          (request.indices.empty() ? std::string() : ", Index: " + std::to_string(request.indices[i]));
      io::writePng(paths[i], images[static_cast<int64_t>(i)],
                   {{"parameters", promptText(i) + negativeText(i) + "\n" + parameters + seed},
                    {"pardit-request", imageIdentity(request, static_cast<int64_t>(i))},
                    {"Software", std::string("pardit ") + PARDIT_VERSION}});
    }
  });
  run.recorder.addStage("write", timer.seconds(), static_cast<uint64_t>(images.numel()));
  logInfo0("wrote ", paths.size() == 1 ? paths[0] : std::to_string(paths.size()) + " images: " + paths[0] + " ...",
           " (--output)");
  return paths;
}

Engine::Impl::Planned Engine::Impl::planGenerate(Run& run, const GenerateRequest& request, const LatentGeometry& geom) {
  Planned p;
  p.prompts = validateAndEncode(run, request, geom);
  run.height = request.height;
  run.width = request.width;
  run.steps = request.steps;
  p.text = !p.prompts.text.empty();
  p.batch = p.text ? static_cast<int64_t>(p.prompts.text.clip.size()) : p.prompts.positive.promptEmbeds.size(0);
  p.textTokens = p.text ? p.prompts.text.maxLength : p.prompts.positive.promptEmbeds.size(1);
  const bool trueCfg = p.text ? !p.prompts.text.negativeClip.empty() : p.prompts.negative.has_value();
  // plan: the transformer batch of this rank (both branches together on one PipeFusion pipeline)
  const int64_t branchBatch = p.batch * ((run.pipefusion && degrees.cfg == 1 && trueCfg) ? 2 : 1);
  p.plan = planRun(run, branchBatch, geom.tokens(), p.textTokens);
  // Text encoders kept from an earlier request stay only where this plan leaves room for them.
  if (keptEncoderBytes() > (p.plan.budget > p.plan.total() ? p.plan.budget - p.plan.total() : 0)) releaseTextEncoders();
  if (request.decode || request.writesImages()) {
    const uint64_t held = p.plan.residentBytes + p.plan.streamBufferBytes;  // the transformer's, during the decode
    const uint64_t free = p.plan.budget > held ? p.plan.budget - held : 0;
    run.decode = planImageDecode(p.batch, geom, free);
    // Nor may they change how the images decode (patches or tiles, and their size): released when they would.
    if (detail::worldReduce(rt, static_cast<double>(keptEncoderBytes()), dist::ReduceOp::kMax) > 0) {
      const uint64_t kept = keptEncoderBytes();
      const auto least = static_cast<uint64_t>(
          detail::worldReduce(rt, static_cast<double>(free > kept ? free - kept : 0), dist::ReduceOp::kMin));
      const DecodePlan with =
          planDecode(vae->config(), options, p.batch, geom.height, geom.width, rt.worldSize(), dtype, least);
      if (with.mode != run.decode->mode || with.tile != run.decode->tile || with.fits != run.decode->fits)
        releaseTextEncoders();
    }
  }
  return p;
}

void Engine::check(const GenerateRequest& request) {
  Impl::Run run(impl_->rt);
  impl_->planGenerate(run, request, LatentGeometry{request.height, request.width, 16});
}

void Engine::reserve(int64_t batch, int64_t height, int64_t width, int64_t textTokens, bool trueCfg) {
  Impl& m = *impl_;
  Impl::Run run(m.rt);
  const LatentGeometry geom{height, width, 16};
  m.rt.agree([&] {
    PARDIT_CHECK(batch >= 1 && textTokens >= 1, "internal: reserve(batch ", batch, ", text tokens ", textTokens, ")");
    geom.validate();
    run.pipefusion = detail::checkLayout(m.options, m.degrees, m.config, geom.tokenRows(), geom.tokenCols(), true);
  });
  const int64_t branchBatch = batch * ((run.pipefusion && m.degrees.cfg == 1 && trueCfg) ? 2 : 1);
  m.planRun(run, branchBatch, geom.tokens(), textTokens);  // fails on every rank when it does not fit
  m.capacity = Impl::Capacity{std::max(m.capacity.batch, branchBatch), std::max(m.capacity.imageTokens, geom.tokens()),
                              std::max(m.capacity.textTokens, textTokens)};
}

std::string Engine::imageIdentity(const GenerateRequest& r, int64_t i) const { return impl_->imageIdentity(r, i); }

std::string Engine::Impl::imageIdentity(const GenerateRequest& r, int64_t i) const {
  const Impl& m = *this;
  auto text = [&](const PromptInput& in, bool second) -> std::string {
    const auto& list = second && !in.texts2.empty() ? in.texts2 : in.texts;
    if (!list.empty()) return list.at(static_cast<size_t>(std::min<int64_t>(i, static_cast<int64_t>(list.size()) - 1)));
    if (!in.textFile.empty()) return "(prompt file: " + in.textFile + ")";
    if (!in.embeddingsFile.empty()) return "(prompt embeddings: " + in.embeddingsFile + ")";
    return in.embeddings.promptEmbeds.defined() ? "(prompt embeddings: " + tensorHash(in.embeddings.promptEmbeds) + ")"
                                                : std::string();
  };
  const bool trueCfg = r.trueCfgScale > 1.0 && r.negativePrompt.given();
  const SchedulerConfig schedule =
      m.checkpoint ? resolveSchedule(r.schedule, *m.checkpoint) : resolveSchedule(r.schedule, m.config);
  nlohmann::ordered_json j;
  j["prompt"] = text(r.prompt, false);
  j["prompt_2"] = text(r.prompt, true);
  j["negative_prompt"] = trueCfg ? text(r.negativePrompt, false) : std::string();
  j["seed"] = r.seeds.empty() ? r.seed : r.seeds.at(static_cast<size_t>(i));
  j["batch_index"] = r.seeds.empty() ? i : 0;  // an image with its own seed is the request of batch 1 it stands for
  j["width"] = r.width;
  j["height"] = r.height;
  j["steps"] = r.steps;
  j["guidance_scale"] = m.config.guidanceEmbed ? r.guidanceScale : 0.0;
  j["true_cfg_scale"] = trueCfg ? r.trueCfgScale : 1.0;
  j["max_sequence_length"] = r.maxSequenceLength > 0 ? r.maxSequenceLength : (m.config.guidanceEmbed ? 512 : 256);
  j["schedule"] = schedule.dynamicShift ? "shifted" : "plain";
  j["model"] = m.modelName;
  j["weights"] = m.weightsName();
  return j.dump();
}

GenerateResult Engine::generate(const GenerateRequest& request) {
  Impl& m = *impl_;
  Impl::Run run(m.rt);
  const LatentGeometry geom{request.height, request.width, 16};
  // validate, plan
  Impl::Planned planned = m.planGenerate(run, request, geom);
  Impl::Prompts& prompts = planned.prompts;
  const memory::RankPlan& plan = planned.plan;
  const bool text = planned.text;
  const int64_t B = planned.batch;
  const int64_t T = planned.textTokens;
  GenerateResult result;
  // encode: on the rank with the most memory to spare after its plan; its encoders are gone before loading.
  if (text) {
    Timer encodeTimer;
    const uint64_t held = m.loaded ? m.loaded->plan.total() : 0;  // weights kept from an earlier run
    const uint64_t spare = plan.budget > plan.total() ? plan.budget - plan.total() : 0;
    // The encoders may stay loaded for the next request in what the plan and the decode leave unused.
    const uint64_t decodeBytes = run.decode ? run.decode->activationBytes + run.decode->weightBytes : 0;
    std::tie(prompts.positive, prompts.negative) =
        m.encodeTexts(run, prompts.text, spare, plan.budget > held ? plan.budget - held : 0,
                      spare > decodeBytes ? spare - decodeBytes : 0);
    result.report.encodeSeconds = encodeTimer.seconds();
  }
  // load
  run.weights = m.loadRun(run, plan);
  // denoise
  const std::unique_ptr<Denoiser> denoiser = m.makeDenoiser(run, prompts, geom);
  const FlowMatchEulerScheduler scheduler(prompts.schedule, request.steps, geom.tokens());
  // The same noise on every rank: a pure function of the seed and the shape.
  // One generator for the batch, or each image's own (then each image is the request of batch 1 with its seed).
  at::Tensor noise;
  if (request.seeds.empty()) {
    noise = initialNoise(request.seed, B, geom, m.dtype);
  } else {
    std::vector<at::Tensor> each;
    for (uint64_t s : request.seeds) each.push_back(initialNoise(s, 1, geom, m.dtype));
    noise = at::cat(each, 0);
  }
  noise = noise.to(m.device);
  logInfo0("generate ", request.width, "x", request.height, " (", geom.tokens(), " image tokens, ", T,
           " text tokens), batch ", B, ", ", request.steps, request.steps == 1 ? " step, " : " steps, ",
           prompts.schedule.dynamicShift ? "shifted" : "plain", " schedule",
           m.config.guidanceEmbed ? ", guidance " + formatNumber(request.guidanceScale) : std::string(),
           prompts.negative ? ", true CFG " + formatNumber(request.trueCfgScale) : std::string());
  const uint64_t rssBeforeLoop = currentRssBytes();
  Timer total;
  run.recorder.beginStep();
  auto progress = [&](const StepReport& r) {
    run.recorder.endStep();
    run.recorder.beginStep();
    result.report.stepSeconds.push_back(r.seconds);
    const double eta = total.seconds() / (r.step + 1) * (r.steps - r.step - 1);
    logInfo0("step ", r.step + 1, "/", r.steps, "  ", formatSeconds(r.seconds), "  eta ", formatSeconds(eta));
    logDebug("step ", r.step + 1, " seconds=", r.seconds);
  };
  const Sampling sampling{m.config.guidanceEmbed, request.guidanceScale, request.trueCfgScale};
  result.latents = denoise(*denoiser, noise, scheduler, sampling, progress, &m.rt.watchdog());
  if (run.weights) run.weights->endOfRun();
  m.rt.watchdog().setContext("decoding and writing");
  result.report.runSeconds = total.seconds();
  result.report.loadSeconds = run.loadSeconds;
  m.reportLoop(*denoiser, result.report.runSeconds, rssBeforeLoop);
  m.finishCudaGraphs(run);
  // decode, then write: the primary outputs first, then the metrics.
  Timer stage;
  if (request.decode || request.writesImages()) result.images = m.decodeImages(run, result.latents, geom);
  result.report.decodeSeconds = stage.seconds();
  stage = Timer();
  if (request.writesImages()) result.imagePaths = m.writeImages(run, request, prompts, result.images);
  result.report.writeSeconds = stage.seconds();
  // The latents say what they are, so they can be unpacked and traced without the command line.
  std::map<std::string, std::string> meta = {
      {"height", std::to_string(request.height)},
      {"width", std::to_string(request.width)},
      {"seed", std::to_string(request.seed)},
      {"steps", std::to_string(request.steps)},
      {"guidance_scale", formatNumber(request.guidanceScale)},
      {"true_cfg_scale", formatNumber(prompts.negative ? request.trueCfgScale : 1.0)},
      {"schedule", prompts.schedule.dynamicShift ? "shifted" : "plain"},
      {"model", m.modelName},
      {"layout", m.degrees.describe()},
      {"dtype", dtypeName(m.dtype)},
      {"weights", m.weightsName()},
      {"latents_layout", "packed [B, (height/16)*(width/16), 64]"},
      {"software", std::string("pardit ") + PARDIT_VERSION}};
  if (text) meta["prompt"] = prompts.text.clip.at(0);
  m.writeOutput(request.saveLatents, "--save-latents", "latents", result.latents, meta);
  result.report.metricsRun = m.finishMetrics(run, "generate", result.report.runSeconds,
                                             run.pipefusion ? run.pipefusion->warmupSteps : 0, B, request.queueMetrics);
  result.report.bytesRead = m.bytesRead();
  logInfo0("communication: ", detail::collectiveSummary(m.rt));
  m.rankSummary(run.weights, run.pipefusion);
  return result;
}

EncodeResult Engine::encode(const EncodeRequest& request) {
  Impl& m = *impl_;
  Impl::Run run(m.rt);
  Impl::TextPrompts prompts;
  const bool negative = request.negativePrompt.isText();
  m.rt.agree([&] {
    PARDIT_CHECK(request.prompt.isText(), "pardit encode needs a prompt: --prompt TEXT or --prompt-file FILE");
    prompts = m.readTextPrompts(request.prompt, request.negativePrompt, negative, request.maxSequenceLength);
    m.checkTextEncoders();
    if (!request.output.empty()) io::checkOutputPath(request.output, "--output");
  });
  EncodeResult result;
  Timer timer;
  // Nothing else is loaded: the whole budget is spare.
  const uint64_t budget = detail::budgetOf(m.options, m.device, m.rt.localSize());
  std::tie(result.positive, result.negative) = m.encodeTexts(run, prompts, budget, budget);
  result.report.runSeconds = timer.seconds();
  result.report.bytesRead = m.bytesRead();
  if (!request.output.empty()) {
    m.rt.agree([&] {
      if (m.rt.worldRank() != 0) return;
      std::map<std::string, at::Tensor> t{{"prompt_embeds", result.positive.promptEmbeds},
                                          {"pooled_prompt_embeds", result.positive.pooled}};
      if (result.negative) {
        t["negative_prompt_embeds"] = result.negative->promptEmbeds;
        t["negative_pooled_prompt_embeds"] = result.negative->pooled;
      }
      io::writeSafetensors(request.output, t, {{"format", "pt"}, {"prompt", prompts.clip.at(0)}});
    });
    logInfo0("wrote prompt_embeds ", result.positive.promptEmbeds.sizes(), " and pooled_prompt_embeds ",
             result.positive.pooled.sizes(), result.negative ? " (and the negative ones)" : "", " to ", request.output);
  }
  return result;
}

}  // namespace pardit::pipeline
