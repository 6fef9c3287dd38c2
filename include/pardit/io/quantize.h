#pragma once
// `pardit quantize`: an FP8 copy of a FLUX checkpoint in the layout it came in. The blocks' linear weights
// (model/fp8.h states the rule) become float8_e4m3fn with "<layer>.weight_scale" ([out] float32, one
// scale per output row) next to them; every other tensor and the file metadata are copied as stored.
//
//   diffusers pipeline folder -> OUT/transformer/ (config.json, the same shard files and index), T5 in
//                                FP8 in OUT/text_encoder_2/ (its q, k, v, o, wi_0, wi_1, wo weights), and the
//                                pipeline's other parts (VAE, CLIP, tokenizers, scheduler) linked (hard
//                                links; copies across file systems)
//   diffusers transformer dir -> OUT/ (config.json, shards, index)
//   BFL file                  -> OUT/<name>-fp8.safetensors
//   folder of BFL files       -> OUT/<transformer>-fp8.safetensors, t5xxl_fp16 (or t5xxl) as
//                                OUT/t5xxl_fp8_e4m3fn_scaled.safetensors, and the folder's other files linked
//
// Memory: one tensor at a time (each weight is read twice: once for its scales, once for its values, as
// the writer puts the float32 scales before the 1-byte values). Every file is written to a temporary
// and renamed when complete.
#include <cstdint>
#include <string>
#include <vector>

namespace pardit::io {

struct QuantizeResult {
  std::string modelPath;            // what to pass as --model
  int64_t weightsQuantized = 0;     // file tensors written as FP8
  uint64_t bytesIn = 0;             // tensor bytes of the transformer files read
  uint64_t bytesOut = 0;            // tensor bytes of the transformer files written
  bool t5Quantized = false;         // the folder's T5 (text_encoder_2/ or t5xxl_fp16) written in FP8 too
  std::vector<std::string> linked;  // other files of the folder, linked or copied into OUT
};

QuantizeResult quantizeCheckpoint(const std::string& modelPath, const std::string& outDir);

}  // namespace pardit::io
