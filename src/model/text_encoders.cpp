#include "pardit/model/text_encoders.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "pardit/core/error.h"
#include "pardit/model/fp8.h"

namespace pardit::model {

// ---- configurations ------------------------------------------------------------------------------------

void ClipTextConfig::validate() const {
  PARDIT_CHECK(vocabSize > 0 && hiddenSize > 0 && intermediateSize > 0 && numLayers > 0 && maxPositions > 0,
               "CLIP text config: sizes must be positive");
  PARDIT_CHECK(numHeads > 0 && hiddenSize % numHeads == 0, "CLIP text config: hidden size ", hiddenSize,
               " is not divisible by ", numHeads, " heads");
}

std::string ClipTextConfig::describe() const {
  std::ostringstream os;
  os << "CLIP text: hidden " << hiddenSize << ", " << numLayers << " layers, " << numHeads << " heads, mlp "
     << intermediateSize << ", vocab " << vocabSize << ", positions " << maxPositions;
  return os.str();
}

void T5Config::validate() const {
  PARDIT_CHECK(vocabSize > 0 && dModel > 0 && dKv > 0 && dFf > 0 && numLayers > 0 && numHeads > 0 && buckets > 1,
               "T5 config: sizes must be positive");
}

std::string T5Config::describe() const {
  std::ostringstream os;
  os << "T5 encoder: d_model " << dModel << ", " << numLayers << " layers, " << numHeads << " heads x " << dKv
     << ", d_ff " << dFf << ", vocab " << vocabSize;
  return os.str();
}

std::vector<TensorSpec> clipTextTensors(const ClipTextConfig& c) {
  const int64_t h = c.hiddenSize;
  std::vector<TensorSpec> t = {{"embeddings.token_embedding.weight", {c.vocabSize, h}},
                               {"embeddings.position_embedding.weight", {c.maxPositions, h}}};
  for (int64_t l = 0; l < c.numLayers; ++l) {
    const std::string p = "encoder.layers." + std::to_string(l) + ".";
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      t.push_back({p + "self_attn." + proj + ".weight", {h, h}});
      t.push_back({p + "self_attn." + proj + ".bias", {h}});
    }
    for (const char* ln : {"layer_norm1", "layer_norm2"}) {
      t.push_back({p + ln + ".weight", {h}});
      t.push_back({p + ln + ".bias", {h}});
    }
    t.push_back({p + "mlp.fc1.weight", {c.intermediateSize, h}});
    t.push_back({p + "mlp.fc1.bias", {c.intermediateSize}});
    t.push_back({p + "mlp.fc2.weight", {h, c.intermediateSize}});
    t.push_back({p + "mlp.fc2.bias", {h}});
  }
  t.push_back({"final_layer_norm.weight", {h}});
  t.push_back({"final_layer_norm.bias", {h}});
  return t;
}

bool t5Fp8Eligible(const std::string& name) {
  if (name.rfind("encoder.block.", 0) != 0) return false;
  for (const char* leaf :
       {".SelfAttention.q.weight", ".SelfAttention.k.weight", ".SelfAttention.v.weight", ".SelfAttention.o.weight",
        ".DenseReluDense.wi_0.weight", ".DenseReluDense.wi_1.weight", ".DenseReluDense.wo.weight"}) {
    const std::string l = leaf;
    if (name.size() > l.size() && name.compare(name.size() - l.size(), l.size(), l) == 0) return true;
  }
  return false;
}

