#pragma once
// Rank-tagged logging: every line is prefixed "[rank r/W]". The rank is set by the runtime, for the
// process and for the calling thread (the rank threads of an in-process job each log as their rank;
// single-process tools leave it at 0/1). Summaries and progress are printed by rank 0 only via
// logInfo0().

#include <string>

#include "pardit/core/error.h"

namespace pardit {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kQuiet = 4 };

void setLogRank(int rank, int worldSize);
void setLogLevel(LogLevel level);
LogLevel logLevel();
int logRank();

void logMessage(LogLevel level, const std::string& msg);

template <typename... Args>
void logInfo(const Args&... args) {
  if (logLevel() <= LogLevel::kInfo) logMessage(LogLevel::kInfo, detail::concat(args...));
}
template <typename... Args>
void logDebug(const Args&... args) {
  if (logLevel() <= LogLevel::kDebug) logMessage(LogLevel::kDebug, detail::concat(args...));
}
template <typename... Args>
void logWarn(const Args&... args) {
  if (logLevel() <= LogLevel::kWarn) logMessage(LogLevel::kWarn, detail::concat(args...));
}
template <typename... Args>
void logError(const Args&... args) {
  logMessage(LogLevel::kError, detail::concat(args...));
}
// Info line printed by rank 0 only.
template <typename... Args>
void logInfo0(const Args&... args) {
  if (logRank() == 0) logInfo(args...);
}
// Warning printed by rank 0 only (for conditions every rank shares, such as an option).
template <typename... Args>
void logWarn0(const Args&... args) {
  if (logRank() == 0) logWarn(args...);
}

}  // namespace pardit
