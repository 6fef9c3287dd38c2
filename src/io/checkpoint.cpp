#include "pardit/io/checkpoint.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <tuple>

#include "fp8_file.h"
#include "json_file.h"
#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/core/format.h"

namespace fs = std::filesystem;

namespace pardit::io {

std::string layoutName(CheckpointLayout layout) { return layout == CheckpointLayout::kDiffusers ? "diffusers" : "bfl"; }

uint64_t TensorSource::nbytes() const {
  uint64_t n = 0;
  for (const auto& p : pieces) {
    n += static_cast<uint64_t>(p.rowEnd - p.rowBegin) * p.file->info(p.tensor).rowBytes();
    if (p.scaleFile) {
      const TensorInfo& s = p.scaleFile->info(p.scaleTensor);
      n += s.numel() == 1 ? s.nbytes() : static_cast<uint64_t>(p.rowEnd - p.rowBegin) * s.rowBytes();
    }
  }
  return n;
}

using detail::findScale;
using detail::isFloat8;
using detail::isFp8Companion;

namespace {
// A 2-D linear weight of the model (which may carry a scale when stored as float8).
bool fluxLinearWeight(const std::string& internal) {
  return internal.size() > 7 && internal.compare(internal.size() - 7, 7, ".weight") == 0;
}
}  // namespace

namespace {

// ---- internal name -> diffusers pieces -------------------------------------------------------------

std::vector<DiffusersPiece> whole(const std::string& name, int64_t rows) { return {{name, 0, rows, rows}}; }

}  // namespace

std::vector<DiffusersPiece> diffusersSourcesOf(const std::string& internal, const model::FluxConfig& c) {
  const int64_t h = c.hiddenSize, mlp = c.mlpHidden;
  static const std::map<std::string, std::string> kTop = {
      {"img_in", "x_embedder"},
      {"time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"},
      {"time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"},
      {"guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"},
      {"guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"},
      {"vector_in.in_layer", "time_text_embed.text_embedder.linear_1"},
      {"vector_in.out_layer", "time_text_embed.text_embedder.linear_2"},
      {"txt_in", "context_embedder"},
      {"final_layer.linear", "proj_out"},
  };
  const auto dot = internal.rfind('.');
  PARDIT_CHECK(dot != std::string::npos, "bad internal tensor name '", internal, "'");
  const std::string stem = internal.substr(0, dot), leaf = internal.substr(dot + 1);  // leaf: weight|bias|scale
  auto rowsOf = [&](const std::string& s) -> int64_t {
    if (s == "img_in" || s == "txt_in" || s.find("_in.") != std::string::npos) return h;
    if (s == "final_layer.linear") return c.outChannels;
    return h;
  };
  if (auto it = kTop.find(stem); it != kTop.end()) return whole(it->second + "." + leaf, rowsOf(stem));
  if (stem == "final_layer.adaLN_modulation.1") {
    // Internal rows are shift | scale; diffusers' norm_out.linear rows are scale | shift.
    const std::string n = "norm_out.linear." + leaf;
    return {{n, h, 2 * h, 2 * h}, {n, 0, h, 2 * h}};
  }
  static const std::regex kDouble(R"(double_blocks\.(\d+)\.(img|txt)_(.+))");
  static const std::regex kSingle(R"(single_blocks\.(\d+)\.(.+))");
  std::smatch m;
  if (std::regex_match(stem, m, kDouble)) {
    const std::string p = "transformer_blocks." + m[1].str() + ".";
    const bool img = m[2] == "img";
    const std::string part = m[3];
    if (part == "mod.lin") return whole(p + (img ? "norm1.linear." : "norm1_context.linear.") + leaf, 6 * h);
    if (part == "attn.qkv") {
      const std::string a = img ? "attn.to_" : "attn.add_";
      const std::string z = img ? "" : "_proj";
      return {{p + a + "q" + z + "." + leaf, 0, h, h},
              {p + a + "k" + z + "." + leaf, 0, h, h},
              {p + a + "v" + z + "." + leaf, 0, h, h}};
    }
    if (part == "attn.norm.query_norm" && leaf == "scale")
      return whole(p + (img ? "attn.norm_q.weight" : "attn.norm_added_q.weight"), c.headDim());
    if (part == "attn.norm.key_norm" && leaf == "scale")
      return whole(p + (img ? "attn.norm_k.weight" : "attn.norm_added_k.weight"), c.headDim());
    if (part == "attn.proj") return whole(p + (img ? "attn.to_out.0." : "attn.to_add_out.") + leaf, h);
    if (part == "mlp.0") return whole(p + (img ? "ff.net.0.proj." : "ff_context.net.0.proj.") + leaf, mlp);
    if (part == "mlp.2") return whole(p + (img ? "ff.net.2." : "ff_context.net.2.") + leaf, h);
  } else if (std::regex_match(stem, m, kSingle)) {
    const std::string p = "single_transformer_blocks." + m[1].str() + ".";
    const std::string part = m[2];
    if (part == "modulation.lin") return whole(p + "norm.linear." + leaf, 3 * h);
    if (part == "linear1")
      return {{p + "attn.to_q." + leaf, 0, h, h},
              {p + "attn.to_k." + leaf, 0, h, h},
              {p + "attn.to_v." + leaf, 0, h, h},
              {p + "proj_mlp." + leaf, 0, mlp, mlp}};
    if (part == "norm.query_norm" && leaf == "scale") return whole(p + "attn.norm_q.weight", c.headDim());
    if (part == "norm.key_norm" && leaf == "scale") return whole(p + "attn.norm_k.weight", c.headDim());
    if (part == "linear2") return whole(p + "proj_out." + leaf, h);
  }
  PARDIT_THROW("no diffusers name for internal tensor '", internal, "'");
}

std::string diffusersConfigJson(const model::FluxConfig& c) {
  const nlohmann::ordered_json j = {{"_class_name", "FluxTransformer2DModel"},
                                    {"attention_head_dim", c.headDim()},
                                    {"axes_dims_rope", c.axesDim},
                                    {"guidance_embeds", c.guidanceEmbed},
                                    {"in_channels", c.inChannels},
                                    {"joint_attention_dim", c.contextInDim},
                                    {"num_attention_heads", c.numHeads},
                                    {"num_layers", c.depth},
                                    {"num_single_layers", c.depthSingle},
                                    {"out_channels", c.outChannels},
                                    {"patch_size", 1},
                                    {"pooled_projection_dim", c.vecInDim}};
  return j.dump(2) + "\n";
}

// ---- discovery --------------------------------------------------------------------------------------

class CheckpointBuilder {
 public:
  static FluxCheckpoint build(const std::string& path);

