#include "pardit/io/text_encoder_checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <variant>

#include "pardit/core/error.h"

#include "fp8_file.h"
#include "json_file.h"

namespace fs = std::filesystem;

namespace pardit::io {

namespace {

using detail::jsonField;
using detail::readJsonFile;

// A configuration's numeric fields from config.json: each key into its member (absent or null: kept).
template <typename C>
struct JsonField {
  const char* key;
  std::variant<int64_t C::*, double C::*> member;
};

// A configuration from dir/config.json: the numeric fields, and a string `key` that must be `required`
// (its default).
template <typename C>
C readConfigJson(const fs::path& dir, const std::vector<JsonField<C>>& fields, const char* key,
                 const std::string& required, const char* model) {
  C c;
  const fs::path file = dir / "config.json";
  const auto j = readJsonFile(file);
  for (const auto& f : fields)
    std::visit([&](auto member) { c.*member = jsonField(j, f.key, c.*member, file); }, f.member);
  const std::string value = jsonField<std::string>(j, key, required, file);
  PARDIT_CHECK(value == required, file.string(), ": ", key, " '", value, "' (FLUX's ", model, " uses ", required, ")");
  return c;
}

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

at::Tensor TensorStore::scaleOf(const std::string& name) const {
  const TensorInfo& w = info(name);
  if (!detail::isFloat8(w.dtype) || !detail::endsWith(name, ".weight") || w.shape.size() != 2) return {};
  auto [file, scale] = detail::findScale(name, w, [&](const std::string& cand) {
    auto it = where_.find(cand);
    return it == where_.end()
               ? std::make_pair(std::shared_ptr<SafetensorsFile>(), static_cast<const TensorInfo*>(nullptr))
               : std::make_pair(files_[it->second.first], &files_[it->second.first]->info(it->second.second));
  });
  if (!file) return {};
  return detail::readScaleRows(*file, where_.at(scale).second, 0, w.rows());
}

at::Tensor TensorStore::load(const std::string& name, c10::ScalarType dtype, c10::Device device) const {
  auto it = where_.find(name);
  PARDIT_CHECK(it != where_.end(), path_, ": tensor '", name, "' not found");
  at::Tensor t = files_[it->second.first]->read(it->second.second);
  if (const at::Tensor scale = scaleOf(name); scale.defined())
    t = t.to(at::kFloat) * scale.unsqueeze(1);  // scaled float8
  t = t.to(dtype);
  return device.is_cpu() ? t : t.to(device);
}

bool TensorStore::storedFp8(const std::string& name) const { return has(name) && info(name).dtype == "F8_E4M3"; }

model::Fp8Rows TensorStore::loadFp8(const std::string& name, c10::Device quantizeOn) const {
  auto it = where_.find(name);
  PARDIT_CHECK(it != where_.end(), path_, ": tensor '", name, "' not found");
  at::Tensor t = files_[it->second.first]->read(it->second.second);
  PARDIT_CHECK(t.dim() == 2, path_, ": tensor '", name, "' is not a 2-D weight and has no FP8 form");
  const at::Tensor scale = scaleOf(name);
  if (t.scalar_type() == at::kFloat8_e4m3fn) return {t, scale.defined() ? scale : at::ones({t.size(0)}, at::kFloat)};
  if (!quantizeOn.is_cpu()) t = t.to(quantizeOn);
  if (scale.defined()) t = t.to(at::kFloat) * scale.to(t.device()).unsqueeze(1);
  return model::quantizeFp8Rows(t);
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
// How many of prefix + i + suffix the store holds, counting from i = 0 (layers of a single file).
int64_t countIndexed(const TensorStore& s, const std::string& prefix, const std::string& suffix) {
  int64_t n = 0;
  while (s.has(prefix + std::to_string(n) + suffix)) ++n;
  return n;
}

// Validates a configuration read from `path`, then checks every tensor it implies for presence and shape.
template <typename C>
void checkConfig(const C& c, const std::string& path, const TensorStore& s, const std::vector<model::TensorSpec>& specs,
                 const std::string& what) {
  try {
    c.validate();
  } catch (const Error& e) {
    PARDIT_THROW(path, ": ", e.message());
  }
  for (const auto& t : specs) {
    PARDIT_CHECK(s.has(t.name), s.path(), ": ", what, " tensor '", t.name, "' not found");
    PARDIT_CHECK(s.info(t.name).shape == t.shape, s.path(), ": ", what, " tensor '", t.name, "' has the wrong shape");
  }
}
// The numeric fields of CLIPTextConfig's and T5Config's config.json.
const std::vector<JsonField<model::ClipTextConfig>> kClipFields = {
    {"vocab_size", &model::ClipTextConfig::vocabSize},
    {"hidden_size", &model::ClipTextConfig::hiddenSize},
    {"intermediate_size", &model::ClipTextConfig::intermediateSize},
    {"num_hidden_layers", &model::ClipTextConfig::numLayers},
    {"num_attention_heads", &model::ClipTextConfig::numHeads},
    {"max_position_embeddings", &model::ClipTextConfig::maxPositions},
    {"layer_norm_eps", &model::ClipTextConfig::eps},
    {"eos_token_id", &model::ClipTextConfig::eosTokenId}};
const std::vector<JsonField<model::T5Config>> kT5Fields = {
    {"vocab_size", &model::T5Config::vocabSize},
    {"d_model", &model::T5Config::dModel},
    {"d_kv", &model::T5Config::dKv},
    {"d_ff", &model::T5Config::dFf},
    {"num_layers", &model::T5Config::numLayers},
    {"num_heads", &model::T5Config::numHeads},
    {"relative_attention_num_buckets", &model::T5Config::buckets},
    {"relative_attention_max_distance", &model::T5Config::maxDistance},
    {"layer_norm_epsilon", &model::T5Config::eps}};

// A single file's configuration, from its tensors' shapes.
model::ClipTextConfig clipConfigFromShapes(const TensorStore& s) {
  model::ClipTextConfig c;
  const auto& emb = s.info("embeddings.token_embedding.weight").shape;
  c.vocabSize = emb.at(0);
  c.hiddenSize = emb.at(1);
  c.maxPositions = s.info("embeddings.position_embedding.weight").shape.at(0);
  c.intermediateSize = s.info("encoder.layers.0.mlp.fc1.weight").shape.at(0);
  c.numLayers = countIndexed(s, "encoder.layers.", ".mlp.fc1.weight");
  c.numHeads = c.hiddenSize / 64;  // CLIP's head dimension, unless the file says otherwise
  const auto& meta = s.metadata();
  if (meta.count("num_attention_heads")) c.numHeads = std::stoll(meta.at("num_attention_heads"));
  return c;
}

// A single file's configuration, from its tensors' shapes.
model::T5Config t5ConfigFromShapes(const TensorStore& s) {
  model::T5Config c;
  const auto& emb = s.info("shared.weight").shape;
  c.vocabSize = emb.at(0);
  c.dModel = emb.at(1);
  const auto& rel = s.info("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").shape;
  c.buckets = rel.at(0);
  c.numHeads = rel.at(1);
  c.dKv = s.info("encoder.block.0.layer.0.SelfAttention.q.weight").shape.at(0) / c.numHeads;
  c.dFf = s.info("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").shape.at(0);
  c.numLayers = countIndexed(s, "encoder.block.", ".layer.0.SelfAttention.q.weight");
  return c;
}

}  // namespace

ClipTextCheckpoint ClipTextCheckpoint::open(const std::string& path) {
  const fs::path dir = modelDir(path, "text_encoder");
  ClipTextCheckpoint ck{model::ClipTextConfig{},
                        TensorStore::open(dir.string(), {"cond_stage_model.transformer.text_model.", "text_model."})};
  auto& c = ck.config;
  c = fs::is_directory(dir) ? readConfigJson(dir, kClipFields, "hidden_act", "quick_gelu", "CLIP")
                            : clipConfigFromShapes(ck.store);
  checkConfig(c, path, ck.store, model::clipTextTensors(c), "CLIP");
  return ck;
}

T5Checkpoint T5Checkpoint::open(const std::string& path) {
  const fs::path dir = modelDir(path, "text_encoder_2");
  T5Checkpoint ck{model::T5Config{}, TensorStore::open(dir.string())};
  ck.store.alias("shared.weight", "encoder.embed_tokens.weight");
  auto& c = ck.config;
  c = fs::is_directory(dir) ? readConfigJson(dir, kT5Fields, "feed_forward_proj", "gated-gelu", "T5 v1.1")
                            : t5ConfigFromShapes(ck.store);
  checkConfig(c, path, ck.store, model::t5EncoderTensors(c), "T5");
  return ck;
}

model::WeightFormat T5Checkpoint::storedFormat() const {
  return store.storedFp8("encoder.block.0.layer.1.DenseReluDense.wi_0.weight") ? model::WeightFormat::kFp8
                                                                               : model::WeightFormat::kDense;
}

std::string clipTextConfigJson(const model::ClipTextConfig& c) {
  const nlohmann::ordered_json j = {{"architectures", {"CLIPTextModel"}},
                                    {"model_type", "clip_text_model"},
                                    {"hidden_act", "quick_gelu"},
                                    {"hidden_size", c.hiddenSize},
                                    {"intermediate_size", c.intermediateSize},
                                    {"num_hidden_layers", c.numLayers},
                                    {"num_attention_heads", c.numHeads},
                                    {"max_position_embeddings", c.maxPositions},
                                    {"vocab_size", c.vocabSize},
                                    {"layer_norm_eps", c.eps},
                                    {"projection_dim", c.hiddenSize},
                                    {"bos_token_id", 0},
                                    {"eos_token_id", c.eosTokenId},
                                    {"pad_token_id", 1},
                                    {"attention_dropout", 0.0},
                                    {"dropout", 0.0},
                                    {"initializer_factor", 1.0},
                                    {"initializer_range", 0.02},
                                    {"torch_dtype", "float32"}};
  return j.dump(2) + "\n";
}

std::string t5ConfigJson(const model::T5Config& c) {
  const nlohmann::ordered_json j = {{"architectures", {"T5EncoderModel"}},
                                    {"model_type", "t5"},
                                    {"d_model", c.dModel},
                                    {"d_kv", c.dKv},
                                    {"d_ff", c.dFf},
                                    {"num_layers", c.numLayers},
                                    {"num_decoder_layers", c.numLayers},
                                    {"num_heads", c.numHeads},
                                    {"relative_attention_num_buckets", c.buckets},
                                    {"relative_attention_max_distance", c.maxDistance},
                                    {"layer_norm_epsilon", c.eps},
                                    {"feed_forward_proj", "gated-gelu"},
                                    {"dense_act_fn", "gelu_new"},
                                    {"is_gated_act", true},
                                    {"vocab_size", c.vocabSize},
                                    {"pad_token_id", 0},
                                    {"eos_token_id", 1},
                                    {"decoder_start_token_id", 0},
                                    {"dropout_rate", 0.1},
                                    {"tie_word_embeddings", false},
                                    {"is_encoder_decoder", true},
                                    {"torch_dtype", "float32"}};
  return j.dump(2) + "\n";
}

}  // namespace pardit::io
