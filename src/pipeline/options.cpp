#include "pardit/pipeline/options.h"

#include <cmath>

#include "options_sync.h"
#include "pardit/core/error.h"

namespace pardit::pipeline {

dist::ParallelDegrees EngineOptions::degrees() const {
  dist::ParallelDegrees d;
  d.cfg = cfgDegree;
  d.pipefusion = pipefusionDegree;
  d.ring = ringDegree;
  d.ulysses = ulyssesDegree;
  return d;
}

void EngineOptions::check() const {
  for (const auto& [flag, v] : {std::pair<const char*, int>{"--data-parallel-degree", dataParallelDegree},
                                {"--cfg-degree", cfgDegree},
                                {"--pipefusion-degree", pipefusionDegree},
                                {"--ring-degree", ringDegree},
                                {"--ulysses-degree", ulyssesDegree}})
    PARDIT_CHECK(v >= 1, flag, " must be at least 1, got ", v);
  PARDIT_CHECK(numPipelinePatch >= 0, "--num-pipeline-patch must be at least 0, got ", numPipelinePatch);
  PARDIT_CHECK(warmupSteps >= 0, "--warmup-steps must be at least 0, got ", warmupSteps);
  PARDIT_CHECK(vaeTileSize >= 0, "--vae-tile-size must be at least 0, got ", vaeTileSize);
  PARDIT_CHECK(textEncoderRank >= -1, "--text-encoder-rank must be -1 or a rank, got ", textEncoderRank);
  PARDIT_CHECK(std::isfinite(collectiveTimeout) && collectiveTimeout >= 0,
               "--collective-timeout must be a number of seconds >= 0, got ", collectiveTimeout);
  PARDIT_CHECK(!model.empty() || !preset.empty(), "--model is required (or --preset for an in-memory model)");
}

const char* dtypeOptionName(Dtype v) {
  switch (v) {
    case Dtype::kAuto:
      return "auto";
    case Dtype::kBf16:
      return "bf16";
    case Dtype::kFp16:
      return "fp16";
    case Dtype::kFp32:
      return "fp32";
  }
  return "?";
}

const char* offloadName(memory::Offload v) {
  switch (v) {
    case memory::Offload::kNone:
      return "none";
    case memory::Offload::kAuto:
      return "auto";
    case memory::Offload::kSequential:
      return "sequential";
  }
  return "?";
}

const char* vaeTilingName(VaeTiling v) {
  switch (v) {
    case VaeTiling::kAuto:
      return "auto";
    case VaeTiling::kOn:
      return "on";
    case VaeTiling::kOff:
      return "off";
  }
  return "?";
}

namespace detail {
std::vector<std::pair<std::string, std::string>> syncedFields(const EngineOptions& o) {
  auto s = [](auto v) { return std::to_string(static_cast<long long>(v)); };
  return {{"--model (given)", o.model.empty() ? "no" : "yes"},
          {"--preset", o.model.empty() ? o.preset : std::string()},
          {"--vae (given)", o.vae.empty() ? "no" : "yes"},
          {"--vae-tiling", vaeTilingName(o.vaeTiling)},
          {"--vae-tile-size", s(o.vaeTileSize)},
          {"--text-encoder-rank", s(o.textEncoderRank)},
          {"--text-encoder-device", s(static_cast<int>(o.textEncoderDevice))},
          {"--dtype", dtypeOptionName(o.dtype)},
          {"--weight-dtype", s(static_cast<int>(o.weightDtype))},
          {"--device", s(static_cast<int>(o.device))},
          {"--cuda-graphs", s(o.cudaGraphs)},
          {"--attention", s(static_cast<int>(o.attention))},
          {"--data-parallel-degree", s(o.dataParallelDegree)},
          {"--cfg-degree", s(o.cfgDegree)},
          {"--pipefusion-degree", s(o.pipefusionDegree)},
          {"--ring-degree", s(o.ringDegree)},
          {"--ulysses-degree", s(o.ulyssesDegree)},
          {"--num-pipeline-patch", s(o.numPipelinePatch)},
          {"--warmup-steps", s(o.warmupSteps)},
          {"--pp-partition", o.ppPartition.str()},
          {"--device-memory-budget", o.deviceMemoryBudget.str()},
          {"--host-memory-budget", o.hostMemoryBudget.str()},
          {"--offload", offloadName(o.offload)},
          {"--stream-from", s(static_cast<int>(o.streamFrom))},
          {"--metrics", o.metrics}};
}
}  // namespace detail

}  // namespace pardit::pipeline