 private:
  static void openDiffusersDir(FluxCheckpoint& ck, const fs::path& dir);
  static void openBflFile(FluxCheckpoint& ck, const fs::path& file);
  // Validates the configuration read from `where` and makes it the checkpoint's.
  static void adopt(FluxCheckpoint& ck, const model::FluxConfig& c, CheckpointLayout layout, const fs::path& where);
  static fs::path chooseBflFile(const fs::path& dir);
  static void checkModelIndex(FluxCheckpoint& ck, const fs::path& file);
  static void noteUnused(FluxCheckpoint& ck, const std::string& where, const std::vector<std::string>& unused);
};

namespace {

using detail::jsonField;
using detail::readJsonFile;

bool isSafetensors(const fs::path& p) { return p.extension() == ".safetensors" || p.extension() == ".sft"; }

const char* kBflProbe = "double_blocks.0.img_attn.norm.key_norm.scale";
const char* kDiffusersProbe = "transformer_blocks.0.attn.norm_k.weight";

}  // namespace

// A folder of BFL single files (the transformer beside ae.safetensors, clip_l, t5xxl_*): the transformer is
// the one file named flux1-*; otherwise the one file, among those that are not a known other part, whose
// header has FLUX transformer tensors. Files that cannot be opened are skipped with a note, so an unrelated
// damaged file does not hide a good model.
fs::path CheckpointBuilder::chooseBflFile(const fs::path& dir) {
  std::vector<fs::path> named, others;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file() || !isSafetensors(e.path())) continue;
    const std::string n = e.path().filename().string();
    if (n.rfind("flux1-", 0) == 0 || n.rfind("flux1_", 0) == 0) {
      named.push_back(e.path());
    } else if (n.rfind("ae.", 0) != 0 && n.rfind("clip_", 0) != 0 && n.rfind("t5", 0) != 0) {
      others.push_back(e.path());
    }
  }
  std::sort(named.begin(), named.end());
  std::sort(others.begin(), others.end());
  if (named.size() == 1) return named[0];
  PARDIT_CHECK(named.size() < 2, dir.string(), ": ", named.size(), " flux1-* transformer files (",
               named[0].filename().string(), ", ", named[1].filename().string(), ", ...); pass one of them as --model");
  std::vector<fs::path> flux;
  std::string skipped;
  for (const auto& cpath : others) {
    try {
      auto f = SafetensorsFile::open(cpath.string());
      if (f->contains(kBflProbe) || f->contains(std::string("model.diffusion_model.") + kBflProbe))
        flux.push_back(cpath);
    } catch (const Error& e) {
      skipped += (skipped.empty() ? "" : "; ") + e.message();
    }
  }
  PARDIT_CHECK(!flux.empty(), dir.string(),
               ": no FLUX transformer found (expected transformer/config.json with "
               "diffusion_pytorch_model*.safetensors, or a BFL flux1-*.safetensors file)",
               skipped.empty() ? std::string() : "; skipped: " + skipped);
  PARDIT_CHECK(flux.size() == 1, dir.string(), ": ", flux.size(), " FLUX transformer files found (",
               flux[0].filename().string(), ", ", flux[1].filename().string(), ", ...); pass one of them as --model");
  return flux[0];
}

