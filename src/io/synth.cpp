#include "pardit/io/synth.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "pardit/core/error.h"
#include "pardit/core/files.h"
#include "pardit/core/format.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/io/vae_checkpoint.h"
#include "pardit/text/clip_tokenizer.h"

#include "json_file.h"

namespace fs = std::filesystem;

namespace pardit::io {

namespace {

void writeText(const fs::path& p, const std::string& text) { detail::writeTextFile(p, text, "--out"); }

std::string schedulerConfigJson(bool dynamicShift) {
  nlohmann::ordered_json j;
  j["_class_name"] = "FlowMatchEulerDiscreteScheduler";
  j["base_image_seq_len"] = 256;
  j["base_shift"] = 0.5;
  j["max_image_seq_len"] = 4096;
  j["max_shift"] = 1.15;
  j["num_train_timesteps"] = 1000;
  j["shift"] = dynamicShift ? 3.0 : 1.0;
  j["use_dynamic_shifting"] = dynamicShift;
  return j.dump(2) + "\n";
}
// The VAE decoder: vae/ (diffusers) or ae.safetensors (BFL names; decoder tensors only, with the
// configuration that shapes cannot tell in __metadata__). Values depend on the internal name only, so
// both layouts hold the same VAE.
std::string synthesizeVae(const SynthOptions& o, uint64_t* bytes) {
  const model::VaeConfig c = o.vae();
  const auto levels = static_cast<int64_t>(c.blockOutChannels.size());
  const bool bfl = o.layout == CheckpointLayout::kBfl;
  SafetensorsWriter w;
  w.addMetadata("format", "pt");
  if (bfl) {
    w.addMetadata("norm_num_groups", std::to_string(c.normGroups));
    w.addMetadata("scaling_factor", std::to_string(c.scalingFactor));
    w.addMetadata("shift_factor", std::to_string(c.shiftFactor));
  }
  for (const auto& t : model::vaeDecoderTensors(c)) {
    std::vector<int64_t> shape = t.shape;
    if (bfl && shape.size() == 2) shape.insert(shape.end(), {1, 1});  // BFL attention weights are 1x1 convs
    SafetensorsWriter::Producer p;
    if (!o.zeros)
      p = [seed = o.seed, dtype = o.dtype, t, shape] {
        return synthTensor(seed, t.name, t.shape).reshape(shape).to(dtype);
      };
    w.addLazy(bfl ? bflVaeName(t.name, levels) : t.name, o.dtype, shape, p);
  }
  *bytes = w.totalBytes();
  if (bfl) {
    const fs::path file = fs::path(o.outDir) / "ae.safetensors";
    w.write(file.string());
    return file.string();
  }
  const fs::path dir = fs::path(o.outDir) / "vae";
  fs::create_directories(dir);
  w.write((dir / "diffusion_pytorch_model.safetensors").string());
  writeText(dir / "config.json", vaeConfigJson(c));
  return dir.string();
}

// ---- synthetic tokenizers: trained here on a built-in text, in the published file formats ----

const char* kSynthText =
    "a photo of a cat sitting on a mat in the sun an astronaut riding a horse on the moon highly detailed oil "
    "painting of a castle by the sea at sunset cinematic lighting ultra realistic a cozy cabin in the snowy forest "
    "with warm light in the windows the quick brown fox jumps over the lazy dog portrait of a robot reading a book "
    "in a library soft light watercolor sketch of city streets at night with neon signs and rain reflections "
    "beautiful landscape mountains lake morning fog flowers garden vintage film photograph of a dog on a beach";

std::vector<std::string> synthWords() {
  std::vector<std::string> words;
  std::stringstream ss(kSynthText);
  for (std::string w; ss >> w;) words.push_back(w);
  return words;
}

// A CLIP-format byte-level BPE trained on the built-in text: tokenizer/vocab.json and merges.txt.
void writeClipTokenizer(const fs::path& dir, int merges) {
  fs::create_directories(dir);
  std::map<std::string, int> counts;
  for (const auto& w : synthWords()) ++counts[w];
  std::map<std::string, std::vector<std::string>> seqs;
  for (const auto& [w, c] : counts) {
    auto& s = seqs[w];
    for (char ch : w) s.push_back(std::string(1, ch));  // the built-in text is lower-case ASCII letters
    s.back() += "</w>";
  }
  std::vector<std::pair<std::string, std::string>> learned;
  for (int m = 0; m < merges; ++m) {
    std::map<std::pair<std::string, std::string>, int> pairs;
    for (const auto& [w, s] : seqs)
      for (size_t i = 0; i + 1 < s.size(); ++i) pairs[{s[i], s[i + 1]}] += counts[w];
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;
    const auto [a, b] = best->first;
    learned.push_back({a, b});
    for (auto& [w, s] : seqs) {
      std::vector<std::string> out;
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          out.push_back(a + b);
          ++i;
        } else {
          out.push_back(s[i]);
        }
      }
      s = out;
    }
  }
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  int64_t id = 0;
  auto add = [&](const std::string& t) {
    if (!vocab.contains(t)) vocab[t] = id++;
  };
  const auto symbols = text::clipByteSymbolsInVocabOrder();
  for (const auto& s : symbols) add(s);
  for (const auto& s : symbols) add(s + "</w>");
  std::string mergesText = "#version: 0.2\n";
  for (const auto& [a, b] : learned) {
    add(a + b);
    mergesText += a + " " + b + "\n";
  }
  add("<|startoftext|>");
  add("<|endoftext|>");
  writeText(dir / "vocab.json", vocab.dump() + "\n");
  writeText(dir / "merges.txt", mergesText);
  const nlohmann::ordered_json config = {{"tokenizer_class", "CLIPTokenizer"}, {"model_max_length", 77},
                                         {"bos_token", "<|startoftext|>"},     {"eos_token", "<|endoftext|>"},
                                         {"pad_token", "<|endoftext|>"},       {"unk_token", "<|endoftext|>"}};
  writeText(dir / "tokenizer_config.json", config.dump(2) + "\n");
}

