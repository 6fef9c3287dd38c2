#include "pardit/core/sysinfo.h"

#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>

namespace pardit {
uint64_t peakRssBytes() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<uint64_t>(u.ru_maxrss) * 1024;  // Linux reports KiB
}

uint64_t currentRssBytes() {
  std::ifstream in("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

void releaseFreedMemory() { malloc_trim(0); }

namespace {
void computingAllocations() {
  // glibc's adaptive thresholds at their limits: what a long-running process settles on.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
}
// The process starts computing.
const bool kComputing = (computingAllocations(), true);
}  // namespace

LoadingAllocations::LoadingAllocations() {
  (void)kComputing;
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 20);
}

LoadingAllocations::~LoadingAllocations() {
  computingAllocations();
  releaseFreedMemory();
}
}  // namespace pardit
