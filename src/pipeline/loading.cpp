#include "pardit/pipeline/loading.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/core/timer.h"

namespace fs = std::filesystem;

namespace pardit::pipeline {

c10::ScalarType resolveDtype(Dtype dtype, const c10::Device& device) {
  switch (dtype) {
    case Dtype::kBf16:
      return c10::kBFloat16;
    case Dtype::kFp16:
      return c10::kHalf;
    case Dtype::kFp32:
      return c10::kFloat;
    case Dtype::kAuto:
      break;
  }
  return device.is_cuda() ? c10::kBFloat16 : c10::kFloat;
}

model::WeightFormat resolveWeightFormat(WeightDtype weightDtype, const io::FluxCheckpoint* checkpoint) {
  switch (weightDtype) {
    case WeightDtype::kFp8:
      return model::WeightFormat::kFp8;
    case WeightDtype::kCompute:
      return model::WeightFormat::kDense;
    case WeightDtype::kAuto:
      break;
  }
  return checkpoint ? checkpoint->storedFormat() : model::WeightFormat::kDense;
}

TensorReader formatReader(model::WeightFormat format, TensorReader dense, Fp8Source fp8,
                          bool (*eligible)(const std::string&), Fp8ScaleSource scaleOnly) {
  if (format == model::WeightFormat::kDense) return dense;
  struct Pending {
    std::mutex mutex;
    std::map<std::string, at::Tensor> scales;  // scale name -> [out] float32, until asked for
  };
  auto pending = std::make_shared<Pending>();
  const std::string suffix = ".weight_scale";
  return [dense = std::move(dense), fp8 = std::move(fp8), scaleOnly = std::move(scaleOnly), pending, suffix, eligible](
             const std::string& name, c10::ScalarType dtype, c10::Device device) -> at::Tensor {
    if (eligible(name)) {
      model::Fp8Rows q = fp8(name, device);
      {
        std::lock_guard<std::mutex> lock(pending->mutex);
        pending->scales[model::fp8ScaleName(name)] = q.scale;
      }
      return q.values.to(device);
    }
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      const std::string weight = name.substr(0, name.size() - std::string("_scale").size());
      if (eligible(weight)) {
        at::Tensor scale;
        {
          std::lock_guard<std::mutex> lock(pending->mutex);
          auto it = pending->scales.find(name);
          if (it != pending->scales.end()) {
            scale = it->second;
            pending->scales.erase(it);
          }
        }
        if (!scale.defined()) scale = scaleOnly ? scaleOnly(weight) : fp8(weight, device).scale;
        return scale.to(device);
      }
    }
    return dense(name, dtype, device);
  };
}

TensorReader checkpointReader(const io::FluxCheckpoint& checkpoint, model::WeightFormat format) {
  const io::FluxCheckpoint* ck = &checkpoint;
  return formatReader(
      format, [ck](const std::string& n, c10::ScalarType t, c10::Device d) { return ck->load(n, t, d); },
      [ck](const std::string& n, c10::Device d) { return ck->loadFp8(n, d); }, model::fluxFp8Eligible,
      [ck](const std::string& n) { return ck->loadFp8Scale(n); });
}

model::WeightGetter getterOf(TensorReader read, c10::ScalarType dtype, c10::Device device) {
  return [read = std::move(read), dtype, device](const std::string& name) { return read(name, dtype, device); };
}

LoadedFlux loadFlux(const std::string& modelPath, c10::ScalarType dtype, const c10::Device& device,
                    std::shared_ptr<model::AttentionBackend> attention, model::WeightFormat format) {
  PARDIT_CHECK(!modelPath.empty(), "--model is required (a diffusers directory or a BFL .safetensors file)");
  Timer timer;
  LoadedFlux out;
  out.checkpoint = std::make_shared<io::FluxCheckpoint>(io::FluxCheckpoint::open(modelPath));
  out.device = device;
  out.dtype = dtype;
  auto weights = std::make_shared<model::ResidentFluxWeights>(
      out.checkpoint->config(), getterOf(checkpointReader(*out.checkpoint, format), dtype, device));
  if (!attention) attention = std::make_shared<model::LocalAttention>();
  out.transformer = std::make_shared<model::FluxTransformer>(out.checkpoint->config(), weights, attention);
  out.loadSeconds = timer.seconds();
  out.bytesRead = out.checkpoint->bytesRead();
  return out;
}

SchedulerConfig resolveSchedule(Schedule schedule, const model::FluxConfig& config) {
  if (schedule == Schedule::kShift) return SchedulerConfig::dev();
  if (schedule == Schedule::kPlain) return SchedulerConfig::schnell();
  return config.guidanceEmbed ? SchedulerConfig::dev() : SchedulerConfig::schnell();
}

SchedulerConfig resolveSchedule(Schedule schedule, const io::FluxCheckpoint& ck) {
  if (schedule == Schedule::kAuto && ck.layout() == io::CheckpointLayout::kDiffusers) {
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
