#include "pardit/model/flux.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "pardit/core/error.h"
#include "pardit/model/fp8.h"
#include "pardit/model/fused.h"

namespace pardit::model {

namespace {
constexpr double kNormEps = 1e-6;

Linear makeLinear(const WeightGetter& get, const std::string& prefix) {
  Linear l{get(prefix + ".weight"), get(prefix + ".bias"), {}};
  if (isFp8(l.weight)) l.scale = get(fp8ScaleName(prefix + ".weight"));
  return l;
}

at::Tensor layerNorm(const at::Tensor& x) {  // no affine parameters, eps 1e-6
  return at::layer_norm(x, {x.size(-1)}, {}, {}, kNormEps);
}

// (1 + scale) * LN(x) + shift, with scale/shift [B, h] broadcast over tokens.
at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  return scaleAdd(layerNorm(x), 1 + scale, shift);
}

// x + gate * y, with gate [B, h] broadcast over tokens.
at::Tensor gatedResidual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  return scaleAdd(y, gate, x);
}
}  // namespace

at::Tensor Linear::operator()(const at::Tensor& x) const {
  return scale.defined() ? fp8Linear(x, weight, scale, bias) : at::linear(x, weight, bias);
}

NamedWeights::NamedWeights(const std::vector<TensorSpec>& specs, const WeightGetter& get, std::string model)
    : model_(std::move(model)) {
  for (const auto& t : specs) {
    at::Tensor v = get(t.name);
    PARDIT_CHECK(v.sizes().vec() == t.shape, model_, " tensor '", t.name, "' has shape ", v.sizes(), ", expected ",
                 at::IntArrayRef(t.shape));
    tensors_.emplace(t.name, std::move(v));
  }
}

const at::Tensor& NamedWeights::at(const std::string& name) const {
  auto it = tensors_.find(name);
  PARDIT_CHECK(it != tensors_.end(), model_, " tensor '", name, "' is not loaded");
  return it->second;
}

uint64_t NamedWeights::bytes() const {
  uint64_t n = 0;
  for (const auto& [name, t] : tensors_) n += t.nbytes();
  return n;
}

EmbedderWeights makeEmbedderWeights(const FluxConfig& c, const WeightGetter& get, bool withInputProjections) {
  EmbedderWeights w;
  if (withInputProjections) {
    w.imgIn = makeLinear(get, "img_in");
    w.txtIn = makeLinear(get, "txt_in");
  }
  w.timeIn1 = makeLinear(get, "time_in.in_layer");
  w.timeIn2 = makeLinear(get, "time_in.out_layer");
  if (c.guidanceEmbed) {
    w.guidanceIn1 = makeLinear(get, "guidance_in.in_layer");
    w.guidanceIn2 = makeLinear(get, "guidance_in.out_layer");
  }
  w.vectorIn1 = makeLinear(get, "vector_in.in_layer");
  w.vectorIn2 = makeLinear(get, "vector_in.out_layer");
  return w;
}

DoubleBlockWeights makeDoubleBlockWeights(const FluxConfig& /*c*/, int64_t index, const WeightGetter& get) {
  const std::string p = "double_blocks." + std::to_string(index) + ".";
  DoubleBlockWeights w;
  auto stream = [&](const std::string& s, DoubleBlockWeights::Stream& out) {
    out.mod = makeLinear(get, p + s + "_mod.lin");
    out.qkv = makeLinear(get, p + s + "_attn.qkv");
    out.qNorm = get(p + s + "_attn.norm.query_norm.scale");
    out.kNorm = get(p + s + "_attn.norm.key_norm.scale");
    out.proj = makeLinear(get, p + s + "_attn.proj");
    out.mlp0 = makeLinear(get, p + s + "_mlp.0");
    out.mlp2 = makeLinear(get, p + s + "_mlp.2");
  };
  stream("img", w.img);
  stream("txt", w.txt);
  return w;
}

SingleBlockWeights makeSingleBlockWeights(const FluxConfig& /*c*/, int64_t index, const WeightGetter& get) {
  const std::string p = "single_blocks." + std::to_string(index) + ".";
  SingleBlockWeights w;
  w.mod = makeLinear(get, p + "modulation.lin");
  w.linear1 = makeLinear(get, p + "linear1");
  w.linear2 = makeLinear(get, p + "linear2");
  w.qNorm = get(p + "norm.query_norm.scale");
  w.kNorm = get(p + "norm.key_norm.scale");
  return w;
}

