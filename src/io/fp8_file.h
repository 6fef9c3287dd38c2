#pragma once
// Private to src/io: float8 weights in safetensors files and their scale tensors, as FP8 checkpoints keep
// them: plain casts (no scale), ComfyUI's "scaled fp8" ("<layer>.scale_weight", one value per tensor,
// beside a "scaled_fp8" marker tensor and optional "<layer>.scale_input"), and "<layer>.weight_scale" (one
// value, or one per output row as pardit quantize writes it).
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pardit/core/error.h"
#include "pardit/io/safetensors.h"

namespace pardit::io::detail {

inline bool isFloat8(const std::string& safetensorsDtype) { return safetensorsDtype.rfind("F8_", 0) == 0; }

inline bool endsWith(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Tensors of FP8 checkpoints that go with a weight and that pardit understands without needing them:
// ComfyUI's "scaled_fp8" marker and the activation scales of FP8 matmuls (pardit computes its own).
inline bool isFp8Companion(const std::string& name) {
  if (name == "scaled_fp8" || endsWith(name, ".scaled_fp8")) return true;
  for (const char* suffix : {".scale_input", ".input_scale", ".comfy_quant"})
    if (endsWith(name, suffix)) return true;
  return false;
}

// The scale tensor of a float8 weight "<layer>.weight" (`w`), looked up with `find(name)` -> (file or null,
// info), checked: one value, or one per row ([rows] or [rows, 1]), in a float dtype. (null, "") when there
// is none (a plain cast).
template <typename Find>
std::pair<std::shared_ptr<SafetensorsFile>, std::string> findScale(const std::string& weight, const TensorInfo& w,
                                                                   const Find& find) {
  const std::string stem = weight.substr(0, weight.size() - std::string(".weight").size());
  for (const std::string& cand : {stem + ".weight_scale", stem + ".scale_weight"}) {
    auto [file, info] = find(cand);
    if (!file) continue;
    const int64_t rows = w.rows();
    const bool one = info->numel() == 1 && info->shape.size() <= 2;
    const bool perRow = (info->shape == std::vector<int64_t>{rows}) || (info->shape == std::vector<int64_t>{rows, 1});
    PARDIT_CHECK(one || perRow, file->path(), ": scale tensor '", cand, "' of the float8 weight '", weight,
                 "' has shape ", at::IntArrayRef(info->shape), ", expected one value or one per row ([", rows, "] or [",
                 rows, ", 1])");
    PARDIT_CHECK(info->dtype == "F32" || info->dtype == "BF16" || info->dtype == "F16", file->path(),
                 ": scale tensor '", cand, "' has dtype ", info->dtype, ", expected F32, BF16 or F16");
    return {file, cand};
  }
  return {nullptr, ""};
}

// The scales of rows [rowBegin, rowEnd) of a weight: [rowEnd - rowBegin] float32 (a single value repeated).
inline at::Tensor readScaleRows(const SafetensorsFile& file, const std::string& scaleTensor, int64_t rowBegin,
                                int64_t rowEnd) {
  const TensorInfo& info = file.info(scaleTensor);
  const int64_t n = rowEnd - rowBegin;
  if (info.numel() == 1) return file.read(scaleTensor).to(at::kFloat).reshape({1}).expand({n}).contiguous();
  return file.readRows(scaleTensor, rowBegin, rowEnd).to(at::kFloat).reshape({n});
}

}  // namespace pardit::io::detail