// A T5-format unigram tokenizer over the built-in words and single characters: tokenizer_2/tokenizer.json.
int64_t writeT5Tokenizer(const fs::path& dir) {
  fs::create_directories(dir);
  nlohmann::ordered_json vocab = nlohmann::ordered_json::array();
  std::set<std::string> seen;
  auto add = [&](const std::string& piece, double score) {
    if (seen.insert(piece).second) vocab.push_back({piece, score});
  };
  add("<pad>", 0.0);
  add("</s>", 0.0);
  add("<unk>", 0.0);
  const std::string space = "\xE2\x96\x81";
  add(space, -2.0);
  std::map<std::string, int> counts;
  for (const auto& w : synthWords()) ++counts[w];
  for (const auto& [w, c] : counts) add(space + w, -4.0 - 1.0 / c);
  for (char ch = 33; ch < 127; ++ch) add(std::string(1, ch), -9.0);
  for (int i = 99; i >= 0; --i) add("<extra_id_" + std::to_string(i) + ">", 0.0);
  nlohmann::ordered_json added = nlohmann::ordered_json::array();
  for (size_t i = 0; i < vocab.size(); ++i) {
    const std::string piece = vocab[i][0];
    if (piece == "<pad>" || piece == "</s>" || piece == "<unk>" || piece.rfind("<extra_id_", 0) == 0)
      added.push_back({{"id", i},
                       {"content", piece},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", true}});
  }
  const nlohmann::ordered_json tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "WhitespaceSplit"}},
          {{"type", "Metaspace"}, {"replacement", space}, {"prepend_scheme", "always"}, {"split", true}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}}},
        {"pair",
         {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
          {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "B"}, {"type_id", 0}}}},
          {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"</s>", {{"id", "</s>"}, {"ids", {1}}, {"tokens", {"</s>"}}}}}}}},
      {"decoder", {{"type", "Metaspace"}, {"replacement", space}, {"prepend_scheme", "always"}, {"split", true}}},
      {"model", {{"type", "Unigram"}, {"unk_id", 2}, {"vocab", vocab}, {"byte_fallback", false}}}};
  writeText(dir / "tokenizer.json", tokenizer.dump() + "\n");
  const nlohmann::ordered_json config = {{"tokenizer_class", "T5Tokenizer"},
                                         {"model_max_length", 512},
                                         {"extra_ids", 100},
                                         {"eos_token", "</s>"},
                                         {"pad_token", "<pad>"},
                                         {"unk_token", "<unk>"}};
  writeText(dir / "tokenizer_config.json", config.dump(2) + "\n");
  return static_cast<int64_t>(vocab.size());
}

