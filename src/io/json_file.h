#pragma once
// Private to src/io: the JSON files of checkpoints (config.json, indexes), read with errors that name
// the file and the key.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <type_traits>
#include <vector>

#include "pardit/core/error.h"
#include "pardit/core/files.h"

namespace pardit::io::detail {

// Writes a text file safely (a temporary renamed over the target); `flag` names the option in errors.
inline void writeTextFile(const std::filesystem::path& p, const std::string& text, const std::string& flag) {
  TemporaryFile tmp(p.string());
  {
    std::ofstream out(tmp.path());
    PARDIT_CHECK(out.good(), tmp.path(), ": cannot create");
    out << text;
    out.flush();
    PARDIT_CHECK(out.good(), tmp.path(), ": write failed");
  }
  tmp.commit(flag);
}

inline nlohmann::json readJsonFile(const std::filesystem::path& file) {
  std::ifstream in(file);
  PARDIT_CHECK(in.good(), file.string(), ": cannot open");
  registerInputFile(file.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    PARDIT_THROW(file.string(), ": not valid JSON: ", e.what());
  }
}

// j[key] as T: `fallback` when absent or null; a value of another type throws naming the file and key.
template <typename T>
T jsonField(const nlohmann::json& j, const char* key, const T& fallback, const std::filesystem::path& file) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  // Integers must be JSON integers: converting 5e41 to int64 is undefined behaviour.
  auto integral = [&](const nlohmann::json& v) {
    PARDIT_CHECK(v.is_number_integer(), file.string(), ": '", key, "' must be an integer, got ", v.dump());
  };
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) integral(j[key]);
  if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    PARDIT_CHECK(j[key].is_array(), file.string(), ": '", key, "' must be an array of integers");
    for (const auto& v : j[key]) integral(v);
  }
  try {
    return j[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    PARDIT_THROW(file.string(), ": '", key, "' has the wrong type");
  }
}

}  // namespace pardit::io::detail