std::vector<WeightGroupSpec> t5WeightGroups(const T5Config& c, WeightFormat format) {
  const int64_t inner = c.numHeads * c.dKv;
  std::vector<WeightGroupSpec> g;
  g.push_back({"t5.embeddings",
               {{"shared.weight", {c.vocabSize, c.dModel}},
                {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", {c.buckets, c.numHeads}}}});
  for (int64_t i = 0; i < c.numLayers; ++i) {
    const std::string p = "encoder.block." + std::to_string(i) + ".layer.";
    g.push_back({"t5.block." + std::to_string(i),
                 {{p + "0.layer_norm.weight", {c.dModel}},
                  {p + "0.SelfAttention.q.weight", {inner, c.dModel}},
                  {p + "0.SelfAttention.k.weight", {inner, c.dModel}},
                  {p + "0.SelfAttention.v.weight", {inner, c.dModel}},
                  {p + "0.SelfAttention.o.weight", {c.dModel, inner}},
                  {p + "1.layer_norm.weight", {c.dModel}},
                  {p + "1.DenseReluDense.wi_0.weight", {c.dFf, c.dModel}},
                  {p + "1.DenseReluDense.wi_1.weight", {c.dFf, c.dModel}},
                  {p + "1.DenseReluDense.wo.weight", {c.dModel, c.dFf}}}});
  }
  g.push_back({"t5.final", {{"encoder.final_layer_norm.weight", {c.dModel}}}});
  if (format == WeightFormat::kFp8)
    for (auto& group : g) group.tensors = withFp8(group.tensors, t5Fp8Eligible);
  return g;
}

std::vector<TensorSpec> t5EncoderTensors(const T5Config& c, WeightFormat format) {
  std::vector<TensorSpec> t;
  for (const auto& g : t5WeightGroups(c, format)) t.insert(t.end(), g.tensors.begin(), g.tensors.end());
  return t;
}

// ---- CLIP ----------------------------------------------------------------------------------------------

ClipTextModel::ClipTextModel(ClipTextConfig config, const WeightGetter& get)
    : config_((config.validate(), config)), weights_(clipTextTensors(config_), get, "CLIP") {}

at::Tensor ClipTextModel::hidden(const at::Tensor& ids) const {
  const int64_t B = ids.size(0), L = ids.size(1), h = config_.hiddenSize, H = config_.numHeads, D = h / H;
  PARDIT_CHECK(L <= config_.maxPositions, "CLIP: ", L, " tokens, more than ", config_.maxPositions, " positions");
  const auto dev = w("embeddings.token_embedding.weight").device();
  const at::Tensor idx = ids.to(dev);
  const at::Tensor positions = at::arange(L, at::TensorOptions().dtype(at::kLong).device(dev)).unsqueeze(0);
  at::Tensor x = at::embedding(w("embeddings.token_embedding.weight"), idx) +
                 at::embedding(w("embeddings.position_embedding.weight"), positions);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t l = 0; l < config_.numLayers; ++l) {
    const std::string p = "encoder.layers." + std::to_string(l) + ".";
    at::Tensor r = x;
    at::Tensor y = at::layer_norm(x, {h}, w(p + "layer_norm1.weight"), w(p + "layer_norm1.bias"), config_.eps);
    auto heads = [&](const char* proj) {  // [B, H, L, D]
      return at::linear(y, w(p + "self_attn." + proj + ".weight"), w(p + "self_attn." + proj + ".bias"))
          .view({B, L, H, D})
          .transpose(1, 2);
    };
    at::Tensor a = at::scaled_dot_product_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), {}, 0.0,
                                                    /*is_causal=*/true, scale);
    a = a.transpose(1, 2).reshape({B, L, h});
    x = r + at::linear(a, w(p + "self_attn.out_proj.weight"), w(p + "self_attn.out_proj.bias"));
    r = x;
    y = at::layer_norm(x, {h}, w(p + "layer_norm2.weight"), w(p + "layer_norm2.bias"), config_.eps);
    y = at::linear(y, w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias"));
    y = y * at::sigmoid(1.702 * y);  // quick_gelu
    x = r + at::linear(y, w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"));
  }
  return at::layer_norm(x, {h}, w("final_layer_norm.weight"), w("final_layer_norm.bias"), config_.eps);
}

at::Tensor ClipTextModel::pooled(const at::Tensor& ids) const {
  const at::Tensor x = hidden(ids);
  const at::Tensor i = ids.to(x.device()).to(at::kInt);
  // The legacy rule (eos_token_id 2): the position of the largest id, which is the first <|endoftext|>.
  const at::Tensor at = config_.eosTokenId == 2 ? i.argmax(-1) : (i == config_.eosTokenId).to(at::kInt).argmax(-1);
  return x.index({at::arange(x.size(0), at::TensorOptions().dtype(at::kLong).device(x.device())), at});
}

// ---- T5 ------------------------------------------------------------------------------------------------

at::Tensor t5RelativeBuckets(int64_t length, int64_t buckets, int64_t maxDistance) {
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const at::Tensor context = at::arange(length, i64).unsqueeze(1), memory = at::arange(length, i64).unsqueeze(0);
  at::Tensor rel = memory - context;  // key - query
  const int64_t half = buckets / 2, maxExact = half / 2;
  at::Tensor result = (rel > 0).to(at::kLong) * half;
  rel = rel.abs();
  const at::Tensor isSmall = rel < maxExact;
  at::Tensor large = maxExact + (at::log(rel.to(at::kFloat) / maxExact) /
                                 std::log(static_cast<double>(maxDistance) / maxExact) * (half - maxExact))
                                    .to(at::kLong);
  large = at::minimum(large, at::full_like(large, half - 1));
  return result + at::where(isSmall, rel, large);
}

T5Encoder::T5Encoder(T5Config config, WeightGetter get) : config_(config), get_(std::move(get)) { config_.validate(); }

at::Tensor T5Encoder::positionBias(int64_t length, const at::Tensor& table) const {
  const at::Tensor buckets = t5RelativeBuckets(length, config_.buckets, config_.maxDistance).to(table.device());
  return at::embedding(table, buckets).permute({2, 0, 1}).unsqueeze(0);  // [1, H, L, L]
}

namespace {

// T5LayerNorm: x * rsqrt(mean(x^2) + eps) with the variance in float32, cast to the weight's dtype.
at::Tensor rmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor var = x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true);
  at::Tensor y = x * at::rsqrt(var + eps);
  if (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16) y = y.to(weight.scalar_type());
  return weight * y;
}

// transformers' NewGELUActivation ("gelu_new"): the tanh approximation, written as it computes it.
at::Tensor geluNew(const at::Tensor& x) {
  return 0.5 * x * (1.0 + at::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * at::pow(x, 3.0))));
}

