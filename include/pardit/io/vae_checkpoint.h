#pragma once
// The FLUX VAE's decoder weights: a diffusers vae/ directory (config.json and
// diffusion_pytorch_model.safetensors), a pipeline directory holding vae/, or a BFL ae.safetensors
// file (its decoder.* tensors; the configuration is read from the shapes, and from the file's
// __metadata__ for what shapes cannot tell: norm_num_groups, scaling_factor, shift_factor, with
// FLUX.1's 32, 0.3611, 0.1159 by default). Only the decoder's byte ranges are read.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <map>
#include <memory>
#include <string>

#include "pardit/io/checkpoint.h"
#include "pardit/io/safetensors.h"
#include "pardit/model/vae.h"

namespace pardit::io {

class VaeCheckpoint {
 public:
  // Discovers and validates every decoder tensor's name and shape; reads no tensor data.
  static VaeCheckpoint open(const std::string& path);
  // The VAE that belongs to a transformer checkpoint: vae/ next to a diffusers transformer, or
  // ae.safetensors next to a BFL file. Empty when there is none.
  static std::string findBeside(const FluxCheckpoint& transformer);

  const std::string& path() const { return path_; }
  CheckpointLayout layout() const { return layout_; }
  const model::VaeConfig& config() const { return config_; }
  at::Tensor load(const std::string& name, c10::ScalarType dtype, c10::Device device = c10::kCPU) const;
  model::WeightGetter getter(c10::ScalarType dtype, c10::Device device = c10::kCPU) const;
  uint64_t bytesRead() const { return file_->bytesRead(); }

 private:
  struct Source {
    std::string tensor;          // name in the file
    std::vector<int64_t> shape;  // internal shape (BFL attention weights are 1x1 convs: reshaped)
  };
  std::string path_;
  CheckpointLayout layout_ = CheckpointLayout::kDiffusers;
  model::VaeConfig config_;
  std::shared_ptr<SafetensorsFile> file_;
  std::map<std::string, Source> sources_;
};

// The BFL (ae.safetensors) name of an internal (diffusers) decoder tensor, for a VAE with `levels` levels.
std::string bflVaeName(const std::string& internal, int64_t levels);

// vae/config.json content for a config (as diffusers writes it).
std::string vaeConfigJson(const model::VaeConfig& config);

}  // namespace pardit::io
