#include "pardit/pipeline/inputs.h"

#include <ATen/ATen.h>

#include <sstream>

#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"

namespace pardit::pipeline {

namespace {

// Reads a tensor that must exist, naming the file, the tensor and why it is needed.
at::Tensor requireTensor(const io::SafetensorsFile& f, const std::string& name, const std::string& why) {
  PARDIT_CHECK(f.contains(name), f.path(), ": tensor '", name, "' not found (", why, ")");
  return f.read(name);
}

// -1 in `expect` matches any size.
void checkShape(const std::string& where, const std::string& name, const at::Tensor& t,
                const std::vector<int64_t>& expect) {
  bool ok = t.dim() == static_cast<int64_t>(expect.size());
  for (size_t i = 0; ok && i < expect.size(); ++i) ok = expect[i] < 0 || t.size(static_cast<int64_t>(i)) == expect[i];
  if (ok) return;
  std::ostringstream e;
  e << "[";
  for (size_t i = 0; i < expect.size(); ++i)
    e << (i ? ", " : "") << (expect[i] < 0 ? std::string("*") : std::to_string(expect[i]));
  e << "]";
  PARDIT_THROW(where, ": tensor '", name, "' has shape ", t.sizes(), ", expected ", e.str());
}

// A [B] (or single-value) tensor expanded to the batch.
at::Tensor perSample(const io::SafetensorsFile& f, const std::string& name, const at::Tensor& t, int64_t B) {
  PARDIT_CHECK(t.numel() == B || t.numel() == 1, f.path(), ": tensor '", name, "' has ", t.numel(),
               " values, expected ", B);
  return t.reshape({-1}).expand({B});
}

// A floating-point tensor with at least one element along each of `nonEmptyDims`.
void checkFloat(const std::string& where, const std::string& name, const at::Tensor& t,
                const std::vector<int64_t>& nonEmptyDims) {
  PARDIT_CHECK(at::isFloatingType(t.scalar_type()), where, ": tensor '", name, "' is ", t.scalar_type(),
               ", expected a floating-point dtype");
  for (int64_t d : nonEmptyDims)
    PARDIT_CHECK(t.size(d) > 0, where, ": tensor '", name, "' has shape ", t.sizes(), ": dimension ", d, " is empty");
  checkFinite(t, where, name);
}

}  // namespace

void checkFinite(const at::Tensor& t, const std::string& where, const std::string& name) {
  if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) return;
  const at::Tensor bad = at::isfinite(t).logical_not();
  if (!bad.any().item<bool>()) return;
  const at::Tensor first = bad.nonzero()[0].cpu();
  std::ostringstream index;
  index << "[";
  for (int64_t d = 0; d < first.numel(); ++d) index << (d ? ", " : "") << first[d].item<int64_t>();
  index << "]";
  at::Tensor value = t;
  for (int64_t d = 0; d < first.numel(); ++d) value = value[first[d].item<int64_t>()];
  const int64_t count = bad.sum().item<int64_t>();
  PARDIT_THROW(where, ": tensor '", name, "' has a non-finite value (", value.item<double>(), ") at index ",
               index.str(), count > 1 ? " and " + std::to_string(count - 1) + " more" : std::string());
}

model::FluxInputs readForwardInputs(const std::string& path, const model::FluxConfig& mc) {
  auto in = io::SafetensorsFile::open(path);
  model::FluxInputs x;
  x.img = requireTensor(*in, "hidden_states", "packed latents [B, L, C]");
  x.txt = requireTensor(*in, "encoder_hidden_states", "text embeddings [B, T, D]");
  x.pooled = requireTensor(*in, "pooled_projections", "pooled text embedding [B, P]");
  x.timestep = requireTensor(*in, "timestep", "[B] sigma in [0, 1]");
  x.imgIds = requireTensor(*in, "img_ids", "[L, 3] image position ids");
  x.txtIds = requireTensor(*in, "txt_ids", "[T, 3] text position ids");
  if (mc.guidanceEmbed) x.guidance = requireTensor(*in, "guidance", "the model has guidance embeddings");
  if (x.imgIds.dim() == 3) x.imgIds = x.imgIds[0];  // the deprecated batched form
  if (x.txtIds.dim() == 3) x.txtIds = x.txtIds[0];
  checkShape(path, "hidden_states", x.img, {-1, -1, mc.inChannels});
  const int64_t B = x.img.size(0), L = x.img.size(1);
  checkShape(path, "encoder_hidden_states", x.txt, {B, -1, mc.contextInDim});
  checkShape(path, "pooled_projections", x.pooled, {B, mc.vecInDim});
  checkShape(path, "img_ids", x.imgIds, {L, 3});
  checkShape(path, "txt_ids", x.txtIds, {x.txt.size(1), 3});
  checkFloat(path, "hidden_states", x.img, {0, 1});
  checkFloat(path, "encoder_hidden_states", x.txt, {1});
  checkFloat(path, "pooled_projections", x.pooled, {});
  checkFloat(path, "timestep", x.timestep, {});
  if (x.guidance.defined()) checkFloat(path, "guidance", x.guidance, {});
  checkFinite(x.imgIds, path, "img_ids");
  checkFinite(x.txtIds, path, "txt_ids");
  x.timestep = perSample(*in, "timestep", x.timestep, B);
  if (x.guidance.defined()) x.guidance = perSample(*in, "guidance", x.guidance, B);
  return x;
}

void checkPromptEmbeddings(const PromptEmbeddings& e, const model::FluxConfig& mc, const std::string& what) {
  PARDIT_CHECK(e.promptEmbeds.defined() && e.pooled.defined(), what, ": prompt embeddings are missing");
  checkShape(what, "prompt_embeds", e.promptEmbeds, {-1, -1, mc.contextInDim});
  checkShape(what, "pooled_prompt_embeds", e.pooled, {e.promptEmbeds.size(0), mc.vecInDim});
  checkFloat(what, "prompt_embeds", e.promptEmbeds, {0, 1});
  checkFloat(what, "pooled_prompt_embeds", e.pooled, {});
}

PromptEmbeddings readPromptEmbeddings(const std::string& path, const model::FluxConfig& mc, const std::string& flag) {
  auto f = io::SafetensorsFile::open(path);
  std::string pe = "prompt_embeds", pp = "pooled_prompt_embeds";
  if (!f->contains(pe) && f->contains("negative_prompt_embeds")) {
    pe = "negative_prompt_embeds";
    pp = "negative_pooled_prompt_embeds";
  }
  const std::string why = "expected by " + flag;
  PromptEmbeddings e{requireTensor(*f, pe, why), requireTensor(*f, pp, why)};
  checkShape(path, pe, e.promptEmbeds, {-1, -1, mc.contextInDim});
  checkShape(path, pp, e.pooled, {e.promptEmbeds.size(0), mc.vecInDim});
  checkFloat(path, pe, e.promptEmbeds, {0, 1});
  checkFloat(path, pp, e.pooled, {});
  return e;
}

}  // namespace pardit::pipeline
