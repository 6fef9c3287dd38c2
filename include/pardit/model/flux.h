#pragma once
// The FLUX.1 transformer forward, numerically following diffusers' FluxTransformer2DModel (op order
// and precision of every step), with BFL's fused q|k|v and linear1 weights.
//
// Pure math: weights come in through a FluxWeightProvider (resident, streamed or sharded), attention
// goes out through an AttentionBackend (local or parallel).

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pardit/model/attention.h"
#include "pardit/model/flux_config.h"

namespace pardit::model {

// A linear layer's weights: dense in the compute dtype, or FP8 rows with their scales (model/fp8.h).
struct Linear {
  at::Tensor weight;  // [out, in]: compute dtype, or float8_e4m3fn
  at::Tensor bias;    // [out]
  at::Tensor scale;   // [out] float32 when weight is FP8, else undefined
  at::Tensor operator()(const at::Tensor& x) const;
};

struct EmbedderWeights {
  Linear timeIn1, timeIn2, guidanceIn1, guidanceIn2, vectorIn1, vectorIn2;  // "conditioning"
  Linear imgIn, txtIn;  // "input_embedders"; undefined where the first pipeline stage is not held
};

struct DoubleBlockWeights {
  struct Stream {
    Linear mod;               // [6h, h]: shift1, scale1, gate1, shift2, scale2, gate2
    Linear qkv;               // [3h, h]: q | k | v, head-major
    Linear proj;              // [h, h]
    Linear mlp0;              // [mlp, h]
    Linear mlp2;              // [h, mlp]
    at::Tensor qNorm, kNorm;  // [D]
  };
  Stream img, txt;
};

struct SingleBlockWeights {
  Linear mod;      // [3h, h]: shift, scale, gate
  Linear linear1;  // [3h + mlp, h]: q | k | v | mlp
  Linear linear2;  // [h, h + mlp]: input columns attn | mlp
  at::Tensor qNorm, kNorm;
};

struct FinalLayerWeights {
  Linear adaLN;   // [2h, h]: shift | scale (BFL order)
  Linear linear;  // [out, h]
};

// Fetches a tensor by internal name, already in the compute dtype and on the compute device. A getter for
// FP8 weights returns a linear layer's "<layer>.weight" as float8_e4m3fn and then serves its
// "<layer>.weight_scale" ([out] float32); the layers build themselves from what they get.
using WeightGetter = std::function<at::Tensor(const std::string& name)>;

// A model's weights by name: every tensor of `specs` from `get`, checked against its shape (errors name
// `model` and the tensor).
class NamedWeights {
 public:
  NamedWeights(const std::vector<TensorSpec>& specs, const WeightGetter& get, std::string model);
  const at::Tensor& at(const std::string& name) const;
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  uint64_t bytes() const;

 private:
  std::map<std::string, at::Tensor> tensors_;
  std::string model_;
};

EmbedderWeights makeEmbedderWeights(const FluxConfig& c, const WeightGetter& get, bool withInputProjections = true);
DoubleBlockWeights makeDoubleBlockWeights(const FluxConfig& c, int64_t index, const WeightGetter& get);
SingleBlockWeights makeSingleBlockWeights(const FluxConfig& c, int64_t index, const WeightGetter& get);
FinalLayerWeights makeFinalLayerWeights(const FluxConfig& c, const WeightGetter& get);

// Source of weights, one group at a time. A resident provider returns what it holds; a streaming
// provider may fetch on demand and drop a group once the returned pointer is released.
class FluxWeightProvider {
 public:
  virtual ~FluxWeightProvider() = default;
  virtual std::shared_ptr<const EmbedderWeights> embedders() = 0;
  virtual std::shared_ptr<const DoubleBlockWeights> doubleBlock(int64_t index) = 0;
  virtual std::shared_ptr<const SingleBlockWeights> singleBlock(int64_t index) = 0;
  virtual std::shared_ptr<const FinalLayerWeights> finalLayer() = 0;
  // The run's last forward is done: a provider that reads ahead stops reading (nothing more is needed).
  virtual void endOfRun() {}
};

// Weight groups held in memory: all of them, or a pipeline stage's share (group names as in
// fluxWeightGroups(); the conditioning embedders are always held). Asking for a group that is not
// held is an error.
class ResidentFluxWeights final : public FluxWeightProvider {
 public:
  ResidentFluxWeights(const FluxConfig& config, const WeightGetter& get);
  ResidentFluxWeights(const FluxConfig& config, const WeightGetter& get, const std::vector<std::string>& groups);
  std::shared_ptr<const EmbedderWeights> embedders() override { return emb_; }
  std::shared_ptr<const DoubleBlockWeights> doubleBlock(int64_t i) override;
  std::shared_ptr<const SingleBlockWeights> singleBlock(int64_t i) override;
  std::shared_ptr<const FinalLayerWeights> finalLayer() override;