FinalLayerWeights makeFinalLayerWeights(const FluxConfig& /*c*/, const WeightGetter& get) {
  return FinalLayerWeights{makeLinear(get, "final_layer.adaLN_modulation.1"), makeLinear(get, "final_layer.linear")};
}

namespace {
std::vector<std::string> allGroups(const FluxConfig& config) {
  std::vector<std::string> names;
  for (const auto& g : fluxWeightGroups(config)) names.push_back(g.name);
  return names;
}
}  // namespace

ResidentFluxWeights::ResidentFluxWeights(const FluxConfig& config, const WeightGetter& get)
    : ResidentFluxWeights(config, get, allGroups(config)) {}

ResidentFluxWeights::ResidentFluxWeights(const FluxConfig& config, const WeightGetter& get,
                                         const std::vector<std::string>& groups) {
  auto held = [&](const std::string& g) { return std::find(groups.begin(), groups.end(), g) != groups.end(); };
  emb_ = std::make_shared<EmbedderWeights>(makeEmbedderWeights(config, get, held("input_embedders")));
  double_.resize(config.depth);
  single_.resize(config.depthSingle);
  for (int64_t i = 0; i < config.depth; ++i)
    if (held("double_blocks." + std::to_string(i)))
      double_[i] = std::make_shared<DoubleBlockWeights>(makeDoubleBlockWeights(config, i, get));
  for (int64_t i = 0; i < config.depthSingle; ++i)
    if (held("single_blocks." + std::to_string(i)))
      single_[i] = std::make_shared<SingleBlockWeights>(makeSingleBlockWeights(config, i, get));
  if (held("final_layer")) final_ = std::make_shared<FinalLayerWeights>(makeFinalLayerWeights(config, get));
}

std::shared_ptr<const DoubleBlockWeights> ResidentFluxWeights::doubleBlock(int64_t i) {
  PARDIT_CHECK(i >= 0 && i < static_cast<int64_t>(double_.size()) && double_[i], "weight group double_blocks.", i,
               " is not held by this rank");
  return double_[i];
}

std::shared_ptr<const SingleBlockWeights> ResidentFluxWeights::singleBlock(int64_t i) {
  PARDIT_CHECK(i >= 0 && i < static_cast<int64_t>(single_.size()) && single_[i], "weight group single_blocks.", i,
               " is not held by this rank");
  return single_[i];
}

std::shared_ptr<const FinalLayerWeights> ResidentFluxWeights::finalLayer() {
  PARDIT_CHECK(final_ != nullptr, "weight group final_layer is not held by this rank");
  return final_;
}

// ------------------------------------------------------------------------------------------------

at::Tensor imagePositionIds(int64_t rows, int64_t cols) {
  at::Tensor ids = at::zeros({rows, cols, 3}, at::TensorOptions().dtype(at::kFloat));
  ids.select(2, 1).add_(at::arange(rows, at::TensorOptions().dtype(at::kFloat)).unsqueeze(1));
  ids.select(2, 2).add_(at::arange(cols, at::TensorOptions().dtype(at::kFloat)).unsqueeze(0));
  return ids.reshape({rows * cols, 3});
}

at::Tensor textPositionIds(int64_t textLen) { return at::zeros({textLen, 3}, at::TensorOptions().dtype(at::kFloat)); }

