#include "pardit/core/sysinfo.h"

#include <sys/resource.h>

namespace pardit {
uint64_t peakRssBytes() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<uint64_t>(u.ru_maxrss) * 1024;  // Linux reports KiB
}
}  // namespace pardit
