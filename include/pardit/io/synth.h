#pragma once
// Writes random-weight FLUX checkpoints with the real file layouts and tensor names, for tests,
// benchmarks and the quickstart. Values are a pure function of (seed, internal tensor name), so the
// diffusers and BFL layouts of one seed hold the same model.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>

#include "pardit/io/checkpoint.h"
#include "pardit/model/flux_config.h"
#include "pardit/model/text_encoders.h"
#include "pardit/model/vae.h"

namespace pardit::io {

struct SynthOptions {
  model::FluxConfig config;
  std::string presetName;
  CheckpointLayout layout = CheckpointLayout::kDiffusers;
  std::string outDir;
  uint64_t seed = 0;
  c10::ScalarType dtype = c10::kFloat;
  bool zeros = false;                      // sparse files with zero data
  uint64_t shardSize = 10'000'000'000ULL;  // largest diffusers shard
  int64_t textLen = 16;                    // tokens of the sample prompt embeddings
  // The VAE and text encoder configurations; unset: the preset's (realConfigs(): FLUX.1's VAE, CLIP-L and
  // T5-XXL; else smaller ones with the same structure, sized to the transformer).
  bool withVae = true;  // also the VAE decoder (vae/ or ae.safetensors)
  std::optional<model::VaeConfig> vaeConfig;
  // The text encoders and tokenizers (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ in the
  // diffusers layout; clip_l.safetensors, t5xxl_fp16.safetensors and tokenizer folders beside a BFL file).
  bool withText = true;
  std::optional<model::ClipTextConfig> clipConfig;
  std::optional<model::T5Config> t5Config;

  // flux-dev and flux-schnell: the real pipeline's parts; the others test sizes (medium: FLUX.1's VAE).
  bool realConfigs() const;
  model::VaeConfig vae() const;
  model::ClipTextConfig clip() const;
  model::T5Config t5() const;
};

struct SynthResult {
  std::string modelPath;           // what to pass as --model
  std::string promptEmbedsPath;    // sample prompt embeddings
  std::string negativeEmbedsPath;  // sample negative prompt embeddings
  uint64_t tensorBytes = 0;
  int files = 0;
  std::string vaePath;  // vae/ or ae.safetensors ("" without a VAE)
  uint64_t vaeBytes = 0;
  uint64_t textEncoderBytes = 0;  // CLIP and T5 together
};

// The value of internal tensor `name` (deterministic in seed and name), float32.
at::Tensor synthTensor(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape);

SynthResult synthesizeCheckpoint(const SynthOptions& options);

}  // namespace pardit::io
