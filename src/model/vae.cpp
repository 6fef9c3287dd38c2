#include "pardit/model/vae.h"

#include <ATen/ATen.h>

#include <sstream>

#include "pardit/core/error.h"

namespace pardit::model {

// ---- configuration -------------------------------------------------------------------------------------

void VaeConfig::validate() const {
  PARDIT_CHECK(!blockOutChannels.empty(), "VAE: block_out_channels is empty");
  PARDIT_CHECK(latentChannels >= 1 && outChannels >= 1, "VAE: latent and output channels must be positive");
  PARDIT_CHECK(layersPerBlock >= 1, "VAE: layers_per_block must be at least 1");
  PARDIT_CHECK(normGroups >= 1, "VAE: norm_num_groups must be positive");
  for (auto c : blockOutChannels)
    PARDIT_CHECK(c >= 1 && c % normGroups == 0, "VAE: block_out_channels ", c, " is not divisible by norm_num_groups ",
                 normGroups);
  PARDIT_CHECK(scalingFactor != 0.0, "VAE: scaling_factor must not be 0");
  PARDIT_CHECK(sampleSize >= 1, "VAE: sample_size must be positive");
}

std::string VaeConfig::describe() const {
  std::ostringstream os;
  os << "latent " << latentChannels << ", blocks [";
  for (size_t i = 0; i < blockOutChannels.size(); ++i) os << (i ? "," : "") << blockOutChannels[i];
  os << "] x " << layersPerBlock + 1 << " resnets, groups " << normGroups << ", scale " << scalingFactor << ", shift "
     << shiftFactor << (midBlockAttention ? "" : ", no mid attention");
  return os.str();
}

VaeConfig VaeConfig::preset(const std::string& name) {
  VaeConfig c;  // FLUX.1
  if (name == "flux" || name == "flux-dev" || name == "flux-schnell" || name == "medium") return c;
  // The real structure (16 latent channels, 4 levels: 8x upsampling) at test sizes.
  if (name == "tiny") {
    c.blockOutChannels = {8, 8, 16, 16};
    c.layersPerBlock = 1;
    c.normGroups = 4;
    return c;
  }
  if (name == "small") {
    c.blockOutChannels = {32, 64, 128, 128};
    c.normGroups = 32;
    return c;
  }
  PARDIT_THROW("unknown VAE preset '", name, "' (expected tiny, small or flux)");
}

namespace {

void addConv(std::vector<TensorSpec>& out, const std::string& p, int64_t in, int64_t outC, int64_t k) {
  out.push_back({p + ".weight", {outC, in, k, k}});
  out.push_back({p + ".bias", {outC}});
}

void addNorm(std::vector<TensorSpec>& out, const std::string& p, int64_t c) {
  out.push_back({p + ".weight", {c}});
  out.push_back({p + ".bias", {c}});
}

void addResnet(std::vector<TensorSpec>& out, const std::string& p, int64_t in, int64_t outC) {
  addNorm(out, p + ".norm1", in);
  addConv(out, p + ".conv1", in, outC, 3);
  addNorm(out, p + ".norm2", outC);
  addConv(out, p + ".conv2", outC, outC, 3);
  if (in != outC) addConv(out, p + ".conv_shortcut", in, outC, 1);
}

}  // namespace

std::vector<TensorSpec> vaeDecoderTensors(const VaeConfig& c) {
  std::vector<TensorSpec> out;
  const int64_t top = c.blockOutChannels.back();
  addConv(out, "decoder.conv_in", c.latentChannels, top, 3);
  addResnet(out, "decoder.mid_block.resnets.0", top, top);
  if (c.midBlockAttention) {
    const std::string a = "decoder.mid_block.attentions.0";
    addNorm(out, a + ".group_norm", top);
    for (const char* l : {".to_q", ".to_k", ".to_v", ".to_out.0"}) {
      out.push_back({a + l + ".weight", {top, top}});
      out.push_back({a + l + ".bias", {top}});
    }
  }
  addResnet(out, "decoder.mid_block.resnets.1", top, top);
  const auto levels = static_cast<int64_t>(c.blockOutChannels.size());
  int64_t prev = top;
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t ch = c.blockOutChannels[levels - 1 - i];
    const std::string b = "decoder.up_blocks." + std::to_string(i);
    for (int64_t j = 0; j <= c.layersPerBlock; ++j) {
      addResnet(out, b + ".resnets." + std::to_string(j), j == 0 ? prev : ch, ch);
    }
    if (i + 1 < levels) addConv(out, b + ".upsamplers.0.conv", ch, ch, 3);
    prev = ch;
  }
  addNorm(out, "decoder.conv_norm_out", c.blockOutChannels.front());
  addConv(out, "decoder.conv_out", c.blockOutChannels.front(), c.outChannels, 3);
  return out;
}

