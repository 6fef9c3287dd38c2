#include "pardit/io/png.h"

#include <ATen/ATen.h>
#include <png.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>

#include "pardit/core/error.h"
#include "pardit/core/files.h"

namespace fs = std::filesystem;

namespace pardit::io {

namespace {

struct FileCloser {
  void operator()(FILE* f) const {
    if (f) std::fclose(f);
  }
};
using File = std::unique_ptr<FILE, FileCloser>;

// libpng reports errors through longjmp; these turn them into a message the caller checks after setjmp.
void onError(png_structp png, png_const_charp message) {
  auto* out = static_cast<std::string*>(png_get_error_ptr(png));
  if (out) *out = message;
  png_longjmp(png, 1);
}
void onWarning(png_structp, png_const_charp) {}

int colorType(int64_t channels) {
  switch (channels) {
    case 1:
      return PNG_COLOR_TYPE_GRAY;
    case 3:
      return PNG_COLOR_TYPE_RGB;
    case 4:
      return PNG_COLOR_TYPE_RGBA;
    default:
      PARDIT_THROW("PNG: ", channels, " channels (expected 1, 3 or 4)");
  }
}

// Only plain data lives in the frames that call setjmp (libpng reports errors through longjmp).
bool writeRaw(FILE* f, png_uint_32 W, png_uint_32 H, int type, png_text* chunks, int nChunks, png_bytep* rows,
              std::string* error) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, error, onError, onWarning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, info ? &info : nullptr);
    return false;
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, W, H, 8, type, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (nChunks > 0) png_set_text(png, info, chunks, nChunks);
  png_set_rows(png, info, rows);
  png_write_png(png, info, PNG_TRANSFORM_IDENTITY, nullptr);
  png_destroy_write_struct(&png, &info);
  return true;
}

void writeTo(FILE* f, const at::Tensor& img, const PngText& text, std::string& error) {
  const auto H = static_cast<png_uint_32>(img.size(0)), W = static_cast<png_uint_32>(img.size(1));
  std::vector<png_text> chunks(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    chunks[i].compression = PNG_TEXT_COMPRESSION_NONE;
    chunks[i].key = const_cast<char*>(text[i].first.c_str());
    chunks[i].text = const_cast<char*>(text[i].second.c_str());
    chunks[i].text_length = text[i].second.size();
  }
  std::vector<png_bytep> rows(H);
  auto* data = img.data_ptr<uint8_t>();
  const size_t stride = static_cast<size_t>(W) * static_cast<size_t>(img.size(2));
  for (png_uint_32 r = 0; r < H; ++r) rows[r] = data + r * stride;
  if (!writeRaw(f, W, H, colorType(img.size(2)), chunks.data(), static_cast<int>(chunks.size()), rows.data(), &error) &&
      error.empty())
    error = "cannot write the PNG";
}

// Reads the whole image into libpng's rows; on success the caller owns *png and *info.
bool readRaw(FILE* f, png_structp* png, png_infop* info, std::string* error) {
  *png = png_create_read_struct(PNG_LIBPNG_VER_STRING, error, onError, onWarning);
  if (*png == nullptr) return false;
  *info = png_create_info_struct(*png);
  if (*info == nullptr || setjmp(png_jmpbuf(*png))) {
    png_destroy_read_struct(png, *info ? info : nullptr, nullptr);
    return false;
  }
  png_init_io(*png, f);
  png_set_sig_bytes(*png, 8);
  png_read_png(*png, *info, PNG_TRANSFORM_IDENTITY, nullptr);
  return true;
}

}  // namespace

void writePng(const std::string& path, const at::Tensor& image, const PngText& text) {
  PARDIT_CHECK(image.dim() == 3 && image.scalar_type() == at::kByte && image.device().is_cpu(), path,
               ": a PNG image must be uint8 [H, W, C] on the CPU, got ", image.sizes(), " ", image.scalar_type());
  PARDIT_CHECK(image.size(0) > 0 && image.size(1) > 0, path, ": empty image");
  const at::Tensor img = image.contiguous();
  TemporaryFile temp(path);
  std::string error;
  {
    File f(std::fopen(temp.path().c_str(), "wbx"));
    PARDIT_CHECK(f != nullptr, path, ": cannot create ", temp.path());
    writeTo(f.get(), img, text, error);
    const bool flushed = std::fflush(f.get()) == 0 && ::fsync(fileno(f.get())) == 0;
    if (error.empty() && !flushed) error = "write failed (disk full?)";
  }
  if (!error.empty()) PARDIT_THROW(path, ": ", error);  // the temporary is removed by its guard
  temp.commit("--output");
}

PngText readPngText(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  PARDIT_CHECK(f != nullptr, path, ": cannot open");
  png_byte sig[8];
  PARDIT_CHECK(std::fread(sig, 1, 8, f.get()) == 8 && png_sig_cmp(sig, 0, 8) == 0, path, ": not a PNG file");
  std::string error;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &error, onError, onWarning);
  PARDIT_CHECK(png != nullptr, path, ": cannot read");
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    PARDIT_THROW(path, ": ", error.empty() ? "cannot read" : error);
  }
  png_init_io(png, f.get());
  png_set_sig_bytes(png, 8);
  png_read_info(png, info);  // the chunks up to the first IDAT
  PngText out;
  png_textp text = nullptr;
  const int n = png_get_text(png, info, &text, nullptr);
  for (int i = 0; i < n; ++i) out.emplace_back(text[i].key, std::string(text[i].text, text[i].text_length));
  png_destroy_read_struct(&png, &info, nullptr);
  return out;
}

PngImage readPng(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  PARDIT_CHECK(f != nullptr, path, ": cannot open");
  png_byte sig[8];
  PARDIT_CHECK(std::fread(sig, 1, 8, f.get()) == 8 && png_sig_cmp(sig, 0, 8) == 0, path, ": not a PNG file");
  std::string error;
  png_structp png = nullptr;
  png_infop info = nullptr;
  PARDIT_CHECK(readRaw(f.get(), &png, &info, &error), path, ": ", error.empty() ? "cannot read" : error);
  const png_uint_32 W = png_get_image_width(png, info), H = png_get_image_height(png, info);
  const int depth = png_get_bit_depth(png, info), type = png_get_color_type(png, info);
  const int channels = png_get_channels(png, info);
  if (depth != 8 || (type != PNG_COLOR_TYPE_GRAY && type != PNG_COLOR_TYPE_RGB && type != PNG_COLOR_TYPE_RGBA)) {
    png_destroy_read_struct(&png, &info, nullptr);
    PARDIT_THROW(path, ": only 8-bit grey, RGB and RGBA PNGs are read");
  }
  PngImage out;
  out.pixels = at::empty({static_cast<int64_t>(H), static_cast<int64_t>(W), channels}, at::kByte);
  png_bytepp rows = png_get_rows(png, info);
  const size_t stride = static_cast<size_t>(W) * channels;
  for (png_uint_32 r = 0; r < H; ++r) std::memcpy(out.pixels.data_ptr<uint8_t>() + r * stride, rows[r], stride);
  png_textp text = nullptr;
  const int n = png_get_text(png, info, &text, nullptr);
  for (int i = 0; i < n; ++i) out.text.emplace_back(text[i].key, std::string(text[i].text, text[i].text_length));
  png_destroy_read_struct(&png, &info, nullptr);
  return out;
}

}  // namespace pardit::io