// model_index.json of a diffusers pipeline folder: not needed to run, but a damaged or foreign one is worth
// a word (another pipeline's folder?).
void CheckpointBuilder::checkModelIndex(FluxCheckpoint& ck, const fs::path& file) {
  if (!fs::exists(file)) return;
  try {
    const nlohmann::json j = readJsonFile(file);
    PARDIT_CHECK(j.is_object(), file.string(), ": expected a JSON object");
    const std::string cls = jsonField<std::string>(j, "_class_name", "", file);
    PARDIT_CHECK(cls.find("Flux") != std::string::npos, file.string(), ": _class_name is '", cls,
                 "', expected a FLUX pipeline (FluxPipeline)");
  } catch (const Error& e) {
    ck.findings_.push_back(e.message());
  }
}

void CheckpointBuilder::adopt(FluxCheckpoint& ck, const model::FluxConfig& c, CheckpointLayout layout,
                              const fs::path& where) {
  try {
    c.validate();
  } catch (const Error& e) {
    PARDIT_THROW(where.string(), ": ", e.message());
  }
  ck.config_ = c;
  ck.layout_ = layout;
}

void CheckpointBuilder::openDiffusersDir(FluxCheckpoint& ck, const fs::path& dir) {
  const fs::path cfgPath = dir / "config.json";
  const nlohmann::json cfg = readJsonFile(cfgPath);
  PARDIT_CHECK(cfg.is_object(), cfgPath.string(), ": expected a JSON object");
  const std::string cls = jsonField<std::string>(cfg, "_class_name", "FluxTransformer2DModel", cfgPath);
  PARDIT_CHECK(cls == "FluxTransformer2DModel", cfgPath.string(), ": _class_name is '", cls,
               "', expected FluxTransformer2DModel");
  model::FluxConfig c;
  c.inChannels = jsonField<int64_t>(cfg, "in_channels", 64, cfgPath);
  c.outChannels = jsonField<int64_t>(cfg, "out_channels", c.inChannels, cfgPath);
  c.depth = jsonField<int64_t>(cfg, "num_layers", 19, cfgPath);
  c.depthSingle = jsonField<int64_t>(cfg, "num_single_layers", 38, cfgPath);
  const int64_t headDim = jsonField<int64_t>(cfg, "attention_head_dim", 128, cfgPath);
  c.numHeads = jsonField<int64_t>(cfg, "num_attention_heads", 24, cfgPath);
  PARDIT_CHECK(headDim > 0 && headDim <= 65536 && c.numHeads > 0 && c.numHeads <= 65536, cfgPath.string(),
               ": attention_head_dim ", headDim, " and num_attention_heads ", c.numHeads, " must be in [1, 65536]");
  c.hiddenSize = headDim * c.numHeads;
  c.mlpHidden = 4 * c.hiddenSize;
  c.contextInDim = jsonField<int64_t>(cfg, "joint_attention_dim", 4096, cfgPath);
  c.vecInDim = jsonField<int64_t>(cfg, "pooled_projection_dim", 768, cfgPath);
  c.guidanceEmbed = jsonField<bool>(cfg, "guidance_embeds", false, cfgPath);
  c.axesDim = jsonField<std::vector<int64_t>>(cfg, "axes_dims_rope", {16, 56, 56}, cfgPath);
  PARDIT_CHECK(jsonField<int64_t>(cfg, "patch_size", 1, cfgPath) == 1, cfgPath.string(), ": patch_size must be 1");
  adopt(ck, c, CheckpointLayout::kDiffusers, cfgPath);

  // Files: sharded (index json) or single.
  std::map<std::string, std::shared_ptr<SafetensorsFile>> byTensor;
  const fs::path indexPath = dir / "diffusion_pytorch_model.safetensors.index.json";
  const fs::path singlePath = dir / "diffusion_pytorch_model.safetensors";
  if (fs::exists(indexPath)) {
    const nlohmann::json index = readJsonFile(indexPath);
    PARDIT_CHECK(index.contains("weight_map") && index["weight_map"].is_object(), indexPath.string(),
                 ": missing weight_map");
    std::map<std::string, std::shared_ptr<SafetensorsFile>> opened;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      PARDIT_CHECK(it.value().is_string(), indexPath.string(), ": weight_map entry '", it.key(), "' is not a string");
      const std::string fname = it.value().get<std::string>();
      PARDIT_CHECK(fname.find('/') == std::string::npos, indexPath.string(), ": shard name '", fname,
                   "' must be a file in the same directory");
      auto& f = opened[fname];
      if (!f) {
        const fs::path shard = dir / fname;
        PARDIT_CHECK(fs::exists(shard), indexPath.string(), ": shard '", fname, "' (listed for tensor '", it.key(),
                     "') does not exist");
        f = SafetensorsFile::open(shard.string());
        ck.files_.push_back(f);
      }
      PARDIT_CHECK(f->contains(it.key()), f->path(), ": tensor '", it.key(), "' listed in ",
                   indexPath.filename().string(), " is not in this shard");
      byTensor[it.key()] = f;
    }
  } else {
    PARDIT_CHECK(fs::exists(singlePath), dir.string(), ": no diffusion_pytorch_model.safetensors or ",
                 "diffusion_pytorch_model.safetensors.index.json next to config.json");
    auto f = SafetensorsFile::open(singlePath.string());
    ck.files_.push_back(f);
    for (const auto& t : f->tensors()) byTensor[t.name] = f;
  }

  for (const auto& group : model::fluxWeightGroups(c)) {
    for (const auto& spec : group.tensors) {
      TensorSource src;
      src.name = spec.name;
      src.shape = spec.shape;
      for (const auto& dp : diffusersSourcesOf(spec.name, c)) {
        auto it = byTensor.find(dp.name);
        PARDIT_CHECK(it != byTensor.end(), dir.string(), ": tensor '", dp.name, "' not found in the checkpoint files");
        const TensorInfo& info = it->second->info(dp.name);
        std::vector<int64_t> expect = spec.shape;
        expect[0] = dp.rows;
        PARDIT_CHECK(info.shape == expect, it->second->path(), ": tensor '", dp.name, "' has shape ",
                     formatShape(info.shape), ", expected ", formatShape(expect), " for ", cfgPath.filename().string(),
                     " (", c.describe(), ")");
        TensorPiece piece{it->second, dp.name, dp.rowBegin, dp.rowEnd, nullptr, ""};
        if (isFloat8(info.dtype) && dp.name.size() > 7 && dp.name.compare(dp.name.size() - 7, 7, ".weight") == 0)
          std::tie(piece.scaleFile, piece.scaleTensor) = findScale(dp.name, info, [&](const std::string& n) {
            auto f = byTensor.find(n);
            return f == byTensor.end()
                       ? std::make_pair(std::shared_ptr<SafetensorsFile>(), static_cast<const TensorInfo*>(nullptr))
                       : std::make_pair(f->second, &f->second->info(n));
          });
        src.pieces.push_back(std::move(piece));
      }
      ck.addSource(std::move(src));
    }
  }
  std::set<std::string> used;
  for (const auto& [name, src] : ck.sources_)
    for (const auto& piece : src.pieces) {
      used.insert(piece.tensor);
      if (piece.scaleFile) used.insert(piece.scaleTensor);
    }
  std::vector<std::string> unused;
  for (const auto& [name, file] : byTensor)
    if (!used.count(name) && !isFp8Companion(name)) unused.push_back(name);
  noteUnused(ck, dir.string(), unused);
}

