#include "pardit/io/synth.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"
#include "pardit/io/vae_checkpoint.h"

namespace fs = std::filesystem;

namespace pardit::io {

namespace {
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ULL;
  }
  return h;
}

void writeText(const fs::path& p, const std::string& text) {
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp);
    PARDIT_CHECK(out.good(), tmp.string(), ": cannot create");
    out << text;
    PARDIT_CHECK(out.good(), tmp.string(), ": write failed");
  }
  fs::rename(tmp, p);
}

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
  const model::VaeConfig& c = o.vaeConfig;
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
      p = [seed = o.seed, dtype = o.dtype, t, shape] { return synthTensor(seed, t.name, t.shape).reshape(shape).to(dtype); };
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

}  // namespace

at::Tensor synthTensor(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed ^ fnv1a(name));
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
  return at::randn(shape, gen, f32).mul_(0.02);                       // biases
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
    writeText(fs::path(o.outDir) / "model_index.json", mi.dump(2) + "\n");
    result.modelPath = o.outDir;
    result.tensorBytes = total;
    result.files = static_cast<int>(shards.size());
  }

  if (o.withVae) result.vaePath = synthesizeVae(o, &result.vaeBytes);

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
