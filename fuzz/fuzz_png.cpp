// A PNG file from the input: readPng (pixels and text chunks) accepts or refuses with a pardit::Error.
#include <ATen/ATen.h>

#include "fuzz_common.h"
#include "pardit/core/error.h"
#include "pardit/io/png.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = pardit::fuzz::writeFile("input.png", data, size);
  try {
    auto image = pardit::io::readPng(path);
    (void)image;
  } catch (const pardit::Error&) {
  }
  return 0;
}