void CheckpointBuilder::noteUnused(FluxCheckpoint& ck, const std::string& where,
                                   const std::vector<std::string>& unused) {
  if (unused.empty()) return;
  ck.findings_.push_back(where + ": " + std::to_string(unused.size()) + " tensor(s) the model does not use, e.g. '" +
                         unused.front() + "' (another model's weights, or a newer variant?)");
}

void CheckpointBuilder::openBflFile(FluxCheckpoint& ck, const fs::path& file) {
  auto f = SafetensorsFile::open(file.string());
  ck.files_.push_back(f);
  std::string prefix;
  if (!f->contains(kBflProbe) && f->contains(std::string("model.diffusion_model.") + kBflProbe))
    prefix = "model.diffusion_model.";
  PARDIT_CHECK(f->contains(prefix + kBflProbe) || f->contains(kDiffusersProbe), file.string(),
               ": not a FLUX transformer checkpoint (tensor '", kBflProbe, "' not found)");
  PARDIT_CHECK(!f->contains(kDiffusersProbe), file.string(),
               ": diffusers tensor names without transformer/config.json; pass the diffusers directory instead");
  auto shapeOf = [&](const std::string& n) -> const std::vector<int64_t>& { return f->info(prefix + n).shape; };
  auto dimOf = [&](const std::string& n, size_t d) -> int64_t {
    const auto& s = shapeOf(n);
    PARDIT_CHECK(s.size() > d, file.string(), ": tensor '", prefix + n, "' has shape ", formatShape(s),
                 ", expected at least ", d + 1, " dimensions");
    return s[d];
  };
  model::FluxConfig c;
  c.hiddenSize = dimOf("img_in.weight", 0);
  c.inChannels = dimOf("img_in.weight", 1);
  c.vecInDim = dimOf("vector_in.in_layer.weight", 1);
  c.contextInDim = dimOf("txt_in.weight", 1);
  c.outChannels = dimOf("final_layer.linear.weight", 0);
  const int64_t headDim = dimOf("double_blocks.0.img_attn.norm.query_norm.scale", 0);
  PARDIT_CHECK(headDim > 0 && c.hiddenSize % headDim == 0, file.string(), ": head dim ", headDim,
               " does not divide the hidden size ", c.hiddenSize);
  c.numHeads = c.hiddenSize / headDim;
  c.mlpHidden = dimOf("double_blocks.0.img_mlp.0.weight", 0);
  c.guidanceEmbed = f->contains(prefix + "guidance_in.in_layer.weight");
  static const std::regex kIdx(R"((double|single)_blocks\.(\d+)\..*)");
  int64_t nd = 0, ns = 0;
  for (const auto& t : f->tensors()) {
    std::smatch m;
    const std::string n = t.name.substr(std::min(prefix.size(), t.name.size()));
    if (std::regex_match(n, m, kIdx)) {
      const int64_t i = std::stoll(m[2].str()) + 1;
      (m[1] == "double" ? nd : ns) = std::max(m[1] == "double" ? nd : ns, i);
    }
  }
  c.depth = nd;
  c.depthSingle = ns;
  // RoPE axes are not stored in BFL files: the "axes_dims_rope" metadata entry (written by pardit synth)
  // or the FLUX.1 value for a head dim of 128.
  if (auto it = f->metadata().find("axes_dims_rope"); it != f->metadata().end()) {
    c.axesDim.clear();
    std::stringstream ss(it->second);
    std::string item;
    while (std::getline(ss, item, ',')) c.axesDim.push_back(std::stoll(item));
  } else {
    PARDIT_CHECK(headDim == 128, file.string(), ": cannot infer the RoPE axes for head dim ", headDim,
                 " (add \"axes_dims_rope\": \"a,b,c\" to the file's __metadata__)");
    c.axesDim = {16, 56, 56};
  }
  adopt(ck, c, CheckpointLayout::kBfl, file);
  for (const auto& group : model::fluxWeightGroups(c)) {
    for (const auto& spec : group.tensors) {
      const std::string n = prefix + spec.name;
      const TensorInfo* info = f->find(n);
      PARDIT_CHECK(info != nullptr, file.string(), ": tensor '", n, "' not found");
      PARDIT_CHECK(info->shape == spec.shape, file.string(), ": tensor '", n, "' has shape ", formatShape(info->shape),
                   ", expected ", formatShape(spec.shape), " (", c.describe(), ")");
      TensorPiece piece{f, n, 0, info->rows(), nullptr, ""};
      if (isFloat8(info->dtype) && fluxLinearWeight(spec.name))
        std::tie(piece.scaleFile, piece.scaleTensor) = findScale(n, *info, [&](const std::string& cand) {
          return std::make_pair(f->contains(cand) ? f : std::shared_ptr<SafetensorsFile>(), f->find(cand));
        });
      ck.addSource(TensorSource{spec.name, spec.shape, {std::move(piece)}});
    }
  }
  std::set<std::string> scales;
  for (const auto& [name, src] : ck.sources_)
    for (const auto& piece : src.pieces)
      if (piece.scaleFile) scales.insert(piece.scaleTensor);
  std::vector<std::string> unused;
  for (const auto& t : f->tensors())
    if ((t.name.size() < prefix.size() || !ck.sources_.count(t.name.substr(prefix.size()))) && !scales.count(t.name) &&
        !isFp8Companion(t.name))
      unused.push_back(t.name);
  noteUnused(ck, file.string(), unused);
}

