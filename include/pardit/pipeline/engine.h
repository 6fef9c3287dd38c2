#pragma once
// Loading a FLUX transformer for execution: device and dtype resolution, weights read from the
// checkpoint (only the byte ranges of the model's tensors), the local attention backend.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <memory>
#include <string>

#include "pardit/io/checkpoint.h"
#include "pardit/model/flux.h"
#include "pardit/pipeline/scheduler.h"

namespace pardit::pipeline {

// "auto" -> CUDA when available, else CPU. "cuda" without a CUDA device is an error naming --device.
c10::Device resolveDevice(const std::string& device);
// "auto" -> bf16 on CUDA, fp32 on CPU.
c10::ScalarType resolveDtype(const std::string& dtype, const c10::Device& device);

struct LoadedFlux {
  std::shared_ptr<io::FluxCheckpoint> checkpoint;
  std::shared_ptr<model::FluxTransformer> transformer;
  c10::Device device = c10::kCPU;
  c10::ScalarType dtype = c10::kFloat;
  double loadSeconds = 0.0;
  uint64_t bytesRead = 0;
};

// Loads the model; `attention` defaults to single-device attention.
LoadedFlux loadFlux(const std::string& modelPath, c10::ScalarType dtype, const c10::Device& device,
                    std::shared_ptr<model::AttentionBackend> attention = nullptr);

// The schedule for a model: "shift" (dev), "plain" (schnell), or "auto": scheduler/scheduler_config.json
// next to a diffusers transformer when present, else shifted iff the model has guidance embeddings.
SchedulerConfig resolveSchedule(const std::string& schedule, const io::FluxCheckpoint& checkpoint);

}  // namespace pardit::pipeline
