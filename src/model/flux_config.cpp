#include "pardit/model/flux_config.h"
#include "pardit/model/fp8.h"

#include <numeric>
#include <sstream>

#include "pardit/core/error.h"

namespace pardit::model {

void FluxConfig::validate() const {
  PARDIT_CHECK(hiddenSize > 0 && numHeads > 0, "model config: hidden size and head count must be positive");
  PARDIT_CHECK(hiddenSize % numHeads == 0, "model config: hidden size ", hiddenSize,
               " is not divisible by the head count ", numHeads);
  const int64_t sumAxes = std::accumulate(axesDim.begin(), axesDim.end(), int64_t{0});
  PARDIT_CHECK(axesDim.size() == 3, "model config: expected 3 RoPE axes, got ", axesDim.size());
  PARDIT_CHECK(sumAxes == headDim(), "model config: RoPE axes sum to ", sumAxes, " but the head dim is ", headDim());
  for (int64_t a : axesDim) PARDIT_CHECK(a % 2 == 0, "model config: RoPE axis dims must be even, got ", a);
  PARDIT_CHECK(inChannels > 0 && outChannels > 0 && vecInDim > 0 && contextInDim > 0 && mlpHidden > 0,
               "model config: dimensions must be positive");
  PARDIT_CHECK(depth >= 0 && depthSingle >= 0 && depth + depthSingle > 0, "model config: no transformer blocks");
  // Far beyond any real model (FLUX.1: 19 + 38 blocks, width 3072): a config past these is damaged, and
  // would otherwise ask for absurd allocations.
  constexpr int64_t kMaxBlocks = 4096, kMaxDim = int64_t{1} << 20;
  PARDIT_CHECK(depth <= kMaxBlocks && depthSingle <= kMaxBlocks, "model config: ", depth, " double + ", depthSingle,
               " single blocks is beyond ", kMaxBlocks, " each (a damaged config?)");
  for (int64_t d : {hiddenSize, mlpHidden, inChannels, outChannels, vecInDim, contextInDim})
    PARDIT_CHECK(d <= kMaxDim, "model config: dimension ", d, " is beyond ", kMaxDim, " (a damaged config?)");
}

std::string FluxConfig::describe() const {
  std::ostringstream os;
  os << "hidden " << hiddenSize << ", heads " << numHeads << " x " << headDim() << ", mlp " << mlpHidden << ", blocks "
     << depth << " double + " << depthSingle << " single, in " << inChannels << ", context " << contextInDim
     << ", pooled " << vecInDim << ", axes [" << axesDim[0] << "," << axesDim[1] << "," << axesDim[2] << "], guidance "
     << (guidanceEmbed ? "yes" : "no");
  return os.str();
}

std::vector<std::string> FluxConfig::presetNames() { return {"tiny", "small", "medium", "flux-dev", "flux-schnell"}; }

FluxConfig FluxConfig::preset(const std::string& name) {
  FluxConfig c;  // defaults are FLUX.1-dev
  // Smaller models keep the real structure (MLP ratio 4, head dim = the RoPE axes' sum):
  //   tiny:   every structural rule of the real model at a few hundred thousand parameters;
  //   small:  a CPU-sized benchmark model, the real head dim and RoPE axes at 1/4 of the width;
  //   medium: FLUX.1-dev's 19 double + 38 single blocks and interface dims at 1/3 of the width
  //           (1.3 B parameters, 2.6 GB in bf16).
  struct Shape {
    const char* name;
    int64_t vecInDim, contextInDim, hiddenSize, numHeads, depth, depthSingle;
    std::vector<int64_t> axesDim;
  };
  static const std::vector<Shape> kShapes = {
      {"tiny", 32, 32, 64, 4, 2, 2, {4, 4, 8}},
      {"small", 256, 1024, 768, 6, 4, 8, {16, 56, 56}},
      {"medium", c.vecInDim, c.contextInDim, 1024, 8, c.depth, c.depthSingle, c.axesDim}};
  if (name == "flux-dev") return c;
  if (name == "flux-schnell") {
    c.guidanceEmbed = false;
    return c;
  }
  for (const auto& s : kShapes) {
    if (name != s.name) continue;
    c.vecInDim = s.vecInDim;
    c.contextInDim = s.contextInDim;
    c.hiddenSize = s.hiddenSize;
    c.numHeads = s.numHeads;
    c.mlpHidden = 4 * s.hiddenSize;
    c.depth = s.depth;
    c.depthSingle = s.depthSingle;
    c.axesDim = s.axesDim;
    return c;
  }
  PARDIT_THROW("unknown preset '", name, "' (expected tiny, small, medium, flux-dev or flux-schnell)");
}

namespace {
void addLinear(std::vector<TensorSpec>& t, const std::string& prefix, int64_t out, int64_t in) {
  t.push_back({prefix + ".weight", {out, in}});
  t.push_back({prefix + ".bias", {out}});
}
}  // namespace

std::string weightFormatName(WeightFormat format) { return format == WeightFormat::kFp8 ? "fp8" : "dense"; }

bool fluxFp8Eligible(const std::string& name) {
  const bool block = name.rfind("double_blocks.", 0) == 0 || name.rfind("single_blocks.", 0) == 0;
  const std::string suffix = ".weight";
  return block && name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<WeightGroupSpec> fluxWeightGroups(const FluxConfig& c, WeightFormat format) {
  const int64_t h = c.hiddenSize, d = c.headDim();
  std::vector<WeightGroupSpec> groups;
  // The conditioning embedders (every pipeline stage computes the conditioning vector), then the input
  // projections (first stage only).
  WeightGroupSpec emb{"conditioning", {}};
  addLinear(emb.tensors, "time_in.in_layer", h, 256);
  addLinear(emb.tensors, "time_in.out_layer", h, h);
  if (c.guidanceEmbed) {
    addLinear(emb.tensors, "guidance_in.in_layer", h, 256);
    addLinear(emb.tensors, "guidance_in.out_layer", h, h);
  }
  addLinear(emb.tensors, "vector_in.in_layer", h, c.vecInDim);
  addLinear(emb.tensors, "vector_in.out_layer", h, h);
  groups.push_back(std::move(emb));
  WeightGroupSpec input{"input_embedders", {}};
  addLinear(input.tensors, "img_in", h, c.inChannels);
  addLinear(input.tensors, "txt_in", h, c.contextInDim);
  groups.push_back(std::move(input));
  for (int64_t i = 0; i < c.depth; ++i) {
    const std::string p = "double_blocks." + std::to_string(i);
    WeightGroupSpec g{p, {}};
    for (const char* s : {"img", "txt"}) {
      const std::string q = p + "." + s;
      addLinear(g.tensors, q + "_mod.lin", 6 * h, h);
      addLinear(g.tensors, q + "_attn.qkv", 3 * h, h);
      g.tensors.push_back({q + "_attn.norm.query_norm.scale", {d}});
      g.tensors.push_back({q + "_attn.norm.key_norm.scale", {d}});
      addLinear(g.tensors, q + "_attn.proj", h, h);
      addLinear(g.tensors, q + "_mlp.0", c.mlpHidden, h);
      addLinear(g.tensors, q + "_mlp.2", h, c.mlpHidden);
    }
    groups.push_back(std::move(g));
  }
  for (int64_t i = 0; i < c.depthSingle; ++i) {
    const std::string p = "single_blocks." + std::to_string(i);
    WeightGroupSpec g{p, {}};
    addLinear(g.tensors, p + ".modulation.lin", 3 * h, h);
    addLinear(g.tensors, p + ".linear1", 3 * h + c.mlpHidden, h);
    g.tensors.push_back({p + ".norm.query_norm.scale", {d}});
    g.tensors.push_back({p + ".norm.key_norm.scale", {d}});
    addLinear(g.tensors, p + ".linear2", h, h + c.mlpHidden);
    groups.push_back(std::move(g));
  }
  WeightGroupSpec fin{"final_layer", {}};
  addLinear(fin.tensors, "final_layer.adaLN_modulation.1", 2 * h, h);
  addLinear(fin.tensors, "final_layer.linear", c.outChannels, h);
  groups.push_back(std::move(fin));
  if (format == WeightFormat::kFp8)
    for (auto& g : groups) g.tensors = withFp8(g.tensors, fluxFp8Eligible);
  return groups;
}

}  // namespace pardit::model