std::pair<at::Tensor, at::Tensor> ropeTables(const at::Tensor& ids, const std::vector<int64_t>& axesDim, double theta) {
  PARDIT_CHECK(ids.dim() == 2 && ids.size(1) == static_cast<int64_t>(axesDim.size()), "position ids must be [L, ",
               axesDim.size(), "], got ", ids.sizes());
  // Computed where the ids are, as the reference does, and without a host synchronization (repeat_interleave
  // on a GPU reads its output size back), so a CUDA graph can capture it.
  const at::Tensor pos = ids.to(at::kFloat);  // positions are float32 (as in the reference), frequencies float64
  const int64_t L = ids.size(0);
  std::vector<at::Tensor> cosParts, sinParts;
  for (size_t a = 0; a < axesDim.size(); ++a) {
    const int64_t d = axesDim[a];
    at::Tensor exponent =
        at::arange(0, d, 2, at::TensorOptions().dtype(at::kDouble).device(ids.device())) / static_cast<double>(d);
    at::Tensor freqs = 1.0 / at::pow(theta, exponent);                          // [d/2]
    at::Tensor phi = at::outer(pos.select(1, static_cast<int64_t>(a)), freqs);  // [L, d/2] float64
    // Each frequency twice in a row: [c0, c0, c1, c1, ...].
    auto twice = [&](const at::Tensor& t) {
      return t.unsqueeze(2).expand({L, d / 2, 2}).reshape({L, d}).to(at::kFloat);
    };
    cosParts.push_back(twice(phi.cos()));
    sinParts.push_back(twice(phi.sin()));
  }
  return {at::cat(cosParts, 1), at::cat(sinParts, 1)};  // [L, D]
}

at::Tensor timestepEmbedding(const at::Tensor& t, int64_t dim) {
  const int64_t half = dim / 2;
  at::Tensor exponent =
      at::arange(0, half, at::TensorOptions().dtype(at::kFloat).device(t.device())) * (-std::log(10000.0));
  exponent = exponent / static_cast<double>(half);
  at::Tensor freqs = at::exp(exponent);
  at::Tensor args = t.unsqueeze(1).to(at::kFloat) * freqs.unsqueeze(0);  // [B, half]
  return at::cat({at::cos(args), at::sin(args)}, -1);                    // [B, dim], cos first
}

// ------------------------------------------------------------------------------------------------

FluxTransformer::FluxTransformer(FluxConfig config, std::shared_ptr<FluxWeightProvider> weights,
                                 std::shared_ptr<AttentionBackend> attention)
    : config_(std::move(config)), weights_(std::move(weights)), attention_(std::move(attention)) {
  config_.validate();
  PARDIT_CHECK(weights_ != nullptr && attention_ != nullptr, "FluxTransformer needs weights and attention");
  dtype_ = weights_->embedders()->timeIn1.weight.scalar_type();
}

at::Tensor FluxTransformer::embedImage(const at::Tensor& img) const {
  auto emb = weights_->embedders();
  PARDIT_CHECK(emb->imgIn.weight.defined(), "weight group input_embedders is not held by this rank");
  return emb->imgIn(img.to(dtype_));
}

at::Tensor FluxTransformer::embedText(const at::Tensor& txt) const {
  return weights_->embedders()->txtIn(txt.to(dtype_));
}

FluxConditioning FluxTransformer::conditioning(const FluxInputs& in) const {
  auto emb = weights_->embedders();
  PARDIT_CHECK(in.pooled.defined() && in.pooled.dim() == 2, "pooled projections must be [B, ", config_.vecInDim, "]");
  const auto B = in.pooled.size(0);
  PARDIT_CHECK(in.timestep.defined() && in.timestep.numel() == B, "timestep must have one value per batch entry");
  PARDIT_CHECK(
      in.pooled.defined() && in.pooled.dim() == 2 && in.pooled.size(0) == B && in.pooled.size(1) == config_.vecInDim,
      "pooled projections must be [", B, ", ", config_.vecInDim, "], got ", in.pooled.sizes());
  FluxConditioning c;
  // Timestep and guidance are scaled in the hidden dtype, embedded in float32, then cast back.
  at::Tensor t = in.timestep.reshape({B}).to(dtype_) * 1000;
  at::Tensor temb = emb->timeIn2(at::silu(emb->timeIn1(timestepEmbedding(t).to(dtype_))));
  if (config_.guidanceEmbed) {
    PARDIT_CHECK(in.guidance.defined() && in.guidance.numel() >= 1,
                 "this model has guidance embeddings: a guidance value is required");
    at::Tensor g = in.guidance.reshape({-1}).expand({B}).to(dtype_) * 1000;
    temb = temb + emb->guidanceIn2(at::silu(emb->guidanceIn1(timestepEmbedding(g).to(dtype_))));
  }
  at::Tensor pooled = emb->vectorIn2(at::silu(emb->vectorIn1(in.pooled.to(dtype_))));
  c.vec = temb + pooled;
  c.siluVec = at::silu(c.vec);
  at::Tensor ids = at::cat({in.txtIds.to(at::kFloat), in.imgIds.to(at::kFloat)}, 0);  // text first
  auto [cos, sin] = ropeTables(ids.to(in.pooled.device()), config_.axesDim, config_.theta);
  c.cos = cos.unsqueeze(0).unsqueeze(2);  // [1, L, 1, D]
  c.sin = sin.unsqueeze(0).unsqueeze(2);
  return c;
}

