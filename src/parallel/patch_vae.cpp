#include "pardit/parallel/patch_vae.h"

#include <ATen/ATen.h>

#include "pardit/core/error.h"

namespace pardit::parallel {

std::pair<int64_t, int64_t> slabRows(int64_t rows, int rank, int ranks) {
  const int64_t base = rows / ranks, extra = rows % ranks;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

at::Tensor PatchVaeSpatial::conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const int r = group_.rank(), n = group_.size();
  const int64_t rows = x.size(2);
  // One halo row from each neighbour (none at the image's edges, where the zero padding is right).
  at::Tensor top, bottom;
  std::vector<std::unique_ptr<dist::Work>> pending;
  // Each exchange is one paired send/receive: on NCCL a lone receive blocks the GPU stream until it is
  // matched, so two neighbours each receiving first would wait for each other forever.
  if (r > 0) {
    top = at::empty({x.size(0), x.size(1), 1, x.size(3)}, x.options());
    pending.push_back(group_.sendRecv(x.narrow(2, 0, 1).contiguous(), r - 1, top, r - 1));
  }
  if (r + 1 < n) {
    bottom = at::empty({x.size(0), x.size(1), 1, x.size(3)}, x.options());
    pending.push_back(group_.sendRecv(x.narrow(2, rows - 1, 1).contiguous(), r + 1, bottom, r + 1));
  }
  for (auto& w : pending) w->wait();
  // The slab with zero padding is right everywhere but its first and last rows next to a neighbour; those
  // are recomputed from a strip with the halo row (no copy of the whole slab).
  at::Tensor out = at::conv2d(x, weight, bias, /*stride=*/1, /*padding=*/1);
  auto edgeRow = [&](int64_t row) {
    std::vector<at::Tensor> strip;
    strip.push_back(row == 0 && top.defined() ? top
                    : row == 0                ? at::zeros_like(x.narrow(2, 0, 1))
                                              : x.narrow(2, row - 1, 1));
    strip.push_back(x.narrow(2, row, 1));
    strip.push_back(row == rows - 1 && bottom.defined() ? bottom
                    : row == rows - 1                   ? at::zeros_like(x.narrow(2, 0, 1))
                                                        : x.narrow(2, row + 1, 1));
    out.narrow(2, row, 1).copy_(at::conv2d(at::cat(strip, 2), weight, bias, 1, at::IntArrayRef{0, 1}));
  };
  if (top.defined()) edgeRow(0);
  if (bottom.defined() && (rows > 1 || !top.defined())) edgeRow(rows - 1);
  return out;
}

at::Tensor PatchVaeSpatial::groupNorm(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                      const at::Tensor& bias, double eps) {
  const int64_t B = x.size(0), C = x.size(1);
  // Per (sample, group): this slab's element count, mean and sum of squared deviations (one fused
  // reduction, no copy of the slab), combined across the group in float64 (Chan et al.'s parallel variance).
  const bool wide = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const at::Tensor xg = wide ? x.reshape({B, groups, -1}) : x.reshape({B, groups, -1}).to(at::kFloat);
  const auto [var, mean] = at::var_mean(xg, /*dim=*/{2}, /*correction=*/0, /*keepdim=*/false);
  const double count = static_cast<double>(xg.size(2));
  at::Tensor stats = at::stack({at::full({B, groups}, count, at::kDouble), mean.to(at::kDouble) * count,
                                (var.to(at::kDouble) + mean.to(at::kDouble).square()) * count});
  group_.allReduce(stats, dist::ReduceOp::kSum);  // sums of n, x and x^2 over the image
  const at::Tensor gmean = stats[1] / stats[0];
  const at::Tensor gvar = (stats[2] / stats[0] - gmean.square()).clamp_min(0);
  // y = (x - mean) * rstd * w + b, folded into one multiply-add per channel: y = x * a + c.
  const at::Tensor rstd = (gvar + eps).rsqrt();  // [B, G]
  const at::Tensor perChannel = [&](const at::Tensor& g) {
    return g.repeat_interleave(C / groups, 1);
  }(rstd);  // [B, C]
  const at::Tensor w = weight.to(at::kDouble).unsqueeze(0), bb = bias.to(at::kDouble).unsqueeze(0);
  const at::Tensor a = perChannel * w;
  const at::Tensor c = bb - gmean.repeat_interleave(C / groups, 1) * a;
  std::vector<int64_t> shape{B, C};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(1);
  return at::addcmul(c.to(x.scalar_type()).view(shape), x, a.to(x.scalar_type()).view(shape));
}

at::Tensor PatchVaeSpatial::gatherRows(const at::Tensor& x, int64_t dim) {
  // Pad every rank's part to the largest, all-gather, and keep each rank's own rows.
  const int n = group_.size();
  at::Tensor sizes = at::full({1}, x.size(dim), at::kLong);
  at::Tensor all = dist::allGather(group_, sizes);  // [n, 1]
  const int64_t most = all.max().item<int64_t>();
  at::Tensor padded = x;
  if (x.size(dim) < most) {
    std::vector<int64_t> shape = x.sizes().vec();
    shape[dim] = most - x.size(dim);
    padded = at::cat({x, at::zeros(shape, x.options())}, dim);
  }
  at::Tensor gathered = dist::allGather(group_, padded.contiguous());  // [n, ...]
  std::vector<at::Tensor> parts;
  for (int i = 0; i < n; ++i) parts.push_back(gathered[i].narrow(dim, 0, all[i].item<int64_t>()));
  return at::cat(parts, dim);
}

std::pair<at::Tensor, at::Tensor> PatchVaeSpatial::allPositions(const at::Tensor& k, const at::Tensor& v) {
  return {gatherRows(k, 2), gatherRows(v, 2)};  // [B, 1, S, C]: positions are row-major, slabs in rank order
}

at::Tensor decodeParallel(const model::VaeDecoder& decoder, const at::Tensor& z, dist::Communicator& group) {
  const int64_t h = z.size(2);
  PARDIT_CHECK(h >= group.size(), "parallel VAE decode: ", h, " latent rows for ", group.size(),
               " ranks; every rank needs at least one row");
  if (group.size() == 1) return decoder.decode(z);
  const auto [begin, end] = slabRows(h, group.rank(), group.size());
  PatchVaeSpatial spatial(group);
  const at::Tensor mine = decoder.decode(z.narrow(2, begin, end - begin).contiguous(), spatial);
  return spatial.gatherRows(mine, 2);  // every rank's rows, in order
}

at::Tensor decodeTiledParallel(const model::VaeDecoder& decoder, const at::Tensor& z, dist::Communicator& group,
                               int64_t tile, double overlap) {
  const auto& c = decoder.config();
  const model::VaeTileGrid g = model::vaeTileGrid(c, z.size(2), z.size(3), tile, overlap);
  const int64_t f = c.spatialFactor();
  std::vector<at::Tensor> decoded(static_cast<size_t>(g.count()));
  // Every rank decodes its tiles first, then each tile goes from its owner to every rank.
  for (int64_t k = group.rank(); k < g.count(); k += group.size())
    decoded[static_cast<size_t>(k)] = decoder.decode(model::vaeTileOf(g, z, k));
  for (int64_t k = 0; k < g.count(); ++k) {
    at::Tensor& t = decoded[static_cast<size_t>(k)];
    if (!t.defined()) {
      const auto [r0, r1] = g.rowRange(k / g.cols, z.size(2));
      const auto [c0, c1] = g.colRange(k % g.cols, z.size(3));
      t = at::empty({z.size(0), c.outChannels, f * (r1 - r0), f * (c1 - c0)}, z.options().dtype(decoder.dtype()));
    }
    if (group.size() > 1) group.broadcast(t, static_cast<int>(k % group.size()));
  }
  return model::blendVaeTiles(g, decoded);
}

}  // namespace pardit::parallel