// ---- spatial operations on the whole image -------------------------------------------------------------

at::Tensor LocalVaeSpatial::conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return at::conv2d(x, weight, bias, /*stride=*/1, /*padding=*/1);
}

at::Tensor LocalVaeSpatial::groupNorm(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                      const at::Tensor& bias, double eps) {
  return at::group_norm(x, groups, weight, bias, eps);
}

// ---- decoder -------------------------------------------------------------------------------------------

VaeDecoder::VaeDecoder(VaeConfig config, const WeightGetter& get)
    : config_((config.validate(), std::move(config))),
      weights_(vaeDecoderTensors(config_), get, "VAE"),
      dtype_(weights_.at("decoder.conv_in.weight").scalar_type()) {}

// diffusers ResnetBlock2D (no time embedding): conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x).
at::Tensor VaeDecoder::resnet(const std::string& p, const at::Tensor& x, VaeSpatial& s) const {
  const int64_t G = config_.normGroups;
  at::Tensor h = s.groupNorm(x, G, w(p + ".norm1.weight"), w(p + ".norm1.bias"), config_.eps);
  h = s.conv3x3(at::silu(h), w(p + ".conv1.weight"), w(p + ".conv1.bias"));
  h = s.groupNorm(h, G, w(p + ".norm2.weight"), w(p + ".norm2.bias"), config_.eps);
  h = s.conv3x3(at::silu(h), w(p + ".conv2.weight"), w(p + ".conv2.bias"));
  at::Tensor shortcut = x;
  if (weights_.has(p + ".conv_shortcut.weight"))
    shortcut = at::conv2d(x, w(p + ".conv_shortcut.weight"), w(p + ".conv_shortcut.bias"));  // as strided as it is
  return (shortcut + h) / 1.0;  // output_scale_factor 1, as the reference computes it
}

// diffusers Attention (AttnProcessor2_0) in the mid block: one head over every position, GroupNorm on
// [B, C, HW], residual.
at::Tensor VaeDecoder::attention(const std::string& p, const at::Tensor& x, VaeSpatial& s) const {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor h = x.view({B, C, H * W}).transpose(1, 2);  // [B, S, C]
  h = s.groupNorm(h.transpose(1, 2), config_.normGroups, w(p + ".group_norm.weight"), w(p + ".group_norm.bias"),
                  config_.eps)
          .transpose(1, 2);
  const at::Tensor q = at::linear(h, w(p + ".to_q.weight"), w(p + ".to_q.bias")).view({B, -1, 1, C}).transpose(1, 2);
  at::Tensor k = at::linear(h, w(p + ".to_k.weight"), w(p + ".to_k.bias")).view({B, -1, 1, C}).transpose(1, 2);
  at::Tensor v = at::linear(h, w(p + ".to_v.weight"), w(p + ".to_v.bias")).view({B, -1, 1, C}).transpose(1, 2);
  std::tie(k, v) = s.allPositions(k, v);                     // [B, 1, S_all, C]
  at::Tensor o = at::scaled_dot_product_attention(q, k, v);  // [B, 1, S, C]
  o = o.transpose(1, 2).reshape({B, -1, C}).to(q.scalar_type());
  o = at::linear(o, w(p + ".to_out.0.weight"), w(p + ".to_out.0.bias"));
  o = o.transpose(-1, -2).reshape({B, C, H, W});
  return (o + x) / 1.0;  // residual; rescale_output_factor 1
}

