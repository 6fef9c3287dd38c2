#pragma once
// Conversions between pardit's dtype names (command line, configs), safetensors dtype strings and
// c10::ScalarType.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace pardit {

// "bf16" | "fp16" | "fp32" (also accepts "bfloat16", "float16", "float32", "f32", ...).
c10::ScalarType parseDtype(const std::string& name);
std::string dtypeName(c10::ScalarType type);  // "bf16", "fp16", "fp32", ...

// safetensors dtype strings ("BF16", "F32", ...). Returns false for unknown strings.
bool safetensorsDtypeBits(const std::string& st, int* bits);
// Throws for dtypes without a torch equivalent (F4, F6_*, F8_E8M0).
c10::ScalarType safetensorsToScalarType(const std::string& st);
std::string scalarTypeToSafetensors(c10::ScalarType type);

}  // namespace pardit