// One safetensors file of synthetic tensors (values depend on the seed and the name only).
uint64_t writeSynthTensors(const SynthOptions& o, const std::vector<model::TensorSpec>& specs, const fs::path& file,
                           const std::string& prefix, const std::map<std::string, std::string>& metadata = {}) {
  SafetensorsWriter w;
  w.addMetadata("format", "pt");
  for (const auto& [k, v] : metadata) w.addMetadata(k, v);
  for (const auto& t : specs) {
    SafetensorsWriter::Producer p;
    if (!o.zeros) p = [seed = o.seed, dtype = o.dtype, t] { return synthTensor(seed, t.name, t.shape).to(dtype); };
    w.addLazy(prefix + t.name, o.dtype, t.shape, p);
  }
  w.write(file.string());
  return w.totalBytes();
}

// The text encoders and tokenizers.
uint64_t synthesizeText(const SynthOptions& o) {
  const fs::path out(o.outDir);
  const bool bfl = o.layout == CheckpointLayout::kBfl;
  writeClipTokenizer(out / (bfl ? "clip_tokenizer" : "tokenizer"), 300);
  writeT5Tokenizer(out / (bfl ? "t5_tokenizer" : "tokenizer_2"));
  uint64_t bytes = 0;
  const model::ClipTextConfig clip = o.clip();
  const model::T5Config t5 = o.t5();
  if (bfl) {
    bytes += writeSynthTensors(o, model::clipTextTensors(clip), out / "clip_l.safetensors", "text_model.",
                               {{"num_attention_heads", std::to_string(clip.numHeads)}});
    bytes += writeSynthTensors(o, model::t5EncoderTensors(t5), out / "t5xxl_fp16.safetensors", "");
    return bytes;
  }
  fs::create_directories(out / "text_encoder");
  fs::create_directories(out / "text_encoder_2");
  bytes +=
      writeSynthTensors(o, model::clipTextTensors(clip), out / "text_encoder" / "model.safetensors", "text_model.");
  writeText(out / "text_encoder" / "config.json", clipTextConfigJson(clip));
  bytes += writeSynthTensors(o, model::t5EncoderTensors(t5), out / "text_encoder_2" / "model.safetensors", "");
  writeText(out / "text_encoder_2" / "config.json", t5ConfigJson(t5));
  return bytes;
}

}  // namespace

bool SynthOptions::realConfigs() const {
  return presetName == "flux-dev" || presetName == "flux-schnell" || presetName == "flux";
}

model::VaeConfig SynthOptions::vae() const {
  if (vaeConfig) return *vaeConfig;
  return model::VaeConfig::preset(realConfigs() || presetName == "medium" ? "flux"
                                  : presetName == "small"                 ? "small"
                                                                          : "tiny");
}

model::ClipTextConfig SynthOptions::clip() const {
  if (clipConfig) return *clipConfig;
  model::ClipTextConfig c;  // CLIP-L
  if (!realConfigs()) {
    c.hiddenSize = config.vecInDim;
    c.numHeads = 4;
    c.intermediateSize = 4 * config.vecInDim;
    c.numLayers = 2;
    c.vocabSize = 512 + 300 + 2;  // the synthetic tokenizer's vocabulary
  }
  return c;
}

model::T5Config SynthOptions::t5() const {
  if (t5Config) return *t5Config;
  model::T5Config c;  // T5-XXL v1.1
  if (!realConfigs()) {
    c.dModel = config.contextInDim;
    c.numHeads = 4;
    c.dKv = config.contextInDim / 4;
    c.dFf = 2 * config.contextInDim;
    c.numLayers = 2;
    c.vocabSize = 320;  // more than the synthetic tokenizer's pieces, as T5's 32128 > 32100
  }
  return c;
}

