#include "pardit/io/vae_checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "json_file.h"
#include "pardit/core/error.h"
#include "pardit/core/format.h"

namespace fs = std::filesystem;

namespace pardit::io {

namespace {

model::VaeConfig configFromJson(const fs::path& file) {
  const nlohmann::json j = detail::readJsonFile(file);
  model::VaeConfig c;
  try {
    PARDIT_CHECK(j.is_object(), file.string(), ": expected a JSON object");
    using detail::jsonField;
    c.latentChannels = jsonField(j, "latent_channels", c.latentChannels, file);
    c.outChannels = jsonField(j, "out_channels", c.outChannels, file);
    c.blockOutChannels = jsonField(j, "block_out_channels", c.blockOutChannels, file);
    c.layersPerBlock = jsonField(j, "layers_per_block", c.layersPerBlock, file);
    c.normGroups = jsonField(j, "norm_num_groups", c.normGroups, file);
    c.midBlockAttention = jsonField(j, "mid_block_add_attention", true, file);
    c.scalingFactor = jsonField(j, "scaling_factor", c.scalingFactor, file);
    if (j.contains("sample_size")) {  // an int, or [height, width]
      const auto& size = j["sample_size"];
      const auto& first = size.is_array() && !size.empty() ? size[0] : size;
      PARDIT_CHECK(first.is_number_integer(), file.string(), ": 'sample_size' must be an integer or [height, width]");
      c.sampleSize = first.get<int64_t>();
    }
    c.shiftFactor = jsonField(j, "shift_factor", 0.0, file);
    PARDIT_CHECK(!jsonField(j, "use_post_quant_conv", false, file), file.string(),
                 ": use_post_quant_conv is true; the FLUX VAE has no post-quant convolution");
  } catch (const nlohmann::json::exception& e) {
    PARDIT_THROW(file.string(), ": ", e.what());
  }
  try {
    c.validate();
  } catch (const Error& e) {
    PARDIT_THROW(file.string(), ": ", e.message());
  }
  return c;
}

// A BFL file's configuration from its decoder shapes (and metadata for what shapes cannot tell).
model::VaeConfig configFromShapes(const SafetensorsFile& f) {
  model::VaeConfig c;
  const TensorInfo& convIn = f.info("decoder.conv_in.weight");
  PARDIT_CHECK(convIn.shape.size() == 4, f.path(), ": decoder.conv_in.weight must be 4-d");
  c.latentChannels = convIn.shape[1];
  c.outChannels = f.info("decoder.conv_out.weight").shape.at(0);
  std::vector<int64_t> channels;
  for (int64_t level = 0; f.contains("decoder.up." + std::to_string(level) + ".block.0.conv1.weight"); ++level)
    channels.push_back(f.info("decoder.up." + std::to_string(level) + ".block.0.conv1.weight").shape.at(0));
  PARDIT_CHECK(!channels.empty(), f.path(), ": no decoder.up.0.block.0.conv1.weight (not a VAE file?)");
  c.blockOutChannels = channels;
  int64_t blocks = 0;
  while (f.contains("decoder.up.0.block." + std::to_string(blocks) + ".conv1.weight")) ++blocks;
  c.layersPerBlock = blocks - 1;
  c.midBlockAttention = f.contains("decoder.mid.attn_1.q.weight");
  const auto& meta = f.metadata();
  try {
    if (meta.count("norm_num_groups")) c.normGroups = std::stoll(meta.at("norm_num_groups"));
    if (meta.count("scaling_factor")) c.scalingFactor = std::stod(meta.at("scaling_factor"));
    if (meta.count("shift_factor")) c.shiftFactor = std::stod(meta.at("shift_factor"));
  } catch (const std::exception&) {
    PARDIT_THROW(f.path(), ": __metadata__ norm_num_groups / scaling_factor / shift_factor must be numbers");
  }
  try {
    c.validate();
  } catch (const Error& e) {
    PARDIT_THROW(f.path(), ": ", e.message());
  }
  return c;
}

}  // namespace

std::string bflVaeName(const std::string& internal, int64_t levels) {
  static const std::regex kUp(R"(decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+))");
  static const std::regex kMidRes(R"(decoder\.mid_block\.resnets\.(\d+)\.(.+))");
  static const std::regex kAttn(R"(decoder\.mid_block\.attentions\.0\.(.+))");
  auto leaf = [](std::string s) { return std::regex_replace(s, std::regex(R"(^conv_shortcut\.)"), "nin_shortcut."); };
  std::smatch m;
  if (std::regex_match(internal, m, kUp)) {
    const int64_t level = levels - 1 - std::stoll(m[1]);
    if (m[2] == "upsamplers") return "decoder.up." + std::to_string(level) + ".upsample." + m[4].str();
    return "decoder.up." + std::to_string(level) + ".block." + m[3].str() + "." + leaf(m[4]);
  }
  if (std::regex_match(internal, m, kMidRes))
    return "decoder.mid.block_" + std::to_string(std::stoll(m[1]) + 1) + "." + leaf(m[2]);
  if (std::regex_match(internal, m, kAttn)) {
    static const std::map<std::string, std::string> kParts = {
        {"group_norm", "norm"}, {"to_q", "q"}, {"to_k", "k"}, {"to_v", "v"}, {"to_out.0", "proj_out"}};
    const std::string rest = m[1];
    const size_t dot = rest.rfind('.');
    return "decoder.mid.attn_1." + kParts.at(rest.substr(0, dot)) + rest.substr(dot);
  }
  if (internal.rfind("decoder.conv_norm_out.", 0) == 0) return "decoder.norm_out." + internal.substr(22);
  return internal;  // conv_in, conv_out
}

std::string vaeConfigJson(const model::VaeConfig& c) {
  const std::vector<std::string> down(c.blockOutChannels.size(), "DownEncoderBlock2D");
  const std::vector<std::string> up(c.blockOutChannels.size(), "UpDecoderBlock2D");
  const nlohmann::ordered_json j = {{"_class_name", "AutoencoderKL"},
                                    {"act_fn", "silu"},
                                    {"block_out_channels", c.blockOutChannels},
                                    {"down_block_types", down},
                                    {"up_block_types", up},
                                    {"force_upcast", true},
                                    {"in_channels", c.outChannels},
                                    {"latent_channels", c.latentChannels},
                                    {"latents_mean", nullptr},
                                    {"latents_std", nullptr},
                                    {"layers_per_block", c.layersPerBlock},
                                    {"mid_block_add_attention", c.midBlockAttention},
                                    {"norm_num_groups", c.normGroups},
                                    {"out_channels", c.outChannels},
                                    {"sample_size", c.sampleSize},
                                    {"scaling_factor", c.scalingFactor},
                                    {"shift_factor", c.shiftFactor},
                                    {"use_post_quant_conv", false},
                                    {"use_quant_conv", false}};
  return j.dump(2) + "\n";
}

VaeCheckpoint VaeCheckpoint::open(const std::string& path) {
  VaeCheckpoint ck;
  ck.path_ = path;
  fs::path p(path);
  PARDIT_CHECK(fs::exists(p), path, ": no such file or directory (VAE)");
  if (fs::is_directory(p)) {
    if (fs::exists(p / "vae" / "config.json")) p /= "vae";
    PARDIT_CHECK(fs::exists(p / "config.json"), path,
                 ": no vae/config.json or config.json (a diffusers VAE directory)");
    ck.config_ = configFromJson(p / "config.json");
    const fs::path weights = p / "diffusion_pytorch_model.safetensors";
    PARDIT_CHECK(fs::exists(weights), weights.string(), ": not found (the VAE weights)");
    ck.file_ = SafetensorsFile::open(weights.string());
    ck.layout_ = CheckpointLayout::kDiffusers;
  } else {
    ck.file_ = SafetensorsFile::open(path);
    ck.config_ = configFromShapes(*ck.file_);
    ck.layout_ = CheckpointLayout::kBfl;
  }
  const auto levels = static_cast<int64_t>(ck.config_.blockOutChannels.size());
  for (const auto& t : model::vaeDecoderTensors(ck.config_)) {
    const std::string name = ck.layout_ == CheckpointLayout::kBfl ? bflVaeName(t.name, levels) : t.name;
    const TensorInfo* info = ck.file_->find(name);
    PARDIT_CHECK(info != nullptr, ck.file_->path(), ": VAE tensor '", name, "' not found");
    int64_t numel = 1;
    for (auto d : t.shape) numel *= d;
    const bool sameShape = info->shape == t.shape;
    const bool convAsLinear = ck.layout_ == CheckpointLayout::kBfl && info->numel() == numel && t.shape.size() == 2;
    PARDIT_CHECK(sameShape || convAsLinear, ck.file_->path(), ": VAE tensor '", name, "' has shape ",
                 formatShape(info->shape), ", expected ", formatShape(t.shape), " (", ck.config_.describe(), ")");
    ck.sources_[t.name] = Source{name, t.shape};
  }
  return ck;
}

std::string VaeCheckpoint::findBeside(const FluxCheckpoint& transformer) {
  const fs::path first = transformer.files().front()->path();
  if (transformer.layout() == CheckpointLayout::kDiffusers) {
    const fs::path vae = first.parent_path().parent_path() / "vae";
    return fs::exists(vae / "config.json") ? vae.string() : "";
  }
  const fs::path ae = first.parent_path() / "ae.safetensors";
  return fs::exists(ae) ? ae.string() : "";
}

at::Tensor VaeCheckpoint::load(const std::string& name, c10::ScalarType dtype, c10::Device device) const {
  auto it = sources_.find(name);
  PARDIT_CHECK(it != sources_.end(), path_, ": '", name, "' is not a VAE decoder tensor");
  at::Tensor t = file_->read(it->second.tensor).reshape(it->second.shape).to(dtype);
  return device.is_cpu() ? t : t.to(device);
}

model::WeightGetter VaeCheckpoint::getter(c10::ScalarType dtype, c10::Device device) const {
  return [this, dtype, device](const std::string& name) { return load(name, dtype, device); };
}

}  // namespace pardit::io
