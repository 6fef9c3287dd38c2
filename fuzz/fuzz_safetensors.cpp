// A safetensors file as the input: open (every header check), metadata, and a read of each small tensor;
// then the same bytes as a FLUX single-file checkpoint (FP8 scales included).
// Any problem must be a pardit::Error; anything else (a crash, a sanitizer report, another exception) is a
// finding.
#include <ATen/ATen.h>

#include "fuzz_common.h"
#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = pardit::fuzz::writeFile("input.safetensors", data, size);
  try {
    auto f = pardit::io::SafetensorsFile::open(path);
    for (const auto& [k, v] : f->metadata()) (void)(k.size() + v.size());
    for (const auto& t : f->tensors())
      if (t.nbytes() <= (1u << 20)) {
        at::Tensor x = f->read(t.name);
        if (t.shape.size() > 0 && t.shape[0] > 1) (void)f->readRows(t.name, 0, 1);
        (void)x;
      }
    (void)f->sampleHash();
  } catch (const pardit::Error&) {
  }
  // As a FLUX checkpoint (the seed corpus has an FP8 one): discovery, the scales of float8 weights, and the
  // FP8 and dense loads of each linear weight.
  try {
    const auto ck = pardit::io::FluxCheckpoint::open(path);
    int loads = 0;
    for (const auto& g : pardit::model::fluxWeightGroups(ck.config()))
      for (const auto& t : g.tensors)
        if (loads < 16 && pardit::model::fluxFp8Eligible(t.name) && ck.source(t.name).nbytes() <= (1u << 20)) {
          ++loads;
          (void)ck.loadFp8(t.name);
          (void)ck.load(t.name, at::kFloat);
        }
  } catch (const pardit::Error&) {
  }
  return 0;
}
