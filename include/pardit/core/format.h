#pragma once
// Human units for log lines and tables: "1.50 GiB", "512 MiB", "2.29 ms", "1.23 s", "3 min 12 s", "3.5".

#include <cstdint>
#include <string>

namespace pardit {

std::string formatBytes(uint64_t bytes);
std::string formatSeconds(double seconds);
// Shortest natural form: 3.5, 1000, 0.001 (no trailing zeros).
std::string formatNumber(double value);

}  // namespace pardit
