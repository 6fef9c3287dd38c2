#pragma once
// Writes random-weight FLUX checkpoints with the real file layouts and tensor names, for tests,
// benchmarks and the quickstart. Values are a pure function of (seed, internal tensor name), so the
// diffusers and BFL layouts of one seed hold the same model.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "pardit/io/checkpoint.h"
#include "pardit/model/flux_config.h"
#include "pardit/model/vae.h"

namespace pardit::io {

struct SynthOptions {
  model::FluxConfig config;
  std::string presetName;
  CheckpointLayout layout = CheckpointLayout::kDiffusers;
  std::string outDir;
  uint64_t seed = 0;
  c10::ScalarType dtype = c10::kFloat;
  bool zeros = false;                        // sparse files with zero data
  uint64_t shardSize = 10'000'000'000ULL;    // largest diffusers shard
  int64_t textLen = 16;                      // tokens of the sample prompt embeddings
  bool withVae = true;                       // also the VAE decoder (vae/ or ae.safetensors)
  model::VaeConfig vaeConfig;
};

struct SynthResult {
  std::string modelPath;          // what to pass as --model
  std::string promptEmbedsPath;   // sample prompt embeddings
  std::string negativeEmbedsPath; // sample negative prompt embeddings
  uint64_t tensorBytes = 0;
  int files = 0;
  std::string vaePath;            // vae/ or ae.safetensors ("" without a VAE)
  uint64_t vaeBytes = 0;
};

// The value of internal tensor `name` (deterministic in seed and name), float32.
at::Tensor synthTensor(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape);

SynthResult synthesizeCheckpoint(const SynthOptions& options);

}  // namespace pardit::io