// float16 activations are clamped after each residual, as transformers does.
at::Tensor clampHalf(const at::Tensor& x) {
  if (x.scalar_type() != at::kHalf) return x;
  const double max = 65504.0;
  const double v = at::isinf(x).any().item<bool>() ? max - 1000 : max;
  return at::clamp(x, -v, v);
}

}  // namespace

at::Tensor T5Encoder::linear(const at::Tensor& x, const std::string& weight) const {
  const at::Tensor w = get_(weight);
  if (isFp8(w)) return fp8Linear(x, w, get_(fp8ScaleName(weight)), {});
  // A weight kept in another dtype (wo in float32, as transformers keeps it for float16): the input follows it.
  return at::linear(x.scalar_type() == w.scalar_type() ? x : x.to(w.scalar_type()), w);
}

at::Tensor T5Encoder::forward(const at::Tensor& ids) const {
  const int64_t B = ids.size(0), L = ids.size(1), H = config_.numHeads, D = config_.dKv;
  const at::Tensor shared = get_("shared.weight");
  at::Tensor x = at::embedding(shared, ids.to(shared.device()));
  const at::Tensor bias =
      positionBias(L, get_("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")).to(x.scalar_type());
  for (int64_t i = 0; i < config_.numLayers; ++i) {
    const std::string p = "encoder.block." + std::to_string(i) + ".layer.";
    at::Tensor h = rmsNorm(x, get_(p + "0.layer_norm.weight"), config_.eps);
    auto heads = [&](const char* proj) {
      return linear(h, p + "0.SelfAttention." + proj + ".weight").view({B, L, H, D}).transpose(1, 2);
    };
    // No 1/sqrt(d) scaling; the position bias is the additive mask.
    at::Tensor a = at::scaled_dot_product_attention(heads("q"), heads("k"), heads("v"), bias, 0.0, false, 1.0);
    a = a.transpose(1, 2).reshape({B, L, H * D});
    x = clampHalf(x + linear(a, p + "0.SelfAttention.o.weight"));
    h = rmsNorm(x, get_(p + "1.layer_norm.weight"), config_.eps);
    at::Tensor ff =
        geluNew(linear(h, p + "1.DenseReluDense.wi_0.weight")) * linear(h, p + "1.DenseReluDense.wi_1.weight");
    x = clampHalf(x + linear(ff, p + "1.DenseReluDense.wo.weight"));
  }
  return rmsNorm(x, get_("encoder.final_layer_norm.weight"), config_.eps);
}

}  // namespace pardit::model