FluxCheckpoint CheckpointBuilder::build(const std::string& path) {
  FluxCheckpoint ck;
  ck.path_ = path;
  const fs::path p(path);
  PARDIT_CHECK(fs::exists(p), path, ": no such file or directory");
  if (fs::is_directory(p)) {
    if (fs::exists(p / "transformer" / "config.json")) {
      openDiffusersDir(ck, p / "transformer");
      checkModelIndex(ck, p / "model_index.json");
    } else if (fs::exists(p / "config.json")) {
      openDiffusersDir(ck, p);
    } else {
      const fs::path chosen = chooseBflFile(p);
      ck.choice_ = "the transformer of " + path + " is " + chosen.filename().string();
      openBflFile(ck, chosen);
    }
  } else {
    openBflFile(ck, p);
  }
  // The stored dtype: that of the first double (or single) block's modulation weight.
  const std::string probe =
      ck.config_.depth > 0 ? "double_blocks.0.img_mod.lin.weight" : "single_blocks.0.linear1.weight";
  const auto& piece = ck.sources_.at(probe).pieces.at(0);
  ck.storedDtype_ = safetensorsToScalarType(piece.file->info(piece.tensor).dtype);
  ck.storedFormat_ = ck.storedFp8(probe) ? model::WeightFormat::kFp8 : model::WeightFormat::kDense;
  return ck;
}

