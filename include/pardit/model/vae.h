#pragma once
// The FLUX.1 VAE decoder (diffusers' AutoencoderKL decoder, BFL's AutoEncoder.decoder), numerically
// following diffusers' op order and precision: conv_in -> mid block (resnet, single-head attention,
// resnet) -> up blocks (layers_per_block + 1 resnets, nearest x2 upsample + 3x3 conv but the last) ->
// GroupNorm -> SiLU -> conv_out. Plus the latent normalisation and the image post-processing of
// diffusers' FluxPipeline / VaeImageProcessor.
//
// Internal tensor names are the diffusers ones ("decoder.up_blocks.0.resnets.1.conv2.weight"); io/ maps
// BFL's ae.safetensors names onto them. Spatial operations that see beyond one pixel (3x3 convolutions,
// GroupNorm statistics, the mid-block attention) go through VaeSpatial, so a rank can decode a row slab
// of the image with its neighbours' halo rows and global statistics (parallel/patch_vae.h).

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pardit/model/flux.h"

namespace pardit::model {

struct VaeConfig {
  int64_t latentChannels = 16;
  int64_t outChannels = 3;
  std::vector<int64_t> blockOutChannels = {128, 256, 512, 512};
  int64_t layersPerBlock = 2;
  int64_t normGroups = 32;
  double eps = 1e-6;
  bool midBlockAttention = true;
  double scalingFactor = 0.3611;
  double shiftFactor = 0.1159;
  int64_t sampleSize = 1024;  // config.json sample_size: the pixel tile of diffusers' tiled decode

  // The latent tile of diffusers' tiled decode (tile_latent_min_size): sampleSize / spatialFactor().
  int64_t defaultTileLatent() const { return std::max<int64_t>(1, sampleSize / spatialFactor()); }

  // Pixels per latent pixel: 2^(levels - 1) (8 for FLUX.1).
  int64_t spatialFactor() const { return int64_t{1} << (blockOutChannels.size() - 1); }
  void validate() const;  // throws naming the rule
  std::string describe() const;

  // "flux" (FLUX.1's VAE), and smaller ones with the same structure for tests: "tiny", "small".
  static VaeConfig preset(const std::string& name);
};

// The decoder's tensors (internal = diffusers names) with their shapes, in execution order.
std::vector<TensorSpec> vaeDecoderTensors(const VaeConfig& config);

// How the decoder's spatial operations see the image: all of it (LocalVaeSpatial), or one rank's row
// slab (parallel::PatchVaeSpatial). x is [B, C, rows, W].
class VaeSpatial {
 public:
  virtual ~VaeSpatial() = default;
  // 3x3 convolution with zero padding 1 over the whole image.
  virtual at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) = 0;
  // GroupNorm with statistics over the whole image. x: [B, C, ...].
  virtual at::Tensor groupNorm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                               double eps) = 0;
  // Keys and values [B, 1, S, C] of this rank's positions -> of every position of the image.
  virtual std::pair<at::Tensor, at::Tensor> allPositions(const at::Tensor& k, const at::Tensor& v) = 0;
};

class LocalVaeSpatial final : public VaeSpatial {
 public:
  at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) override;
  at::Tensor groupNorm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                       double eps) override;
  std::pair<at::Tensor, at::Tensor> allPositions(const at::Tensor& k, const at::Tensor& v) override { return {k, v}; }
};

class VaeDecoder {
 public:
  // `get` returns each tensor of vaeDecoderTensors(config) in the compute dtype on the compute device.
  VaeDecoder(VaeConfig config, const WeightGetter& get);

  const VaeConfig& config() const { return config_; }
  c10::ScalarType dtype() const { return dtype_; }
  // z: [B, latentChannels, h, w] already denormalised (z / scaling + shift) -> [B, outChannels, f*h, f*w] in
  // the weights' dtype, nominally in [-1, 1]. With a patch `spatial`, z and the result are this rank's rows.
  at::Tensor decode(const at::Tensor& z, VaeSpatial& spatial) const;
  at::Tensor decode(const at::Tensor& z) const;
  uint64_t weightBytes() const { return weights_.bytes(); }