at::Tensor VaeDecoder::decode(const at::Tensor& z, VaeSpatial& s) const {
  PARDIT_CHECK(z.dim() == 4 && z.size(1) == config_.latentChannels, "VAE decode: latents must be [B, ",
               config_.latentChannels, ", h, w], got ", z.sizes());
  at::Tensor x = s.conv3x3(z.to(dtype_), w("decoder.conv_in.weight"), w("decoder.conv_in.bias"));
  x = resnet("decoder.mid_block.resnets.0", x, s);
  if (config_.midBlockAttention) x = attention("decoder.mid_block.attentions.0", x, s);
  x = resnet("decoder.mid_block.resnets.1", x, s);
  const auto levels = static_cast<int64_t>(config_.blockOutChannels.size());
  for (int64_t i = 0; i < levels; ++i) {
    const std::string b = "decoder.up_blocks." + std::to_string(i);
    for (int64_t j = 0; j <= config_.layersPerBlock; ++j) x = resnet(b + ".resnets." + std::to_string(j), x, s);
    if (i + 1 < levels) {
      x = at::upsample_nearest2d(x, {x.size(2) * 2, x.size(3) * 2});
      x = s.conv3x3(x, w(b + ".upsamplers.0.conv.weight"), w(b + ".upsamplers.0.conv.bias"));
    }
  }
  x = s.groupNorm(x, config_.normGroups, w("decoder.conv_norm_out.weight"), w("decoder.conv_norm_out.bias"),
                  config_.eps);
  return s.conv3x3(at::silu(x), w("decoder.conv_out.weight"), w("decoder.conv_out.bias"));
}

at::Tensor VaeDecoder::decode(const at::Tensor& z) const {
  LocalVaeSpatial local;
  return decode(z, local);
}

uint64_t vaeDecodeActivationBytes(const VaeConfig& c, int64_t batch, int64_t height, int64_t width, int ranks,
                                  size_t elementSize) {
  const auto levels = static_cast<int64_t>(c.blockOutChannels.size());
  const int64_t factor = c.spatialFactor();
  double peak = 0;  // in channel-pixels of one rank
  int64_t prev = c.blockOutChannels.back();
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t ch = c.blockOutChannels[levels - 1 - i];
    const double pixels = static_cast<double>(height / factor << i) * (width / factor << i) / ranks;
    // A resnet from cin to ch: its input, GroupNorm and SiLU outputs, conv outputs and the shortcut.
    peak = std::max(peak, pixels * (3.0 * static_cast<double>(prev) + 2.0 * static_cast<double>(ch)));
    if (i + 1 < levels)  // the upsampler: its input and the x2 upsampled input and output
      peak = std::max(peak, pixels * static_cast<double>(ch) * (1 + 4 * 2));
    prev = ch;
  }
  return static_cast<uint64_t>(peak * static_cast<double>(batch) * static_cast<double>(elementSize));
}

// ---- tiled decode -------------------------------------------------------------------------------------

std::pair<int64_t, int64_t> VaeTileGrid::rowRange(int64_t i, int64_t height) const {
  return {i * stride, std::min(height, i * stride + tile)};
}
std::pair<int64_t, int64_t> VaeTileGrid::colRange(int64_t j, int64_t width) const {
  return {j * stride, std::min(width, j * stride + tile)};
}

VaeTileGrid vaeTileGrid(const VaeConfig& c, int64_t latentHeight, int64_t latentWidth, int64_t tile, double overlap) {
  PARDIT_CHECK(tile >= 1, "VAE tiled decode: the tile must be at least 1 latent pixel, got ", tile);
  PARDIT_CHECK(overlap >= 0 && overlap < 1, "VAE tiled decode: the overlap must be in [0, 1), got ", overlap);
  VaeTileGrid g;
  g.tile = tile;
  g.stride = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(tile) * (1 - overlap)));
  g.rows = (latentHeight + g.stride - 1) / g.stride;
  g.cols = (latentWidth + g.stride - 1) / g.stride;
  const int64_t tilePixels = tile * c.spatialFactor();
  g.blend = static_cast<int64_t>(static_cast<double>(tilePixels) * overlap);
  g.keep = g.stride * c.spatialFactor();  // diffusers' f * tile - blend where that is whole
  return g;
}

