#pragma once
// One error type for the whole library. Checks throw pardit::Error carrying file:line and a message;
// the executable's main() catches it, logs it once and aborts the MPI job so that no rank hangs.

#include <sstream>
#include <stdexcept>
#include <string>

namespace pardit {

class Error : public std::runtime_error {
 public:
  Error(const char* file, int line, const std::string& msg);
  // The message without the source location, suitable for a one-line user-facing error.
  const std::string& message() const noexcept { return message_; }
  const std::string& location() const noexcept { return location_; }

 private:
  std::string message_;
  std::string location_;
};

namespace detail {
// Streams any number of arguments into one string; used by the check macros.
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] void throwError(const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace pardit

// PARDIT_CHECK(cond, "message ", value, ...) throws pardit::Error when cond is false.
#define PARDIT_CHECK(cond, ...)                                                                \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      ::pardit::detail::throwError(__FILE__, __LINE__, ::pardit::detail::concat(__VA_ARGS__)); \
    }                                                                                          \
  } while (0)

#define PARDIT_THROW(...) ::pardit::detail::throwError(__FILE__, __LINE__, ::pardit::detail::concat(__VA_ARGS__))
