#pragma once
// Patch-parallel VAE decode: the ranks of a group each decode a horizontal slab of latent rows, and
// together produce exactly the one-rank decode (to floating-point round-off):
//   * every 3x3 convolution first exchanges one halo row with the neighbouring slabs (zeros at the
//     image's top and bottom edges, as the convolution's padding);
//   * every GroupNorm uses the statistics of the whole image: per-rank sums of x and x^2 in float64,
//     summed across the group (xDiT's patch-parallel VAE normalises each patch with its own variance:
//     xdit-parallelism.md);
//   * the mid-block attention's queries stay local and attend to the keys and values of every row
//     (all-gathered at the lowest resolution, where they are smallest).
// Activation memory per rank scales ~1/N. Slabs may differ by one row when the rows do not divide.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pardit/dist/communicator.h"
#include "pardit/model/vae.h"

namespace pardit::parallel {

// Latent rows [begin, end) of `rank` when `rows` are split over `ranks` (the first rows % ranks ranks
// get one more).
std::pair<int64_t, int64_t> slabRows(int64_t rows, int rank, int ranks);

class PatchVaeSpatial final : public model::VaeSpatial {
 public:
  // `group`: the ranks decoding this image together, in row order.
  explicit PatchVaeSpatial(dist::Communicator& group) : group_(group) {}

  at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) override;
  at::Tensor groupNorm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                       double eps) override;
  std::pair<at::Tensor, at::Tensor> allPositions(const at::Tensor& k, const at::Tensor& v) override;

  // Gathers every rank's part of `x` along `dim` (parts may differ in size), in rank order.
  at::Tensor gatherRows(const at::Tensor& x, int64_t dim);

 private:
  dist::Communicator& group_;
};

// Decodes latents z [B, C, h, w] (the same on every rank of `group`) together: each rank decodes its
// slab; every rank returns the whole decoded image [B, outChannels, f*h, f*w].
at::Tensor decodeParallel(const model::VaeDecoder& decoder, const at::Tensor& z, dist::Communicator& group);

// model::decodeTiled with the tiles dealt round-robin over the ranks of `group` (each tile decoded by
// one rank, then broadcast): the same result as one rank's tiled decode; every rank returns the image.
at::Tensor decodeTiledParallel(const model::VaeDecoder& decoder, const at::Tensor& z, dist::Communicator& group,
                               int64_t tile, double overlap = 0.25);

}  // namespace pardit::parallel
