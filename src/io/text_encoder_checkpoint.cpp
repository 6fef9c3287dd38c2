#include "pardit/io/text_encoder_checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pardit/core/error.h"

#include "json_file.h"

namespace fs = std::filesystem;

namespace pardit::io {

namespace {

using detail::jsonField;
using detail::readJsonFile;

// A model directory inside a pipeline directory, when `path` is one.
fs::path modelDir(const fs::path& path, const char* sub) {
  if (fs::is_directory(path) && fs::exists(path / sub / "config.json")) return path / sub;
  return path;
}

}  // namespace

TensorStore TensorStore::open(const std::string& path, const std::vector<std::string>& prefixes) {
  TensorStore s;
  s.path_ = path;
  const fs::path p(path);
  PARDIT_CHECK(fs::exists(p), path, ": no such file or directory");
  std::vector<fs::path> files;
  if (fs::is_directory(p)) {
    if (fs::exists(p / "model.safetensors.index.json")) {
      const auto index = readJsonFile(p / "model.safetensors.index.json");
      PARDIT_CHECK(index.contains("weight_map") && index["weight_map"].is_object(),
                   (p / "model.safetensors.index.json").string(), ": no weight_map");
      std::map<std::string, bool> seen;
      for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
        const std::string f = it.value().get<std::string>();
        PARDIT_CHECK(f.find('/') == std::string::npos, (p / "model.safetensors.index.json").string(), ": shard '", f,
                     "' is not a file name");
        if (!seen[f]) files.push_back(p / f);
        seen[f] = true;
      }
    } else {
      PARDIT_CHECK(fs::exists(p / "model.safetensors"), path, ": no model.safetensors or model.safetensors.index.json");
      files.push_back(p / "model.safetensors");
    }
  } else {
    files.push_back(p);
  }
  for (const auto& f : files) {
    s.files_.push_back(SafetensorsFile::open(f.string()));
    for (const auto& t : s.files_.back()->tensors()) {
      std::string name = t.name;
      for (const auto& prefix : prefixes)
        if (name.rfind(prefix, 0) == 0) {
          name = name.substr(prefix.size());
          break;
        }
      s.where_[name] = {s.files_.size() - 1, t.name};
    }
  }
  return s;
}

void TensorStore::alias(const std::string& name, const std::string& target) {
  if (!has(name) && has(target)) where_[name] = where_.at(target);
}

const TensorInfo& TensorStore::info(const std::string& name) const {
  auto it = where_.find(name);
  PARDIT_CHECK(it != where_.end(), path_, ": tensor '", name, "' not found");
  return files_[it->second.first]->info(it->second.second);
}

at::Tensor TensorStore::load(const std::string& name, c10::ScalarType dtype, c10::Device device) const {
  auto it = where_.find(name);
  PARDIT_CHECK(it != where_.end(), path_, ": tensor '", name, "' not found");
  at::Tensor t = files_[it->second.first]->read(it->second.second).to(dtype);
  return device.is_cpu() ? t : t.to(device);
}

model::WeightGetter TensorStore::getter(c10::ScalarType dtype, c10::Device device) const {
  return [this, dtype, device](const std::string& name) { return load(name, dtype, device); };
}

const std::map<std::string, std::string>& TensorStore::metadata() const { return files_.front()->metadata(); }

uint64_t TensorStore::bytesRead() const {
  uint64_t n = 0;
  for (const auto& f : files_) n += f->bytesRead();
  return n;
}

uint64_t TensorStore::bytesOf(const std::vector<model::TensorSpec>& tensors) const {
  uint64_t n = 0;
  for (const auto& t : tensors) n += info(t.name).nbytes();
  return n;
}

namespace {
// Checks every expected tensor's presence and shape, naming the file.
void checkTensors(const TensorStore& s, const std::vector<model::TensorSpec>& specs, const std::string& what) {
  for (const auto& t : specs) {
    PARDIT_CHECK(s.has(t.name), s.path(), ": ", what, " tensor '", t.name, "' not found");
    PARDIT_CHECK(s.info(t.name).shape == t.shape, s.path(), ": ", what, " tensor '", t.name, "' has the wrong shape");
  }
}
}  // namespace

ClipTextCheckpoint ClipTextCheckpoint::open(const std::string& path) {
  const fs::path dir = modelDir(path, "text_encoder");
  ClipTextCheckpoint ck{model::ClipTextConfig{}, TensorStore::open(dir.string(), {"cond_stage_model.transformer.text_model.", "text_model."})};
  auto& c = ck.config;
  if (fs::is_directory(dir)) {
    const fs::path file = dir / "config.json";
    const auto j = readJsonFile(file);
    c.vocabSize = jsonField<int64_t>(j, "vocab_size", c.vocabSize, file);
    c.hiddenSize = jsonField<int64_t>(j, "hidden_size", c.hiddenSize, file);
    c.intermediateSize = jsonField<int64_t>(j, "intermediate_size", c.intermediateSize, file);
    c.numLayers = jsonField<int64_t>(j, "num_hidden_layers", c.numLayers, file);
    c.numHeads = jsonField<int64_t>(j, "num_attention_heads", c.numHeads, file);
    c.maxPositions = jsonField<int64_t>(j, "max_position_embeddings", c.maxPositions, file);
    c.eps = jsonField<double>(j, "layer_norm_eps", c.eps, file);
    c.eosTokenId = jsonField<int64_t>(j, "eos_token_id", c.eosTokenId, file);
    const std::string act = jsonField<std::string>(j, "hidden_act", "quick_gelu", file);
    PARDIT_CHECK(act == "quick_gelu", file.string(), ": hidden_act '", act, "' (FLUX's CLIP uses quick_gelu)");
  } else {
    const auto& emb = ck.store.info("embeddings.token_embedding.weight").shape;
    c.vocabSize = emb.at(0);
    c.hiddenSize = emb.at(1);
    c.maxPositions = ck.store.info("embeddings.position_embedding.weight").shape.at(0);
    c.intermediateSize = ck.store.info("encoder.layers.0.mlp.fc1.weight").shape.at(0);
    c.numLayers = 0;
    while (ck.store.has("encoder.layers." + std::to_string(c.numLayers) + ".mlp.fc1.weight")) ++c.numLayers;
    c.numHeads = c.hiddenSize / 64;  // CLIP's head dimension, unless the file says otherwise
    const auto& meta = ck.store.metadata();
    if (meta.count("num_attention_heads")) c.numHeads = std::stoll(meta.at("num_attention_heads"));
  }
  try {
    c.validate();
  } catch (const Error& e) {
    PARDIT_THROW(path, ": ", e.message());
  }
  checkTensors(ck.store, model::clipTextTensors(c), "CLIP");
  return ck;
}

