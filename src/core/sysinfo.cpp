#include "pardit/core/sysinfo.h"

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
}  // namespace pardit
