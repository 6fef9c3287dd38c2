#pragma once
// PNG images through libpng: 8-bit RGB (or grey / RGBA) with tEXt chunks, written atomically (a unique
// temporary file in the target's directory, renamed over the target), and read back.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace pardit::io {

using PngText = std::vector<std::pair<std::string, std::string>>;  // tEXt keyword -> text (Latin-1 / UTF-8)

// image: uint8 [H, W, C] with C in {1, 3, 4}, on the CPU.
void writePng(const std::string& path, const at::Tensor& image, const PngText& text = {});

struct PngImage {
  at::Tensor pixels;  // uint8 [H, W, C]
  PngText text;
};
// 8-bit PNGs (grey, RGB, RGBA). Throws naming the file for anything else.
PngImage readPng(const std::string& path);
// The text chunks before the image data (where writePng puts them), without decoding the pixels.
PngText readPngText(const std::string& path);

}  // namespace pardit::io
