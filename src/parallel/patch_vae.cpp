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
  // One halo row from each neighbour; zeros (the convolution's padding) at the image's edges.
  at::Tensor top = at::zeros({x.size(0), x.size(1), 1, x.size(3)}, x.options());
  at::Tensor bottom = at::zeros_like(top);
  std::vector<std::unique_ptr<dist::Work>> pending;
  if (r > 0) pending.push_back(group_.irecv(top, r - 1));
  if (r + 1 < n) pending.push_back(group_.irecv(bottom, r + 1));
  if (r > 0) pending.push_back(group_.isend(x.narrow(2, 0, 1).contiguous(), r - 1));
  if (r + 1 < n) pending.push_back(group_.isend(x.narrow(2, rows - 1, 1).contiguous(), r + 1));
  for (auto& w : pending) w->wait();
  const at::Tensor haloed = at::cat({top, x, bottom}, 2);
  return at::conv2d(haloed, weight, bias, /*stride=*/1, /*padding=*/at::IntArrayRef{0, 1});
}

at::Tensor PatchVaeSpatial::groupNorm(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                      const at::Tensor& bias, double eps) {
  const int64_t B = x.size(0), C = x.size(1);
  const at::Tensor g = x.reshape({B, groups, -1}).to(at::kDouble);  // [B, G, local elements]
  // Sums of x and x^2 and the element count of every (sample, group), over the whole image.
  at::Tensor stats = at::stack({g.sum(2), (g * g).sum(2), at::full({B, groups}, static_cast<double>(g.size(2)), g.options())});
  group_.allReduce(stats, dist::ReduceOp::kSum);
  const at::Tensor mean = stats[0] / stats[2];
  const at::Tensor var = (stats[1] / stats[2] - mean * mean).clamp_min(0);
  const at::Tensor rstd = (var + eps).rsqrt();
  const auto f32 = at::kFloat;
  at::Tensor y = (x.reshape({B, groups, -1}).to(f32) - mean.unsqueeze(2).to(f32)) * rstd.unsqueeze(2).to(f32);
  std::vector<int64_t> affine(static_cast<size_t>(x.dim()), 1);
  affine[1] = C;
  y = y.reshape(x.sizes()) * weight.to(f32).reshape(affine) + bias.to(f32).reshape(affine);
  return y.to(x.scalar_type());
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

}  // namespace pardit::parallel
