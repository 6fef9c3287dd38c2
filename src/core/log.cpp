#include "pardit/core/log.h"

#include <cstdio>
#include <mutex>

namespace pardit {
namespace {
// The process's rank, and per thread the rank of an in-process job's rank thread (-1: the process's).
int gRank = 0;
int gWorld = 1;
thread_local int tRank = -1;
thread_local int tWorld = 1;
LogLevel gLevel = LogLevel::kInfo;
std::mutex gMutex;
}  // namespace

void setLogRank(int rank, int worldSize) {
  gRank = rank;
  gWorld = worldSize;
  tRank = rank;
  tWorld = worldSize;
}
void setLogLevel(LogLevel level) { gLevel = level; }
LogLevel logLevel() { return gLevel; }
int logRank() { return tRank >= 0 ? tRank : gRank; }

void logMessage(LogLevel level, const std::string& msg) {
  static const char* kNames[] = {"debug", "info", "warn", "error", ""};
  const int world = tRank >= 0 ? tWorld : gWorld;
  std::lock_guard<std::mutex> lock(gMutex);
  // Errors and warnings go to stderr so that batch logs keep them apart from progress output.
  FILE* out = level >= LogLevel::kWarn ? stderr : stdout;
  if (level == LogLevel::kInfo) {
    std::fprintf(out, "[rank %d/%d] %s\n", logRank(), world, msg.c_str());
  } else {
    std::fprintf(out, "[rank %d/%d] %s: %s\n", logRank(), world, kNames[static_cast<int>(level)], msg.c_str());
  }
  std::fflush(out);
}
}  // namespace pardit
