#include "pardit/pipeline/latents.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "pardit/core/error.h"
#include "pardit/model/flux.h"

namespace pardit::pipeline {

void LatentGeometry::validate() const {
  PARDIT_CHECK(height > 0 && height % 16 == 0, "--height must be a positive multiple of 16, got ", height);
  PARDIT_CHECK(width > 0 && width % 16 == 0, "--width must be a positive multiple of 16, got ", width);
}

at::Tensor packLatents(const at::Tensor& latents) {
  PARDIT_CHECK(latents.dim() == 4 && latents.size(2) % 2 == 0 && latents.size(3) % 2 == 0,
               "latents must be [B, C, h, w] with even h and w, got ", latents.sizes());
  const int64_t B = latents.size(0), C = latents.size(1), h = latents.size(2), w = latents.size(3);
  return latents.view({B, C, h / 2, 2, w / 2, 2}).permute({0, 2, 4, 1, 3, 5}).reshape({B, (h / 2) * (w / 2), C * 4});
}

at::Tensor unpackLatents(const at::Tensor& packed, const LatentGeometry& g) {
  const int64_t B = packed.size(0), rows = g.tokenRows(), cols = g.tokenCols();
  PARDIT_CHECK(packed.dim() == 3 && packed.size(1) == rows * cols && packed.size(2) % 4 == 0,
               "packed latents must be [B, ", rows * cols, ", 4C], got ", packed.sizes());
  const int64_t C = packed.size(2) / 4;
  return packed.view({B, rows, cols, C, 2, 2}).permute({0, 3, 1, 4, 2, 5}).reshape({B, C, rows * 2, cols * 2});
}

at::Tensor imageIds(const LatentGeometry& g) { return model::imagePositionIds(g.tokenRows(), g.tokenCols()); }

at::Tensor textIds(int64_t textLen) { return model::textPositionIds(textLen); }

at::Tensor initialNoise(uint64_t seed, int64_t batch, const LatentGeometry& g, c10::ScalarType dtype) {
  g.validate();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor noise =
      at::randn({batch, g.channels, g.latentHeight(), g.latentWidth()}, gen, at::TensorOptions().dtype(dtype));
  return packLatents(noise);
}

}  // namespace pardit::pipeline
