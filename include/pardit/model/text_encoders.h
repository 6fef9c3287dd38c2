#pragma once
// FLUX.1's text encoders, numerically following transformers:
//   * CLIPTextModel (CLIP ViT-L/14's text tower): token + position embeddings, pre-LN layers with causal
//     self-attention and quick_gelu MLPs, final LayerNorm; FLUX uses the pooled output: the hidden state at
//     the first end-of-text token (argmax of the ids for the legacy eos_token_id 2).
//   * T5EncoderModel (T5 v1.1): token embeddings, RMSNorm layers (variance in float32), self-attention
//     without 1/sqrt(d) scaling plus a bidirectional relative position bias from the first block, gated-GELU
//     (tanh) feed-forward, final RMSNorm; the clamp transformers applies to float16 activations.
// Weights come in through a WeightGetter by transformers' tensor names ("encoder.layers.0.mlp.fc1.weight" for
// CLIP, read with or without the "text_model." prefix older files carry;
// "encoder.block.0.layer.0.SelfAttention.q.weight" for T5); no attention masks (FLUX passes none).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "pardit/model/flux.h"

namespace pardit::model {

struct ClipTextConfig {
  int64_t vocabSize = 49408;
  int64_t hiddenSize = 768;
  int64_t intermediateSize = 3072;
  int64_t numLayers = 12;
  int64_t numHeads = 12;
  int64_t maxPositions = 77;
  double eps = 1e-5;
  int64_t eosTokenId = 2;  // 2: the legacy pooling (argmax of the ids)

  void validate() const;
  std::string describe() const;
};

struct T5Config {
  int64_t vocabSize = 32128;
  int64_t dModel = 4096;
  int64_t dKv = 64;
  int64_t dFf = 10240;
  int64_t numLayers = 24;
  int64_t numHeads = 64;
  int64_t buckets = 32;
  int64_t maxDistance = 128;
  double eps = 1e-6;

  void validate() const;
  std::string describe() const;
};

// Every tensor, by transformers' names, with its shape.
std::vector<TensorSpec> clipTextTensors(const ClipTextConfig& config);
// With kFp8 the layers' linear weights are FP8 with their scales (t5Fp8Eligible).
std::vector<TensorSpec> t5EncoderTensors(const T5Config& config, WeightFormat format = WeightFormat::kDense);
// Whether a T5 tensor is FP8 under WeightFormat::kFp8: the q, k, v, o, wi_0, wi_1 and wo weights of the layers.
bool t5Fp8Eligible(const std::string& name);
// T5's weight groups for streaming: "t5.embeddings" (shared + relative bias), "t5.block.i", "t5.final".
std::vector<WeightGroupSpec> t5WeightGroups(const T5Config& config, WeightFormat format = WeightFormat::kDense);

class ClipTextModel {
 public:
  ClipTextModel(ClipTextConfig config, const WeightGetter& get);
  const ClipTextConfig& config() const { return config_; }
  // ids [B, L] (L <= maxPositions) -> the pooled output [B, hidden] in the weights' dtype.
  at::Tensor pooled(const at::Tensor& ids) const;
  // The last hidden state [B, L, hidden].
  at::Tensor hidden(const at::Tensor& ids) const;
  uint64_t weightBytes() const { return weights_.bytes(); }

 private:
  ClipTextConfig config_;
  NamedWeights weights_;
  const at::Tensor& w(const std::string& name) const { return weights_.at(name); }
};

class T5Encoder {
 public:
  // `get` is called for each tensor when a block runs (a resident getter returns what it holds; a
  // streaming one may read it then).
  T5Encoder(T5Config config, WeightGetter get);
  const T5Config& config() const { return config_; }
  // ids [B, L] -> last_hidden_state [B, L, dModel] in the weights' dtype.
  at::Tensor forward(const at::Tensor& ids) const;

 private:
  at::Tensor positionBias(int64_t length, const at::Tensor& table) const;
  at::Tensor linear(const at::Tensor& x, const std::string& weight) const;  // dense or FP8 (and its scale)
  T5Config config_;
  WeightGetter get_;
};

// T5's bidirectional relative position buckets for relative positions key - query: [L, L] int64.
at::Tensor t5RelativeBuckets(int64_t length, int64_t buckets, int64_t maxDistance);

}  // namespace pardit::model
