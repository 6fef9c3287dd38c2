#pragma once
// Loading a FLUX transformer on one device without a parallel layout (tests, tools): device and dtype
// resolution, weights read from the checkpoint (only the byte ranges of the model's tensors), the local
// attention backend; and the schedule a checkpoint asks for. Parallel runs go through pipeline::Engine.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <functional>
#include <memory>
#include <string>

#include "pardit/io/checkpoint.h"
#include "pardit/model/flux.h"
#include "pardit/model/fp8.h"
#include "pardit/pipeline/options.h"
#include "pardit/pipeline/scheduler.h"

namespace pardit::pipeline {

// auto -> bf16 on CUDA, fp32 on the CPU.
c10::ScalarType resolveDtype(Dtype dtype, const c10::Device& device);

// --weight-dtype resolved for a checkpoint (null: synthetic weights, stored dense): auto -> the stored format.
model::WeightFormat resolveWeightFormat(WeightDtype weightDtype, const io::FluxCheckpoint* checkpoint);

// Reads a tensor by internal name in a dtype onto a device.
using TensorReader = std::function<at::Tensor(const std::string& name, c10::ScalarType dtype, c10::Device device)>;
// A 2-D weight as FP8 rows; a weight that must be quantized is quantized on `device` (where the reader's
// caller wants it), stored FP8 comes as read.
using Fp8Source = std::function<model::Fp8Rows(const std::string& name, c10::Device device)>;
// The [rows] float32 scales of a weight's FP8 rows without its values (on the CPU).
using Fp8ScaleSource = std::function<at::Tensor(const std::string& weight)>;

// The reader of a weight format. kDense: `dense`. kFp8: the tensors `eligible` names (the FLUX blocks'
// linear weights by default) come from `fp8` as float8 values, and "<layer>.weight_scale" serves the
// scales of the weight read just before (kept until asked for; when asked first, from `scale` if given,
// else by reading the weight); every other tensor comes from `dense`. Safe to call from several threads.
TensorReader formatReader(model::WeightFormat format, TensorReader dense, Fp8Source fp8,
                          bool (*eligible)(const std::string&) = model::fluxFp8Eligible,
                          Fp8ScaleSource scale = nullptr);
// The reader of a checkpoint in a format (stored FP8 read as is; anything else quantized while loading).
// The checkpoint must outlive the reader.
TensorReader checkpointReader(const io::FluxCheckpoint& checkpoint, model::WeightFormat format);
// A model::WeightGetter over a reader, for one dtype and device.
model::WeightGetter getterOf(TensorReader read, c10::ScalarType dtype, c10::Device device = c10::kCPU);

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
                    std::shared_ptr<model::AttentionBackend> attention = nullptr,
                    model::WeightFormat format = model::WeightFormat::kDense);

// The schedule for a model: shift (dev), plain (schnell), or auto: scheduler/scheduler_config.json next
// to a diffusers transformer when present, else shifted iff the model has guidance embeddings.
SchedulerConfig resolveSchedule(Schedule schedule, const io::FluxCheckpoint& checkpoint);
// The same for a model without a checkpoint (a preset held in memory).
SchedulerConfig resolveSchedule(Schedule schedule, const model::FluxConfig& config);

}  // namespace pardit::pipeline
