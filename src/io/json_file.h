#pragma once
// Private to src/io: the JSON files of checkpoints (config.json, indexes), read with errors that name
// the file and the key.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "pardit/core/error.h"
#include "pardit/core/files.h"

namespace pardit::io::detail {

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
  try {
    return j[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    PARDIT_THROW(file.string(), ": '", key, "' has the wrong type");
  }
}

}  // namespace pardit::io::detail
