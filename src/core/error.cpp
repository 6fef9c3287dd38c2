#include "pardit/core/error.h"

#include <cstring>

namespace pardit {
namespace {
std::string baseName(const char* file) {
  const char* slash = std::strrchr(file, '/');
  return slash ? std::string(slash + 1) : std::string(file);
}
}  // namespace

Error::Error(const char* file, int line, const std::string& msg)
    : std::runtime_error(msg), message_(msg), location_(baseName(file) + ":" + std::to_string(line)) {}

namespace detail {
void throwError(const char* file, int line, const std::string& msg) { throw Error(file, line, msg); }
}  // namespace detail
}  // namespace pardit
