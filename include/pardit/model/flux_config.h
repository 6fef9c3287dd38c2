#pragma once
// Hyper-parameters of a FLUX.1 transformer, and the internal tensor naming.
//
// pardit's internal tensor names are the BFL single-file names ("double_blocks.3.img_attn.qkv.weight"):
// the fused q|k|v and linear1 layouts give fewer, larger GEMMs. io/ maps the diffusers layout onto them.

#include <cstdint>
#include <string>
#include <vector>

namespace pardit::model {

struct FluxConfig {
  int64_t inChannels = 64;  // packed latent channels (16 latent channels x 2 x 2)
  int64_t outChannels = 64;
  int64_t vecInDim = 768;       // pooled text embedding (CLIP-L)
  int64_t contextInDim = 4096;  // text token embedding (T5-XXL)
  int64_t hiddenSize = 3072;
  int64_t numHeads = 24;
  int64_t mlpHidden = 12288;  // hiddenSize * mlp_ratio
  int64_t depth = 19;         // double-stream blocks
  int64_t depthSingle = 38;   // single-stream blocks
  std::vector<int64_t> axesDim = {16, 56, 56};
  double theta = 10000.0;
  bool guidanceEmbed = true;  // FLUX.1-dev: true, schnell: false

  int64_t headDim() const { return hiddenSize / numHeads; }
  // Throws pardit::Error naming the violated rule.
  void validate() const;
  std::string describe() const;

  // "tiny" | "small" | "flux-dev" | "flux-schnell"
  static FluxConfig preset(const std::string& name);
  static std::vector<std::string> presetNames();
};

// How a tensor is stored on the device: in the compute dtype, as FP8 (e4m3fn) values, or float32 (scales).
enum class TensorStorage { kCompute, kFp8, kFloat32 };

// One tensor the model expects: internal name, shape, storage.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  TensorStorage storage = TensorStorage::kCompute;
};

// The weights' format: every tensor in the compute dtype, or the blocks' linear weights in FP8 with one
// float32 scale per output row (model/fp8.h states the rule).
enum class WeightFormat { kDense, kFp8 };
std::string weightFormatName(WeightFormat format);

// A weight group is the unit of loading and residency: "conditioning" (time/guidance/pooled-text
// embedders, needed by every pipeline stage), "input_embedders" (img_in, txt_in: first stage),
// "double_blocks.i", "single_blocks.i", "final_layer" (last stage).
struct WeightGroupSpec {
  std::string name;
  std::vector<TensorSpec> tensors;
};

// Every tensor of the model, grouped, in execution order. With kFp8 the blocks' linear weights are
// kFp8 and each is followed by its "<layer>.weight_scale" ([out], kFloat32).
std::vector<WeightGroupSpec> fluxWeightGroups(const FluxConfig& config, WeightFormat format = WeightFormat::kDense);
// Whether an internal FLUX tensor is FP8 under WeightFormat::kFp8 (a linear weight inside a block).
bool fluxFp8Eligible(const std::string& name);

}  // namespace pardit::model
