#include "pardit/pipeline/loading.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/core/timer.h"

namespace fs = std::filesystem;

namespace pardit::pipeline {

c10::ScalarType resolveDtype(config::Dtype dtype, const c10::Device& device) {
  switch (dtype) {
    case config::Dtype::kBf16: return c10::kBFloat16;
    case config::Dtype::kFp16: return c10::kHalf;
    case config::Dtype::kFp32: return c10::kFloat;
    case config::Dtype::kAuto: break;
  }
  return device.is_cuda() ? c10::kBFloat16 : c10::kFloat;
}

LoadedFlux loadFlux(const std::string& modelPath, c10::ScalarType dtype, const c10::Device& device,
                    std::shared_ptr<model::AttentionBackend> attention) {
  PARDIT_CHECK(!modelPath.empty(), "--model is required (a diffusers directory or a BFL .safetensors file)");
  Timer timer;
  LoadedFlux out;
  out.checkpoint = std::make_shared<io::FluxCheckpoint>(io::FluxCheckpoint::open(modelPath));
  out.device = device;
  out.dtype = dtype;
  auto weights = std::make_shared<model::ResidentFluxWeights>(out.checkpoint->config(),
                                                              out.checkpoint->getter(dtype, device));
  if (!attention) attention = std::make_shared<model::LocalAttention>();
  out.transformer = std::make_shared<model::FluxTransformer>(out.checkpoint->config(), weights, attention);
  out.loadSeconds = timer.seconds();
  out.bytesRead = out.checkpoint->bytesRead();
  return out;
}

SchedulerConfig resolveSchedule(config::Schedule schedule, const model::FluxConfig& config) {
  if (schedule == config::Schedule::kShift) return SchedulerConfig::dev();
  if (schedule == config::Schedule::kPlain) return SchedulerConfig::schnell();
  return config.guidanceEmbed ? SchedulerConfig::dev() : SchedulerConfig::schnell();
}

SchedulerConfig resolveSchedule(config::Schedule schedule, const io::FluxCheckpoint& ck) {
  if (schedule == config::Schedule::kAuto && ck.layout() == io::CheckpointLayout::kDiffusers) {
    // <root>/transformer/... -> <root>/scheduler/scheduler_config.json
    const fs::path tdir = fs::path(ck.files().front()->path()).parent_path();
    const fs::path cfg = tdir.parent_path() / "scheduler" / "scheduler_config.json";
    if (fs::exists(cfg)) {
      std::ifstream in(cfg);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(in);
      } catch (const nlohmann::json::exception& e) {
        PARDIT_THROW(cfg.string(), ": not valid JSON: ", e.what());
      }
      registerInputFile(cfg.string());
      PARDIT_CHECK(j.is_object(), cfg.string(), ": expected a JSON object");
      // Integers must be JSON integers (a float beyond int64 would be undefined behaviour to convert).
      auto integer = [&](const char* key, int64_t fallback) {
        if (!j.contains(key) || j[key].is_null()) return fallback;
        PARDIT_CHECK(j[key].is_number_integer(), cfg.string(), ": '", key, "' must be an integer, got ", j[key].dump());
        return j[key].get<int64_t>();
      };
      SchedulerConfig s;
      try {
        s.dynamicShift = j.value("use_dynamic_shifting", false);
        s.shift = j.value("shift", 1.0);
        s.baseShift = j.value("base_shift", 0.5);
        s.maxShift = j.value("max_shift", 1.15);
      } catch (const nlohmann::json::exception& e) {
        PARDIT_THROW(cfg.string(), ": a value of the wrong type: ", e.what());
      }
      s.baseSeqLen = integer("base_image_seq_len", 256);
      s.maxSeqLen = integer("max_image_seq_len", 4096);
      s.numTrainTimesteps = integer("num_train_timesteps", 1000);
      return s;
    }
  }
  return resolveSchedule(schedule, ck.config());
}

}  // namespace pardit::pipeline