 private:
  at::Tensor resnet(const std::string& prefix, const at::Tensor& x, VaeSpatial& spatial) const;
  at::Tensor attention(const std::string& prefix, const at::Tensor& x, VaeSpatial& spatial) const;
  const at::Tensor& w(const std::string& name) const { return weights_.at(name); }

  VaeConfig config_;
  NamedWeights weights_;
  c10::ScalarType dtype_;
};

// Estimated peak bytes of one rank's live activations while decoding a batch of height x width images
// split over `ranks` row slabs (the decoder's weights excluded): the largest of every resnet's input,
// normalised and activated copies and outputs, and every upsampler's input and outputs, at that block's
// resolution.
uint64_t vaeDecodeActivationBytes(const VaeConfig& config, int64_t batch, int64_t height, int64_t width, int ranks,
                                  size_t elementSize);

// Tiled decode, as diffusers' AutoencoderKL.tiled_decode (enable_tiling): the latents are cut into
// tile x tile squares every floor(tile * (1 - overlap)) latent pixels, each is decoded on its own (its
// GroupNorm statistics are the tile's: the result is not the whole-image decode), and each decoded tile
// is blended linearly over floor(f * tile * overlap) pixels into the one above and the one to its left,
// in place and in the same order, then cut to f * stride pixels. With tile = defaultTileLatent() (or any
// tile that is a multiple of 4) and overlap 0.25 the result equals diffusers' with tiling enabled
// (diffusers cuts f * tile - blend, the same for those tiles and too many pixels for others). Peak
// activations are one tile's.
struct VaeTileGrid {
  int64_t tile = 0, stride = 0;  // latent pixels
  int64_t rows = 0, cols = 0;    // tiles
  int64_t blend = 0, keep = 0;   // decoded pixels blended with the previous tile; kept of each tile
  // Latent rows [begin, end) of tile row i (columns alike).
  std::pair<int64_t, int64_t> rowRange(int64_t i, int64_t height) const;
  std::pair<int64_t, int64_t> colRange(int64_t j, int64_t width) const;
  int64_t count() const { return rows * cols; }
};
VaeTileGrid vaeTileGrid(const VaeConfig& config, int64_t latentHeight, int64_t latentWidth, int64_t tile,
                        double overlap = 0.25);
// Tile k (row-major) of z.
at::Tensor vaeTileOf(const VaeTileGrid& grid, const at::Tensor& z, int64_t k);
// Blends the decoded tiles (row-major; modified in place) into the image.
at::Tensor blendVaeTiles(const VaeTileGrid& grid, std::vector<at::Tensor>& decoded);
at::Tensor decodeTiled(const VaeDecoder& decoder, const at::Tensor& z, int64_t tile, double overlap = 0.25);
// Bytes of a tiled decode's activations: one tile's (vaeDecodeActivationBytes) and every decoded tile,
// kept for the blend.
uint64_t vaeTiledDecodeBytes(const VaeConfig& config, int64_t batch, int64_t height, int64_t width, int64_t tile,
                             size_t elementSize);

// diffusers' FluxPipeline before decoding (after unpacking the latents to [B, C, h, w]):
// latents / scaling_factor + shift_factor, in the latents' dtype.
at::Tensor denormalizeLatents(const at::Tensor& latents, const VaeConfig& config);

// VaeImageProcessor.postprocess(output_type="pil"/"np"): (x * 0.5 + 0.5).clamp(0, 1) in the image's dtype,
// then float32 x * 255 rounded half to even -> uint8 [B, H, W, C].
at::Tensor imagesToBytes(const at::Tensor& decoded);

}  // namespace pardit::model
