#pragma once
// EngineOptions: what an Engine loads and how it runs (the model and its encoders, dtypes, device,
// parallel layout, memory budgets, streaming, attention, metrics). What is asked of it is a request
// (pipeline/engine.h: GenerateRequest), so one loaded engine serves any number of them.
//
// The library never parses a command line: the `pardit` executable (src/app) turns its options into
// these structs, and a C++ program fills them in directly:
//
//   pipeline::EngineOptions options;
//   options.model = "FLUX.1-dev";
//   options.ulyssesDegree = 2;
//   options.check();   // Engine's constructor checks again, on every rank together
#include <cstdint>
#include <map>
#include <string>

#include "pardit/dist/runtime.h"
#include "pardit/memory/planner.h"
#include "pardit/parallel/pipefusion.h"

namespace pardit::pipeline {

enum class Dtype { kAuto, kBf16, kFp16, kFp32 };  // auto: bf16 on CUDA, fp32 on the CPU
// auto: FP8 when the checkpoint stores FP8 block weights, else the compute dtype; fp8: block weights in FP8
// (quantized while loading when stored otherwise); compute: every weight in the compute dtype.
enum class WeightDtype { kAuto, kFp8, kCompute };
enum class Schedule { kAuto, kShift, kPlain };  // auto: the checkpoint's scheduler config, else by the model
enum class EncoderDevice { kAuto, kCpu };       // auto: the rank's device
enum class VaeTiling { kAuto, kOn, kOff };      // auto: tiled only when the whole decode does not fit
enum class Attention { kAuto, kFlash, kEfficient, kCudnn, kMath };  // the transformer's attention kernel

struct EngineOptions {
  // The model: a checkpoint directory or file, or (empty) a preset's synthetic weights in memory.
  std::string model;
  std::string preset = "tiny";
  bool strict = false;  // unexpected checkpoint contents are errors, not warnings
  // The VAE (vae/ directory or ae.safetensors; empty: the one beside the model) and its decode.
  std::string vae;
  VaeTiling vaeTiling = VaeTiling::kAuto;
  int64_t vaeTileSize = 0;  // pixels; 0: the VAE's sample_size, halved until a tile fits
  // The text encoders and tokenizers (empty: the model's own), and where they run.
  std::string textEncoder, textEncoder2, tokenizer, tokenizer2;
  int textEncoderRank = -1;  // the rank of a replica group that encodes; -1: the one with the most spare memory
  EncoderDevice textEncoderDevice = EncoderDevice::kAuto;

  Dtype dtype = Dtype::kAuto;
  WeightDtype weightDtype = WeightDtype::kAuto;
  dist::DeviceKind device = dist::DeviceKind::kAuto;
  bool cudaGraphs = false;  // capture the transformer call in a CUDA graph and replay it
  Attention attention = Attention::kAuto;

  // The layout of one replica group: cfg x pipefusion x ring x ulysses ranks. A job of
  // dataParallelDegree groups has that many times the ranks (pipeline/queue.h deals requests to them).
  int dataParallelDegree = 1;
  int cfgDegree = 1;
  int pipefusionDegree = 1;
  int ringDegree = 1;
  int ulyssesDegree = 1;
  int numPipelinePatch = 0;  // 0: the PipeFusion degree
  int warmupSteps = 1;
  parallel::Partition ppPartition;
  double collectiveTimeout = 300;  // seconds a blocking collective may take before the job ends; 0: off

  memory::MemoryBudget deviceMemoryBudget;
  memory::MemoryBudget hostMemoryBudget;
  memory::Offload offload = memory::Offload::kAuto;
  memory::StreamSource streamFrom = memory::StreamSource::kAuto;

  std::string metrics;  // an HDF5 file every run is appended to (empty: none)
  // Provenance recorded with the metrics (option name -> value); the command line's options for `pardit`.
  std::map<std::string, std::string> provenance;

  // The degrees of one replica group.
  dist::ParallelDegrees degrees() const;
  // Ranks of the whole job: dataParallelDegree x the group's.
  int worldSize() const { return dataParallelDegree * degrees().worldSize(); }
  // Throws naming the option when a value is out of range (degrees below 1, a negative tile size, ...).
  void check() const;
};

// The names the command line uses ("bf16", "sequential", ...), for messages.
const char* dtypeOptionName(Dtype v);
const char* offloadName(memory::Offload v);
const char* vaeTilingName(VaeTiling v);

}  // namespace pardit::pipeline
