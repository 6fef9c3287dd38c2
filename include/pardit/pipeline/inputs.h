#pragma once
// Reading a run's input tensors from safetensors files, checked against the model: a `forward` call's
// transformer inputs and prompt embeddings. Errors name the file, the tensor and what was expected.

#include <string>

#include "pardit/model/flux.h"
#include "pardit/pipeline/denoise.h"

namespace pardit::pipeline {

// hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids (and guidance when
// the model has guidance embeddings), named as diffusers' FluxTransformer2DModel.forward takes them.
// Batched ids ([1, L, 3], deprecated in diffusers) are accepted; timestep and guidance are expanded to
// the batch.
model::FluxInputs readForwardInputs(const std::string& path, const model::FluxConfig& config);

// prompt_embeds [B, T, contextInDim] and pooled_prompt_embeds [B, vecInDim] (or the negative_* names).
// `flag` names the option the file came from.
PromptEmbeddings readPromptEmbeddings(const std::string& path, const model::FluxConfig& config,
                                      const std::string& flag);

// Throws, naming `where`, the tensor, the first offending index and the count, when a floating-point
// tensor holds NaN or Inf.
void checkFinite(const at::Tensor& t, const std::string& where, const std::string& name);

// Checks embeddings given as tensors (from a file or a C++ caller) against the model.
void checkPromptEmbeddings(const PromptEmbeddings& e, const model::FluxConfig& config, const std::string& what);

}  // namespace pardit::pipeline
