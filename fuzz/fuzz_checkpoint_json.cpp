// A diffusers transformer folder whose config.json and diffusion_pytorch_model.safetensors.index.json come
// from the input (split at the first NUL); the one shard is a small valid file. FluxCheckpoint::open must
// accept or refuse with a pardit::Error.
#include <ATen/ATen.h>

#include "fuzz_common.h"
#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool shard = [] {
    std::filesystem::create_directories(pardit::fuzz::scratch() / "t");
    for (const char* name : {"a.safetensors", "diffusion_pytorch_model.safetensors"})
      pardit::io::writeSafetensors((pardit::fuzz::scratch() / "t" / name).string(),
                                   {{"x_embedder.weight", at::zeros({4, 4})}, {"x_embedder.bias", at::zeros({4})}});
    return true;
  }();
  (void)shard;
  const auto [config, index] = pardit::fuzz::split(data, size);
  pardit::fuzz::writeFile("t/config.json", config.data(), config.size());
  const std::string indexPath =
      (pardit::fuzz::scratch() / "t" / "diffusion_pytorch_model.safetensors.index.json").string();
  if (index.empty()) {
    std::filesystem::remove(indexPath);
  } else {
    pardit::fuzz::writeFile("t/diffusion_pytorch_model.safetensors.index.json", index.data(), index.size());
  }
  try {
    (void)pardit::io::FluxCheckpoint::open((pardit::fuzz::scratch() / "t").string());
  } catch (const pardit::Error&) {
  }
  return 0;
}