at::Tensor synthTensor(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed ^ fnv1a(name.data(), name.size()));
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto endsWith = [&](const char* suffix) {
    const size_t n = std::strlen(suffix);
    return name.size() >= n && name.compare(name.size() - n, n, suffix) == 0;
  };
  const bool isScale = endsWith(".scale") || (name.find("norm") != std::string::npos && endsWith(".weight"));
  if (shape.size() >= 2) {
    // Like nn.Linear's and nn.Conv2d's default initialisation: uniform in +-1/sqrt(fan_in).
    double fanIn = 1;
    for (size_t i = 1; i < shape.size(); ++i) fanIn *= static_cast<double>(shape[i]);
    const double bound = 1.0 / std::sqrt(fanIn);
    return at::rand(shape, gen, f32).mul_(2 * bound).sub_(bound);
  }
  if (isScale) return at::randn(shape, gen, f32).mul_(0.1).add_(1.0);  // norm scales near 1
  return at::randn(shape, gen, f32).mul_(0.02);                        // biases
}

SynthResult synthesizeCheckpoint(const SynthOptions& o) {
  o.config.validate();
  PARDIT_CHECK(!o.outDir.empty(), "--out is required");
  fs::create_directories(o.outDir);
  SynthResult result;
  const auto groups = model::fluxWeightGroups(o.config);
  const uint64_t elem = c10::elementSize(o.dtype);
  auto bytesOf = [&](const std::vector<int64_t>& shape) {
    uint64_t n = elem;
    for (int64_t d : shape) n *= static_cast<uint64_t>(d);
    return n;
  };
  const uint64_t seed = o.seed;
  const c10::ScalarType dtype = o.dtype;
  const bool zeros = o.zeros;

  if (o.layout == CheckpointLayout::kBfl) {
    SafetensorsWriter w;
    w.addMetadata("format", "pt");
    std::ostringstream axes;
    axes << o.config.axesDim[0] << "," << o.config.axesDim[1] << "," << o.config.axesDim[2];
    w.addMetadata("axes_dims_rope", axes.str());
    for (const auto& g : groups) {
      for (const auto& t : g.tensors) {
        SafetensorsWriter::Producer p;
        if (!zeros) p = [seed, dtype, t] { return synthTensor(seed, t.name, t.shape).to(dtype); };
        w.addLazy(t.name, dtype, t.shape, p);
      }
    }
    const fs::path file = fs::path(o.outDir) / ("flux1-" + o.presetName + ".safetensors");
    w.write(file.string());
    result.modelPath = file.string();
    result.tensorBytes = w.totalBytes();
    result.files = 1;
  } else {
    // diffusers: transformer/ with config.json and shards of at most shardSize bytes, model_index.json
    // and scheduler/scheduler_config.json.
    const fs::path tdir = fs::path(o.outDir) / "transformer";
    fs::create_directories(tdir);
    fs::create_directories(fs::path(o.outDir) / "scheduler");
    struct DTensor {
      std::string name;
      std::vector<int64_t> shape;
      // (internal name, internal shape, internal row offset, rows in this tensor, row offset here)
      struct Part {
        std::string internal;
        std::vector<int64_t> internalShape;
        int64_t internalRow, rows, row;
      };
      std::vector<Part> parts;
    };
    std::vector<DTensor> tensors;
    std::map<std::string, size_t> index;
    for (const auto& g : groups) {
      for (const auto& t : g.tensors) {
        int64_t off = 0;
        for (const auto& piece : diffusersSourcesOf(t.name, o.config)) {
          auto it = index.find(piece.name);
          if (it == index.end()) {
            DTensor d{piece.name, t.shape, {}};
            d.shape[0] = piece.rows;
            index[piece.name] = tensors.size();
            tensors.push_back(d);
            it = index.find(piece.name);
          }
          const int64_t n = piece.rowEnd - piece.rowBegin;
          tensors[it->second].parts.push_back({t.name, t.shape, off, n, piece.rowBegin});
          off += n;
        }
      }
    }
    // Greedy sharding in model order.
    std::vector<std::vector<const DTensor*>> shards(1);
    uint64_t current = 0, total = 0;
    for (const auto& t : tensors) {
      const uint64_t n = bytesOf(t.shape);
      if (current > 0 && current + n > o.shardSize) {
        shards.emplace_back();
        current = 0;
      }
      shards.back().push_back(&t);
      current += n;
      total += n;
    }
    nlohmann::ordered_json weightMap = nlohmann::ordered_json::object();
    std::map<std::string, std::string> mapSorted;
    for (size_t s = 0; s < shards.size(); ++s) {
      char name[96];
      if (shards.size() == 1) {
        std::snprintf(name, sizeof(name), "diffusion_pytorch_model.safetensors");
      } else {
        std::snprintf(name, sizeof(name), "diffusion_pytorch_model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      }
      SafetensorsWriter w;
      w.addMetadata("format", "pt");
      for (const DTensor* t : shards[s]) {
        SafetensorsWriter::Producer p;
        if (!zeros) {
          p = [seed, dtype, t] {
            at::Tensor out = at::empty(t->shape, at::TensorOptions().dtype(at::kFloat));
            for (const auto& part : t->parts) {
              at::Tensor full = synthTensor(seed, part.internal, part.internalShape);
              out.narrow(0, part.row, part.rows).copy_(full.narrow(0, part.internalRow, part.rows));
            }
            return out.to(dtype);
          };
        }
        w.addLazy(t->name, dtype, t->shape, p);
        mapSorted[t->name] = name;
      }
      w.write((tdir / name).string());
    }
    if (shards.size() > 1) {
      for (const auto& [k, v] : mapSorted) weightMap[k] = v;
      nlohmann::ordered_json idx;
      idx["metadata"] = {{"total_size", total}};
      idx["weight_map"] = weightMap;
      writeText(tdir / "diffusion_pytorch_model.safetensors.index.json", idx.dump(2) + "\n");
    }
    writeText(tdir / "config.json", diffusersConfigJson(o.config));
    writeText(fs::path(o.outDir) / "scheduler" / "scheduler_config.json", schedulerConfigJson(o.config.guidanceEmbed));
    nlohmann::ordered_json mi;
    mi["_class_name"] = "FluxPipeline";
    mi["scheduler"] = {"diffusers", "FlowMatchEulerDiscreteScheduler"};
    mi["transformer"] = {"diffusers", "FluxTransformer2DModel"};
    if (o.withVae) mi["vae"] = {"diffusers", "AutoencoderKL"};
    if (o.withText) {
      mi["text_encoder"] = {"transformers", "CLIPTextModel"};
      mi["text_encoder_2"] = {"transformers", "T5EncoderModel"};
      mi["tokenizer"] = {"transformers", "CLIPTokenizer"};
      mi["tokenizer_2"] = {"transformers", "T5TokenizerFast"};
    }
    writeText(fs::path(o.outDir) / "model_index.json", mi.dump(2) + "\n");
    result.modelPath = o.outDir;
    result.tensorBytes = total;
    result.files = static_cast<int>(shards.size());
  }

  if (o.withVae) result.vaePath = synthesizeVae(o, &result.vaeBytes);
  if (o.withText) result.textEncoderBytes = synthesizeText(o);

  // Sample prompt embeddings (positive and negative), batch 1, in the checkpoint dtype.
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (int neg = 0; neg < 2; ++neg) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed + 7919 * (neg + 1));
    std::map<std::string, at::Tensor> e;
    e["prompt_embeds"] = at::randn({1, o.textLen, o.config.contextInDim}, gen, f32).to(dtype);
    e["pooled_prompt_embeds"] = at::randn({1, o.config.vecInDim}, gen, f32).to(dtype);
    const fs::path p = fs::path(o.outDir) / (neg ? "negative_prompt_embeds.safetensors" : "prompt_embeds.safetensors");
    writeSafetensors(p.string(), e, {{"format", "pt"}});
    (neg ? result.negativeEmbedsPath : result.promptEmbedsPath) = p.string();
  }
  return result;
}

}  // namespace pardit::io