at::Tensor vaeTileOf(const VaeTileGrid& g, const at::Tensor& z, int64_t k) {
  const auto [r0, r1] = g.rowRange(k / g.cols, z.size(2));
  const auto [c0, c1] = g.colRange(k % g.cols, z.size(3));
  return z.narrow(2, r0, r1 - r0).narrow(3, c0, c1 - c0).contiguous();
}

namespace {
// b's first rows (dim 2) or columns (dim 3) := a's last ones * (1 - t) + b's * t, t = y / extent.
void blendInto(const at::Tensor& a, at::Tensor& b, int64_t extent, int64_t dim) {
  const int64_t e = std::min({a.size(dim), b.size(dim), extent});
  for (int64_t y = 0; y < e; ++y) {
    const double t = static_cast<double>(y) / static_cast<double>(e);
    at::Tensor line = b.select(dim, y);
    line.copy_(a.select(dim, a.size(dim) - e + y) * (1 - t) + line * t);
  }
}
}  // namespace

at::Tensor blendVaeTiles(const VaeTileGrid& g, std::vector<at::Tensor>& decoded) {
  PARDIT_CHECK(static_cast<int64_t>(decoded.size()) == g.count(), "VAE tiled decode: ", decoded.size(),
               " decoded tiles for a grid of ", g.count());
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < g.rows; ++i) {
    std::vector<at::Tensor> row;
    for (int64_t j = 0; j < g.cols; ++j) {
      at::Tensor& tile = decoded[static_cast<size_t>(i * g.cols + j)];
      if (i > 0) blendInto(decoded[static_cast<size_t>((i - 1) * g.cols + j)], tile, g.blend, 2);
      if (j > 0) blendInto(decoded[static_cast<size_t>(i * g.cols + j - 1)], tile, g.blend, 3);
      row.push_back(tile.narrow(2, 0, std::min(g.keep, tile.size(2))).narrow(3, 0, std::min(g.keep, tile.size(3))));
    }
    rows.push_back(at::cat(row, 3));
  }
  return at::cat(rows, 2);
}

at::Tensor decodeTiled(const VaeDecoder& decoder, const at::Tensor& z, int64_t tile, double overlap) {
  PARDIT_CHECK(z.dim() == 4, "VAE tiled decode: latents must be [B, C, h, w], got ", z.sizes());
  const VaeTileGrid g = vaeTileGrid(decoder.config(), z.size(2), z.size(3), tile, overlap);
  std::vector<at::Tensor> decoded;
  decoded.reserve(static_cast<size_t>(g.count()));
  for (int64_t k = 0; k < g.count(); ++k) decoded.push_back(decoder.decode(vaeTileOf(g, z, k)));
  return blendVaeTiles(g, decoded);
}

uint64_t vaeTiledDecodeBytes(const VaeConfig& c, int64_t batch, int64_t height, int64_t width, int64_t tile,
                             size_t elementSize) {
  const int64_t f = c.spatialFactor();
  const VaeTileGrid g = vaeTileGrid(c, height / f, width / f, tile);
  uint64_t kept = 0;
  for (int64_t k = 0; k < g.count(); ++k) {
    const auto [r0, r1] = g.rowRange(k / g.cols, height / f);
    const auto [c0, c1] = g.colRange(k % g.cols, width / f);
    kept += static_cast<uint64_t>(batch * c.outChannels * (r1 - r0) * (c1 - c0) * f * f) * elementSize;
  }
  // The largest tile is tile x tile latent pixels, or the image where it is smaller.
  return vaeDecodeActivationBytes(c, batch, std::min(tile * f, height), std::min(tile * f, width), 1, elementSize) +
         kept;
}

at::Tensor denormalizeLatents(const at::Tensor& latents, const VaeConfig& c) {
  return latents / c.scalingFactor + c.shiftFactor;
}

at::Tensor imagesToBytes(const at::Tensor& decoded) {
  const at::Tensor x = (decoded * 0.5 + 0.5).clamp(0, 1);
  return (x.permute({0, 2, 3, 1}).to(at::kFloat).cpu() * 255).round().to(at::kByte).contiguous();
}

}  // namespace pardit::model
