#pragma once
// Private to src/pipeline: the EngineOptions every rank of a replica group must hold alike.
#include <string>
#include <utility>
#include <vector>

#include "pardit/pipeline/options.h"

namespace pardit::pipeline::detail {
// (option, value) pairs in a fixed order; paths of inputs only as "given or not" (node-local copies).
std::vector<std::pair<std::string, std::string>> syncedFields(const EngineOptions& o);
}  // namespace pardit::pipeline::detail