 private:
  std::shared_ptr<const EmbedderWeights> emb_;
  std::vector<std::shared_ptr<const DoubleBlockWeights>> double_;
  std::vector<std::shared_ptr<const SingleBlockWeights>> single_;
  std::shared_ptr<const FinalLayerWeights> final_;
};

// Inputs of one transformer call, named and scaled like diffusers' FluxTransformer2DModel.forward.
struct FluxInputs {
  at::Tensor img;       // [B, Li, inChannels]  packed latents ("hidden_states")
  at::Tensor txt;       // [B, Lt, contextInDim] ("encoder_hidden_states")
  at::Tensor pooled;    // [B, vecInDim] ("pooled_projections")
  at::Tensor timestep;  // [B] sigma in [0, 1]; multiplied by 1000 inside
  at::Tensor guidance;  // [B] guidance scale, multiplied by 1000 inside; undefined without guidance embeds
  at::Tensor imgIds;    // [Li, 3]
  at::Tensor txtIds;    // [Lt, 3]
};

// Per-call conditioning shared by all blocks.
struct FluxConditioning {
  at::Tensor vec;       // [B, h]   time (+ guidance) + pooled text embedding
  at::Tensor siluVec;   // [B, h]   SiLU(vec), the input of every modulation
  at::Tensor cos, sin;  // [1, L, 1, D] float32 RoPE tables for the joint [txt ; img] sequence
};

// Position ids of the image tokens of a rows x cols token grid: [rows * cols, 3] rows (0, r, c), row-major,
// float32; and of T text tokens: [T, 3] zeros.
at::Tensor imagePositionIds(int64_t rows, int64_t cols);
at::Tensor textPositionIds(int64_t textLen);

// RoPE tables for position ids [L, 3]: returns (cos, sin), each [L, D] float32, computed in float64 on the ids'
// device (no host synchronization).
std::pair<at::Tensor, at::Tensor> ropeTables(const at::Tensor& ids, const std::vector<int64_t>& axesDim, double theta);
// Sinusoidal embedding [B, 256] (cos half first), float32, of t (already scaled by 1000).
at::Tensor timestepEmbedding(const at::Tensor& t, int64_t dim = 256);

class FluxTransformer {
 public:
  FluxTransformer(FluxConfig config, std::shared_ptr<FluxWeightProvider> weights,
                  std::shared_ptr<AttentionBackend> attention);

  const FluxConfig& config() const { return config_; }
  // Full forward: [B, Li, outChannels] in the weights' dtype.
  at::Tensor forward(const FluxInputs& in) const;

  // The pieces of forward(), for pipelines that run a subset of the blocks.
  FluxConditioning conditioning(const FluxInputs& in) const;
  at::Tensor embedImage(const at::Tensor& img) const;  // [B, Li, h]
  at::Tensor embedText(const at::Tensor& txt) const;   // [B, Lt, h]
  // Double block i on (img, txt) in place of the inputs.
  void doubleBlock(int64_t i, at::Tensor& img, at::Tensor& txt, const FluxConditioning& cond) const;
  // Single block i on x = [txt ; img].
  at::Tensor singleBlock(int64_t i, const at::Tensor& x, int64_t textLen, const FluxConditioning& cond) const;
  at::Tensor finalLayer(const at::Tensor& img, const FluxConditioning& cond) const;

  c10::ScalarType dtype() const { return dtype_; }

 private:
  // Attention of RoPE'd q, k and v, each [B, L, H, D]; returns [B, L, H, D] (a view of the backend's
  // [B, H, L, D] result: the caller's one copy makes it contiguous where it is needed).
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t textLen, int layer) const;

  FluxConfig config_;
  std::shared_ptr<FluxWeightProvider> weights_;
  std::shared_ptr<AttentionBackend> attention_;
  c10::ScalarType dtype_;
};

}  // namespace pardit::model