FluxCheckpoint FluxCheckpoint::open(const std::string& path) { return CheckpointBuilder::build(path); }

const TensorSource& FluxCheckpoint::source(const std::string& name) const {
  auto it = sources_.find(name);
  PARDIT_CHECK(it != sources_.end(), path_, ": model tensor '", name, "' is not part of this checkpoint");
  return it->second;
}

at::Tensor FluxCheckpoint::load(const std::string& name, c10::ScalarType dtype, c10::Device device) const {
  const TensorSource& src = source(name);
  {
    std::lock_guard<std::mutex> lock(*loadedMutex_);
    loaded_.insert(name);
  }
  std::vector<at::Tensor> parts;
  parts.reserve(src.pieces.size());
  for (const auto& p : src.pieces) {
    at::Tensor rows = p.file->readRows(p.tensor, p.rowBegin, p.rowEnd);
    if (p.scaleFile) rows = rows.to(at::kFloat) * readScale(p).unsqueeze(1);  // a scaled float8 weight
    parts.push_back(rows.to(dtype));
  }
  at::Tensor t = parts.size() == 1 ? parts[0] : at::cat(parts, 0);
  PARDIT_CHECK(t.sizes().vec() == src.shape, path_, ": tensor '", name, "' assembled with shape ", t.sizes(),
               ", expected ", formatShape(src.shape));
  return device.is_cpu() ? t : t.to(device);
}

at::Tensor FluxCheckpoint::readScale(const TensorPiece& p) {
  return detail::readScaleRows(*p.scaleFile, p.scaleTensor, p.rowBegin, p.rowEnd);
}

bool FluxCheckpoint::storedFp8(const std::string& name) const {
  for (const auto& p : source(name).pieces)
    if (p.file->info(p.tensor).dtype != "F8_E4M3") return false;
  return true;
}

