#pragma once
// Latent packing (2x2 patches of the 16-channel VAE latent -> tokens of 64 features), position ids and
// the initial noise.

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pardit::pipeline {

struct LatentGeometry {
  int64_t height = 0;  // pixels, multiple of 16
  int64_t width = 0;
  int64_t channels = 16;  // VAE latent channels

  int64_t latentHeight() const { return height / 8; }  // h = H / 8
  int64_t latentWidth() const { return width / 8; }
  int64_t tokenRows() const { return height / 16; }
  int64_t tokenCols() const { return width / 16; }
  int64_t tokens() const { return tokenRows() * tokenCols(); }
  int64_t packedChannels() const { return channels * 4; }
  // Throws naming --height/--width when the size is not a positive multiple of 16.
  void validate() const;
};

// [B, C, h, w] -> [B, (h/2)(w/2), 4C]; feature index c*4 + ph*2 + pw, token index row-major.
at::Tensor packLatents(const at::Tensor& latents);
// [B, (h/2)(w/2), 4C] -> [B, C, h, w].
at::Tensor unpackLatents(const at::Tensor& packed, const LatentGeometry& geometry);
// [tokens, 3] rows (0, r, c), row-major, float32.
at::Tensor imageIds(const LatentGeometry& geometry);
// [T, 3] zeros.
at::Tensor textIds(int64_t textLen);
// Initial noise, a pure function of (seed, batch, geometry, dtype): randn [B, C, h, w] from a CPU
// generator seeded with `seed` (the same numbers as torch.randn with torch.Generator("cpu").manual_seed),
// returned packed [B, tokens, 4C].
at::Tensor initialNoise(uint64_t seed, int64_t batch, const LatentGeometry& geometry, c10::ScalarType dtype);

}  // namespace pardit::pipeline
