#pragma once
// Helpers of the fuzz harnesses: the input goes to a file (the parsers read files), in a folder of this
// process that is reused between inputs.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace pardit::fuzz {

inline const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("pardit-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

inline std::string writeFile(const std::string& name, const void* data, size_t size) {
  const auto path = scratch() / name;
  std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path.string();
}

// Splits the input at the first NUL: two files' contents from one input.
inline std::pair<std::string, std::string> split(const uint8_t* data, size_t size) {
  const std::string all(reinterpret_cast<const char*>(data), size);
  const auto nul = all.find('\0');
  if (nul == std::string::npos) return {all, std::string()};
  return {all.substr(0, nul), all.substr(nul + 1)};
}

}  // namespace pardit::fuzz
