#include "pardit/core/dtype.h"

#include <algorithm>
#include <cctype>
#include <map>

#include "pardit/core/error.h"

namespace pardit {

c10::ScalarType parseDtype(const std::string& name) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  if (n == "bf16" || n == "bfloat16") return c10::kBFloat16;
  if (n == "fp16" || n == "f16" || n == "float16" || n == "half") return c10::kHalf;
  if (n == "fp32" || n == "f32" || n == "float32" || n == "float") return c10::kFloat;
  PARDIT_THROW("unknown dtype '", name, "' (expected bf16, fp16 or fp32)");
}

std::string dtypeName(c10::ScalarType type) {
  switch (type) {
    case c10::kBFloat16:
      return "bf16";
    case c10::kHalf:
      return "fp16";
    case c10::kFloat:
      return "fp32";
    case c10::kDouble:
      return "fp64";
    default:
      return c10::toString(type);
  }
}

namespace {
struct StDtype {
  int bits;
  c10::ScalarType type;
  bool torch;
};
const std::map<std::string, StDtype>& stTable() {
  static const std::map<std::string, StDtype> table = {
      {"BOOL", {8, c10::kBool, true}},
      {"U8", {8, c10::kByte, true}},
      {"I8", {8, c10::kChar, true}},
      {"I16", {16, c10::kShort, true}},
      {"U16", {16, c10::kUInt16, true}},
      {"I32", {32, c10::kInt, true}},
      {"U32", {32, c10::kUInt32, true}},
      {"I64", {64, c10::kLong, true}},
      {"U64", {64, c10::kUInt64, true}},
      {"F16", {16, c10::kHalf, true}},
      {"BF16", {16, c10::kBFloat16, true}},
      {"F32", {32, c10::kFloat, true}},
      {"F64", {64, c10::kDouble, true}},
      {"C64", {64, c10::kComplexFloat, true}},
      {"F8_E4M3", {8, c10::kFloat8_e4m3fn, true}},
      {"F8_E5M2", {8, c10::kFloat8_e5m2, true}},
      {"F8_E4M3FNUZ", {8, c10::kFloat8_e4m3fnuz, true}},
      {"F8_E5M2FNUZ", {8, c10::kFloat8_e5m2fnuz, true}},
      {"F8_E8M0", {8, c10::kByte, false}},
      {"F4", {4, c10::kByte, false}},
      {"F6_E2M3", {6, c10::kByte, false}},
      {"F6_E3M2", {6, c10::kByte, false}},
  };
  return table;
}
}  // namespace

bool safetensorsDtypeBits(const std::string& st, int* bits) {
  auto it = stTable().find(st);
  if (it == stTable().end()) return false;
  *bits = it->second.bits;
  return true;
}

c10::ScalarType safetensorsToScalarType(const std::string& st) {
  auto it = stTable().find(st);
  PARDIT_CHECK(it != stTable().end(), "unknown safetensors dtype '", st, "'");
  PARDIT_CHECK(it->second.torch, "safetensors dtype '", st, "' has no tensor equivalent in this build");
  return it->second.type;
}

std::string scalarTypeToSafetensors(c10::ScalarType type) {
  for (const auto& [name, d] : stTable()) {
    if (d.torch && d.type == type) return name;
  }
  PARDIT_THROW("dtype ", c10::toString(type), " cannot be stored in safetensors");
}

}  // namespace pardit
