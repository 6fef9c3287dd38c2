#pragma once
// Human units for log lines and tables: "1.50 GiB", "512 MiB", "2.29 ms", "1.23 s", "3 min 12 s", "3.5",
// "5.31 GB/s".

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pardit {

std::string formatBytes(uint64_t bytes);
std::string formatSeconds(double seconds);
// A bandwidth in decimal units, as disks and links are rated: "5.31 GB/s", "820 MB/s".
std::string formatRate(double bytesPerSecond);
// Shortest natural form: 3.5, 1000, 0.001 (no trailing zeros).
std::string formatNumber(double value);
// A tensor shape as PyTorch prints it: "[3072, 64]".
std::string formatShape(const std::vector<int64_t>& shape);

// 64-bit FNV-1a of `n` bytes, continuing from `h` (file identities, input fingerprints, synth seeds).
constexpr uint64_t kFnvOffset = 1469598103934665603ULL;
uint64_t fnv1a(const void* data, size_t n, uint64_t h = kFnvOffset);
// 16 lowercase hex digits.
std::string formatHash(uint64_t h);

}  // namespace pardit
