// PNG files (io/png.h): pixels and text chunks round-trip, the text reads back without decoding the pixels,
// writes are atomic (no temporary left, a failed write leaves the old file), and bad files are errors.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "pardit/core/error.h"
#include "pardit/io/png.h"
#include "test_util.h"

using namespace pardit;

TEST(Png, RoundTripWithTextAndAtomicWrite) {
  test::TempDir dir;
  at::manual_seed(1);
  const at::Tensor img = at::randint(0, 256, {5, 7, 3}, at::kByte);
  const io::PngText text = {{"parameters", "a cat\nSteps: 4, Seed: 42, Size: 7x5"}, {"Software", "pardit"}};
  io::writePng(dir.file("x.png"), img, text);
  const io::PngImage back = io::readPng(dir.file("x.png"));
  EXPECT_TRUE(at::equal(back.pixels, img));
  EXPECT_EQ(back.text, text);
  EXPECT_EQ(io::readPngText(dir.file("x.png")), text);  // without decoding the pixels
  EXPECT_THROW(io::readPngText(test::fixture("vae_decode_tiny.safetensors")), Error);
  // No temporary files are left behind; a failed write leaves the old image untouched.
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);
  EXPECT_THROW(io::writePng(dir.file("missing/x.png"), img), Error);
  EXPECT_THROW(io::writePng(dir.file("y.png"), at::zeros({5, 7, 2}, at::kByte)), Error);
  EXPECT_THROW(io::readPng(test::fixture("vae_decode_tiny.safetensors")), Error);
  EXPECT_TRUE(at::equal(io::readPng(dir.file("x.png")).pixels, img));
}
