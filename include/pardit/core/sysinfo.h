#pragma once
#include <cstdint>

namespace pardit {
// Peak resident set size of this process so far, in bytes.
uint64_t peakRssBytes();
// Current resident set size of this process, in bytes.
uint64_t currentRssBytes();
}  // namespace pardit