at::Tensor FluxTransformer::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t textLen,
                                   int layer) const {
  at::Tensor out = attention_->attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      AttentionCall{textLen, layer});  // [B, H, L, D]
  return out.transpose(1, 2).to(q.scalar_type());
}

void FluxTransformer::doubleBlock(int64_t i, at::Tensor& img, at::Tensor& txt, const FluxConditioning& cond) const {
  auto w = weights_->doubleBlock(i);
  const int64_t H = config_.numHeads, D = config_.headDim();
  const int64_t B = img.size(0), Li = img.size(1);
  auto imod = w->img.mod(cond.siluVec).chunk(6, 1);
  at::Tensor iqkv = w->img.qkv(modulate(img, imod[0], imod[1])).view({B, Li, 3, H, D});
  at::Tensor iv = iqkv.select(2, 2);
  auto mlpResidual = [&](const at::Tensor& x, const DoubleBlockWeights::Stream& s, const std::vector<at::Tensor>& mod) {
    return gatedResidual(x, mod[5], s.mlp2(at::gelu(s.mlp0(modulate(x, mod[3], mod[4])), "tanh")));
  };
  if (!txt.defined()) {
    // Image rows only (the attention backend supplies the text K/V, e.g. PipeFusion's later patches).
    at::Tensor iAttn =
        attend(rmsNormRope(iqkv.select(2, 0), w->img.qNorm, kNormEps, cond.cos, cond.sin),
               rmsNormRope(iqkv.select(2, 1), w->img.kNorm, kNormEps, cond.cos, cond.sin), iv, 0, static_cast<int>(i));
    img = gatedResidual(img, imod[2], w->img.proj(iAttn.flatten(2).contiguous()));
    img = mlpResidual(img, w->img, imod);
    if (img.scalar_type() == at::kHalf) img = img.clamp(-65504, 65504);
    return;
  }
  const int64_t Lt = txt.size(1), L = Lt + Li;
  PARDIT_CHECK(cond.cos.dim() == 4 && cond.cos.size(1) == L, "RoPE tables cover ", cond.cos.size(1),
               " tokens, the joint sequence has ", L);
  auto tmod = w->txt.mod(cond.siluVec).chunk(6, 1);
  at::Tensor tqkv = w->txt.qkv(modulate(txt, tmod[0], tmod[1])).view({B, Lt, 3, H, D});
  // RMS norm and RoPE written straight into the joint [text ; image] q and k.
  auto joint = [&](int64_t which, const at::Tensor& textNorm, const at::Tensor& imageNorm) {
    at::Tensor out = at::empty({B, L, H, D}, iqkv.options());
    rmsNormRopeInto(out.narrow(1, 0, Lt), tqkv.select(2, which), textNorm, kNormEps, cond.cos.narrow(1, 0, Lt),
                    cond.sin.narrow(1, 0, Lt));
    rmsNormRopeInto(out.narrow(1, Lt, Li), iqkv.select(2, which), imageNorm, kNormEps, cond.cos.narrow(1, Lt, Li),
                    cond.sin.narrow(1, Lt, Li));
    return out;
  };
  at::Tensor q = joint(0, w->txt.qNorm, w->img.qNorm);
  at::Tensor k = joint(1, w->txt.kNorm, w->img.kNorm);
  at::Tensor v = at::cat({tqkv.select(2, 2), iv}, 1);  // [B, L, H, D], text first
  at::Tensor attn = attend(q, k, v, Lt, static_cast<int>(i));
  at::Tensor tAttn = attn.narrow(1, 0, Lt).flatten(2).contiguous(),
             iAttn = attn.narrow(1, Lt, Li).flatten(2).contiguous();

  img = gatedResidual(img, imod[2], w->img.proj(iAttn));
  img = mlpResidual(img, w->img, imod);
  txt = gatedResidual(txt, tmod[2], w->txt.proj(tAttn));
  txt = mlpResidual(txt, w->txt, tmod);
  if (img.scalar_type() == at::kHalf) {
    img = img.clamp(-65504, 65504);
    txt = txt.clamp(-65504, 65504);
  }
}