model::Fp8Rows FluxCheckpoint::loadFp8(const std::string& name, c10::Device quantizeOn) const {
  const TensorSource& src = source(name);
  PARDIT_CHECK(src.shape.size() == 2, path_, ": tensor '", name, "' is not a 2-D weight and has no FP8 form");
  {
    std::lock_guard<std::mutex> lock(*loadedMutex_);
    loaded_.insert(name);
  }
  std::vector<at::Tensor> values, scales;
  for (const auto& p : src.pieces) {
    at::Tensor rows = p.file->readRows(p.tensor, p.rowBegin, p.rowEnd);
    if (rows.scalar_type() == at::kFloat8_e4m3fn) {
      values.push_back(rows.to(quantizeOn));
      scales.push_back((p.scaleFile ? readScale(p) : at::ones({p.rowEnd - p.rowBegin}, at::kFloat)).to(quantizeOn));
    } else {  // another dtype (or float8 e5m2): quantized here, row by row
      if (!quantizeOn.is_cpu()) rows = rows.to(quantizeOn);
      if (p.scaleFile) rows = rows.to(at::kFloat) * readScale(p).to(rows.device()).unsqueeze(1);
      model::Fp8Rows q = model::quantizeFp8Rows(rows);
      values.push_back(q.values);
      scales.push_back(q.scale);
    }
  }
  model::Fp8Rows out{values.size() == 1 ? values[0] : at::cat(values, 0),
                     scales.size() == 1 ? scales[0] : at::cat(scales, 0)};
  PARDIT_CHECK(out.values.sizes().vec() == src.shape, path_, ": tensor '", name, "' assembled with shape ",
               out.values.sizes(), ", expected ", formatShape(src.shape));
  PARDIT_CHECK(at::isfinite(out.scale).all().item<bool>() && (out.scale > 0).all().item<bool>(), path_,
               ": the scales of the float8 weight '", name, "' must be finite and positive");
  return out;
}

std::vector<StoredRange> FluxCheckpoint::storedRanges(const std::string& name, c10::ScalarType dtype) const {
  const TensorSource& src = source(name);
  std::vector<StoredRange> ranges;
  for (const auto& p : src.pieces) {
    const TensorInfo& info = p.file->info(p.tensor);
    // A scaled float8 weight's values are stored as used in FP8 (its scales are read apart); read densely
    // they must be scaled.
    if ((p.scaleFile && dtype != at::kFloat8_e4m3fn) || safetensorsToScalarType(info.dtype) != dtype) return {};
    const uint64_t row = info.rowBytes();
    const uint64_t begin = static_cast<uint64_t>(p.rowBegin) * row,
                   bytes = static_cast<uint64_t>(p.rowEnd - p.rowBegin) * row;
    // Consecutive rows of the same tensor (the final layer's swapped halves are not) become one range.
    if (!ranges.empty() && ranges.back().tensor == &info && ranges.back().offset + ranges.back().bytes == begin)
      ranges.back().bytes += bytes;
    else
      ranges.push_back({p.file, &info, begin, bytes});
  }
  {
    std::lock_guard<std::mutex> lock(*loadedMutex_);
    loaded_.insert(name);
  }
  return ranges;
}

at::Tensor FluxCheckpoint::loadFp8Scale(const std::string& name) const {
  if (!storedFp8(name)) return loadFp8(name).scale;
  std::vector<at::Tensor> scales;
  for (const auto& p : source(name).pieces)
    scales.push_back(p.scaleFile ? readScale(p) : at::ones({p.rowEnd - p.rowBegin}, at::kFloat));
  at::Tensor scale = scales.size() == 1 ? scales[0] : at::cat(scales, 0);
  PARDIT_CHECK(at::isfinite(scale).all().item<bool>() && (scale > 0).all().item<bool>(), path_,
               ": the scales of the float8 weight '", name, "' must be finite and positive");
  return scale;
}

model::WeightGetter FluxCheckpoint::getter(c10::ScalarType dtype, c10::Device device) const {
  return [this, dtype, device](const std::string& name) { return load(name, dtype, device); };
}

std::set<std::string> FluxCheckpoint::tensorsLoaded() const {
  std::lock_guard<std::mutex> lock(*loadedMutex_);
  return loaded_;
}

uint64_t FluxCheckpoint::bytesRead() const {
  uint64_t n = 0;
  for (const auto& f : files_) n += f->bytesRead();
  return n;
}

uint64_t FluxCheckpoint::totalBytes() const {
  uint64_t n = 0;
  for (const auto& [name, src] : sources_) n += src.nbytes();
  return n;
}

}  // namespace pardit::io