T5Checkpoint T5Checkpoint::open(const std::string& path) {
  const fs::path dir = modelDir(path, "text_encoder_2");
  T5Checkpoint ck{model::T5Config{}, TensorStore::open(dir.string())};
  ck.store.alias("shared.weight", "encoder.embed_tokens.weight");
  auto& c = ck.config;
  if (fs::is_directory(dir)) {
    const fs::path file = dir / "config.json";
    const auto j = readJsonFile(file);
    c.vocabSize = jsonField<int64_t>(j, "vocab_size", c.vocabSize, file);
    c.dModel = jsonField<int64_t>(j, "d_model", c.dModel, file);
    c.dKv = jsonField<int64_t>(j, "d_kv", c.dKv, file);
    c.dFf = jsonField<int64_t>(j, "d_ff", c.dFf, file);
    c.numLayers = jsonField<int64_t>(j, "num_layers", c.numLayers, file);
    c.numHeads = jsonField<int64_t>(j, "num_heads", c.numHeads, file);
    c.buckets = jsonField<int64_t>(j, "relative_attention_num_buckets", c.buckets, file);
    c.maxDistance = jsonField<int64_t>(j, "relative_attention_max_distance", c.maxDistance, file);
    c.eps = jsonField<double>(j, "layer_norm_epsilon", c.eps, file);
    const std::string ff = jsonField<std::string>(j, "feed_forward_proj", "gated-gelu", file);
    PARDIT_CHECK(ff == "gated-gelu", file.string(), ": feed_forward_proj '", ff, "' (FLUX's T5 v1.1 uses gated-gelu)");
  } else {
    const auto& emb = ck.store.info("shared.weight").shape;
    c.vocabSize = emb.at(0);
    c.dModel = emb.at(1);
    const auto& rel = ck.store.info("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").shape;
    c.buckets = rel.at(0);
    c.numHeads = rel.at(1);
    c.dKv = ck.store.info("encoder.block.0.layer.0.SelfAttention.q.weight").shape.at(0) / c.numHeads;
    c.dFf = ck.store.info("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").shape.at(0);
    c.numLayers = 0;
    while (ck.store.has("encoder.block." + std::to_string(c.numLayers) + ".layer.0.SelfAttention.q.weight")) ++c.numLayers;
  }
  try {
    c.validate();
  } catch (const Error& e) {
    PARDIT_THROW(path, ": ", e.message());
  }
  checkTensors(ck.store, model::t5EncoderTensors(c), "T5");
  return ck;
}

std::string clipTextConfigJson(const model::ClipTextConfig& c) {
  const nlohmann::ordered_json j = {
      {"architectures", {"CLIPTextModel"}}, {"model_type", "clip_text_model"}, {"hidden_act", "quick_gelu"},
      {"hidden_size", c.hiddenSize}, {"intermediate_size", c.intermediateSize}, {"num_hidden_layers", c.numLayers},
      {"num_attention_heads", c.numHeads}, {"max_position_embeddings", c.maxPositions}, {"vocab_size", c.vocabSize},
      {"layer_norm_eps", c.eps}, {"projection_dim", c.hiddenSize}, {"bos_token_id", 0}, {"eos_token_id", c.eosTokenId},
      {"pad_token_id", 1}, {"attention_dropout", 0.0}, {"dropout", 0.0}, {"initializer_factor", 1.0},
      {"initializer_range", 0.02}, {"torch_dtype", "float32"}};
  return j.dump(2) + "\n";
}

std::string t5ConfigJson(const model::T5Config& c) {
  const nlohmann::ordered_json j = {
      {"architectures", {"T5EncoderModel"}}, {"model_type", "t5"}, {"d_model", c.dModel}, {"d_kv", c.dKv},
      {"d_ff", c.dFf}, {"num_layers", c.numLayers}, {"num_decoder_layers", c.numLayers}, {"num_heads", c.numHeads},
      {"relative_attention_num_buckets", c.buckets}, {"relative_attention_max_distance", c.maxDistance},
      {"layer_norm_epsilon", c.eps}, {"feed_forward_proj", "gated-gelu"}, {"dense_act_fn", "gelu_new"},
      {"is_gated_act", true}, {"vocab_size", c.vocabSize}, {"pad_token_id", 0}, {"eos_token_id", 1},
      {"decoder_start_token_id", 0}, {"dropout_rate", 0.1}, {"tie_word_embeddings", false}, {"is_encoder_decoder", true},
      {"torch_dtype", "float32"}};
  return j.dump(2) + "\n";
}

}  // namespace pardit::io
