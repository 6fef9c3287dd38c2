#pragma once
// The text encoders' weights: a transformers model directory (text_encoder/, text_encoder_2/: config.json
// and model.safetensors, or shards listed in model.safetensors.index.json), a pipeline directory holding
// it, or a single file of the kind kept beside BFL checkpoints (clip_l.safetensors, t5xxl_fp16.safetensors,
// t5xxl_fp8_e4m3fn.safetensors; the configuration is read from the tensor shapes, and CLIP's head count
// from __metadata__ "num_attention_heads" when present, else 64-wide heads as in CLIP-L). Only the byte ranges
// of the tensors that are loaded are read; float8 weights are converted to the compute dtype on loading.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pardit/io/safetensors.h"
#include "pardit/model/fp8.h"
#include "pardit/model/text_encoders.h"

namespace pardit::io {

class TensorStore {
 public:
  // A directory with model.safetensors or an index, or one .safetensors file. Names may carry one of
  // `prefixes` (stripped); `alias` maps a missing name to another (T5's tied embedding).
  static TensorStore open(const std::string& path, const std::vector<std::string>& prefixes = {});
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  // In dtype (float8 weights dequantized with their scale tensors, when the file has them).
  at::Tensor load(const std::string& name, c10::ScalarType dtype, c10::Device device = c10::kCPU) const;
  // A 2-D weight as FP8 rows: stored float8_e4m3fn as is (with its scales, 1 for plain casts), on the CPU;
  // anything else quantized row by row on `quantizeOn`, where the result then is.
  model::Fp8Rows loadFp8(const std::string& name, c10::Device quantizeOn = c10::kCPU) const;
  bool storedFp8(const std::string& name) const;
  model::WeightGetter getter(c10::ScalarType dtype, c10::Device device = c10::kCPU) const;
  uint64_t bytesRead() const;
  uint64_t bytesOf(const std::vector<model::TensorSpec>& tensors) const;  // stored bytes of these tensors
  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const;  // of the first file
  void alias(const std::string& name, const std::string& target);

 private:
  at::Tensor scaleOf(const std::string& name) const;  // [rows] float32 of a scaled float8 weight, else undefined
  std::string path_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, std::string>> where_;  // internal name -> (file, name in the file)
};

struct ClipTextCheckpoint {
  model::ClipTextConfig config;
  TensorStore store;
  // text_encoder/ (or a pipeline directory holding it), or a single file such as clip_l.safetensors.
  static ClipTextCheckpoint open(const std::string& path);
};

struct T5Checkpoint {
  model::T5Config config;
  TensorStore store;
  // text_encoder_2/ (or a pipeline directory holding it), or a single file such as t5xxl_fp16.safetensors.
  static T5Checkpoint open(const std::string& path);
  // kFp8 when the layers' linear weights are stored as float8_e4m3fn (t5xxl_fp8_e4m3fn files), else kDense.
  model::WeightFormat storedFormat() const;
};

// config.json content as transformers writes it, for synth.
std::string clipTextConfigJson(const model::ClipTextConfig& config);
std::string t5ConfigJson(const model::T5Config& config);

}  // namespace pardit::io