at::Tensor FluxTransformer::singleBlock(int64_t i, const at::Tensor& x, int64_t textLen,
                                        const FluxConditioning& cond) const {
  auto w = weights_->singleBlock(i);
  const int64_t H = config_.numHeads, D = config_.headDim(), h = config_.hiddenSize, mlp = config_.mlpHidden;
  const int64_t B = x.size(0), L = x.size(1);
  auto mod = w->mod(cond.siluVec).chunk(3, 1);
  at::Tensor hidden = w->linear1(modulate(x, mod[0], mod[1]));  // [B, L, 3h + mlp]
  at::Tensor qkv = hidden.narrow(2, 0, 3 * h).view({B, L, 3, H, D});
  at::Tensor q = rmsNormRope(qkv.select(2, 0), w->qNorm, kNormEps, cond.cos, cond.sin);
  at::Tensor k = rmsNormRope(qkv.select(2, 1), w->kNorm, kNormEps, cond.cos, cond.sin);
  at::Tensor attn = attend(q, k, qkv.select(2, 2), textLen, static_cast<int>(config_.depth + i));
  // linear2's input [attention ; GELU(mlp)] is written in place, not concatenated.
  at::Tensor joined = at::empty({B, L, h + mlp}, hidden.options());
  joined.narrow(2, 0, h).view({B, L, H, D}).copy_(attn);
  at::Tensor mlpPart = joined.narrow(2, h, mlp);
  at::gelu_out(mlpPart, hidden.narrow(2, 3 * h, mlp), "tanh");
  at::Tensor out = gatedResidual(x, mod[2], w->linear2(joined));
  if (out.scalar_type() == at::kHalf) out = out.clamp(-65504, 65504);
  return out;
}

at::Tensor FluxTransformer::finalLayer(const at::Tensor& img, const FluxConditioning& cond) const {
  auto w = weights_->finalLayer();
  auto mod = w->adaLN(cond.siluVec).chunk(2, 1);  // shift, scale
  return w->linear(modulate(img, mod[0], mod[1]));
}

at::Tensor FluxTransformer::forward(const FluxInputs& in) const {
  PARDIT_CHECK(in.img.dim() == 3 && in.img.size(2) == config_.inChannels, "hidden_states must be [B, L, ",
               config_.inChannels, "], got ", in.img.sizes());
  PARDIT_CHECK(in.txt.dim() == 3 && in.txt.size(0) == in.img.size(0) && in.txt.size(2) == config_.contextInDim,
               "encoder_hidden_states must be [", in.img.size(0), ", T, ", config_.contextInDim, "], got ",
               in.txt.sizes());
  PARDIT_CHECK(in.imgIds.dim() == 2 && in.imgIds.size(0) == in.img.size(1) && in.imgIds.size(1) == 3,
               "img_ids must be [", in.img.size(1), ", 3], got ", in.imgIds.sizes());
  PARDIT_CHECK(in.txtIds.dim() == 2 && in.txtIds.size(0) == in.txt.size(1) && in.txtIds.size(1) == 3,
               "txt_ids must be [", in.txt.size(1), ", 3], got ", in.txtIds.sizes());
  const FluxConditioning cond = conditioning(in);
  at::Tensor img = embedImage(in.img);
  at::Tensor txt = embedText(in.txt);
  const int64_t Lt = txt.size(1);
  for (int64_t i = 0; i < config_.depth; ++i) doubleBlock(i, img, txt, cond);
  at::Tensor x = at::cat({txt, img}, 1);
  for (int64_t i = 0; i < config_.depthSingle; ++i) x = singleBlock(i, x, Lt, cond);
  return finalLayer(x.narrow(1, Lt, x.size(1) - Lt), cond);
}

}  // namespace pardit::model
