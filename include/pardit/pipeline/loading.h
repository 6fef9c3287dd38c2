#pragma once
// Loading a FLUX transformer on one device without a parallel layout (tests, tools): device and dtype
// resolution, weights read from the checkpoint (only the byte ranges of the model's tensors), the local
// attention backend; and the schedule a checkpoint asks for. Parallel runs go through pipeline::Engine.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <memory>
#include <string>

#include "pardit/config/config.h"
#include "pardit/io/checkpoint.h"
#include "pardit/model/flux.h"
#include "pardit/pipeline/scheduler.h"

namespace pardit::pipeline {

// auto -> bf16 on CUDA, fp32 on the CPU.
c10::ScalarType resolveDtype(config::Dtype dtype, const c10::Device& device);

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

// The schedule for a model: shift (dev), plain (schnell), or auto: scheduler/scheduler_config.json next
// to a diffusers transformer when present, else shifted iff the model has guidance embeddings.
SchedulerConfig resolveSchedule(config::Schedule schedule, const io::FluxCheckpoint& checkpoint);
// The same for a model without a checkpoint (a preset held in memory).
SchedulerConfig resolveSchedule(config::Schedule schedule, const model::FluxConfig& config);

}  // namespace pardit::pipeline
