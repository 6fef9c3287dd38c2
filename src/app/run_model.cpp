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
#include "pardit/io/safetensors.h"
#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/sampler.h"

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

int runForward(const config::EngineConfig& c) {
  PARDIT_CHECK(!c.model.empty(), "--model is required");
  PARDIT_CHECK(!c.inputs.empty(), "--inputs is required (a safetensors file with the transformer inputs)");
  PARDIT_CHECK(!c.output.empty(), "--output is required");
  const c10::Device device = pipeline::resolveDevice(c.device);
  const c10::ScalarType dtype = pipeline::resolveDtype(c.dtype, device);

  // Everything is checked against the checkpoint headers before any weight is read.
  auto ck = io::FluxCheckpoint::open(c.model);
  const auto& mc = ck.config();
  auto in = io::SafetensorsFile::open(c.inputs);
  model::FluxInputs x;
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

  auto loaded = pipeline::loadFlux(c.model, dtype, device);
  logInfo0("model ", c.model, " (", io::layoutName(loaded.checkpoint->layout()), "): ", mc.describe());
  logInfo0("loaded ", gib(loaded.bytesRead), " of weights in ", loaded.loadSeconds, " s as ", dtypeName(dtype),
           " on ", device.str());
  auto to = [&](const at::Tensor& t) { return t.defined() ? t.to(device) : t; };
  model::FluxInputs dx{to(x.img), to(x.txt), to(x.pooled), to(x.timestep), to(x.guidance), to(x.imgIds), to(x.txtIds)};
  Timer timer;
  at::Tensor out = loaded.transformer->forward(dx);
  const double seconds = timer.seconds();
  io::writeSafetensors(c.output, {{"sample", out.cpu()}}, {{"format", "pt"}});
  logInfo0("forward [", B, ", ", L, ", ", mc.inChannels, "] in ", seconds, " s; wrote 'sample' ", out.sizes(),
           " to ", c.output);
  return 0;
}

int runGenerate(const config::EngineConfig& c) {
  PARDIT_CHECK(!c.model.empty(), "--model is required");
  PARDIT_CHECK(!c.promptEmbeds.empty(),
               "--prompt-embeds is required (safetensors with prompt_embeds and pooled_prompt_embeds)");
  PARDIT_CHECK(c.steps >= 1, "--steps must be at least 1, got ", c.steps);
  PARDIT_CHECK(std::isfinite(c.guidanceScale), "--guidance-scale must be finite");
  PARDIT_CHECK(std::isfinite(c.trueCfgScale), "--true-cfg-scale must be finite");
  PARDIT_CHECK(!(c.trueCfgScale > 1.0 && c.negativePromptEmbeds.empty()), "--true-cfg-scale ", c.trueCfgScale,
               " needs --negative-prompt-embeds");
  const c10::Device device = pipeline::resolveDevice(c.device);
  const c10::ScalarType dtype = pipeline::resolveDtype(c.dtype, device);
  pipeline::LatentGeometry geom{c.height, c.width, 16};
  geom.validate();

  auto ck = io::FluxCheckpoint::open(c.model);
  const auto& mc = ck.config();
  PARDIT_CHECK(mc.inChannels == geom.packedChannels(), c.model, ": the model takes ", mc.inChannels,
               " input channels; text-to-image needs ", geom.packedChannels());
  pipeline::PromptEmbeddings pos = readEmbeddings(c.promptEmbeds, mc, "--prompt-embeds");
  std::optional<pipeline::PromptEmbeddings> neg;
  if (!c.negativePromptEmbeds.empty()) {
    neg = readEmbeddings(c.negativePromptEmbeds, mc, "--negative-prompt-embeds");
    PARDIT_CHECK(neg->promptEmbeds.size(0) == pos.promptEmbeds.size(0), c.negativePromptEmbeds, ": batch ",
                 neg->promptEmbeds.size(0), " differs from the batch ", pos.promptEmbeds.size(0), " of ", c.promptEmbeds);
  }
  const auto schedCfg = pipeline::resolveSchedule(c.schedule, ck);
  const int64_t B = pos.promptEmbeds.size(0);

  auto loaded = pipeline::loadFlux(c.model, dtype, device);
  logInfo0("model ", c.model, " (", io::layoutName(loaded.checkpoint->layout()), "): ", mc.describe());
  logInfo0("loaded ", gib(loaded.bytesRead), " of weights in ", loaded.loadSeconds, " s as ", dtypeName(dtype),
           " on ", device.str());
  auto onDevice = [&](pipeline::PromptEmbeddings e) {
    e.promptEmbeds = e.promptEmbeds.to(device).to(dtype);
    e.pooled = e.pooled.to(device).to(dtype);
    return e;
  };
  if (neg) neg = onDevice(*neg);
  pipeline::LocalDenoiser denoiser(loaded.transformer, onDevice(pos), pipeline::imageIds(geom).to(device), neg,
                                   c.trueCfgScale);
  pipeline::FlowMatchEulerScheduler scheduler(schedCfg, c.steps, geom.tokens());
  at::Tensor latents = pipeline::initialNoise(c.seed, B, geom, dtype).to(device);
  logInfo0("generate ", c.width, "x", c.height, " (", geom.tokens(), " image tokens, ", pos.promptEmbeds.size(1),
           " text tokens), batch ", B, ", ", c.steps, " steps, ", schedCfg.dynamicShift ? "shifted" : "plain",
           " schedule", mc.guidanceEmbed ? ", guidance " + std::to_string(c.guidanceScale) : std::string(),
           denoiser.trueCfg() ? ", true CFG " + std::to_string(c.trueCfgScale) : std::string());
  Timer total;
  latents = pipeline::denoise(denoiser, latents, scheduler, mc.guidanceEmbed, c.guidanceScale,
                              [&](const pipeline::StepReport& r) {
                                const double eta = total.seconds() / (r.step + 1) * (r.steps - r.step - 1);
                                char line[128];
                                std::snprintf(line, sizeof(line), "step %d/%d  %.3f s  eta %.1f s", r.step + 1,
                                              r.steps, r.seconds, eta);
                                logInfo0(line);
                              });
  logInfo0("denoised in ", total.seconds(), " s");
  if (!c.saveLatents.empty()) {
    io::writeSafetensors(c.saveLatents, {{"latents", latents.cpu()}}, {{"format", "pt"}});
    logInfo0("wrote 'latents' ", latents.sizes(), " to ", c.saveLatents);
  } else {
    logWarn("no output requested: pass --save-latents FILE to keep the result");
  }
  return 0;
}

}  // namespace pardit::app
