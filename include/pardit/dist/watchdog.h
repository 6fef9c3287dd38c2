#pragma once
// The collective watchdog (--collective-timeout): a rank that stops (SIGSTOP, a hung node, a lost link)
// would leave the others spinning in a collective forever. Every blocking MPI operation is watched; when
// one has not completed after the timeout, this rank prints which operation, on which communicator, at
// which point of the run (the context, e.g. "step 3/28") and for how long, and aborts the whole job
// (MPI_Abort). One watchdog thread per process; it only reads the watched state, so an idle job costs
// nothing but one wake-up per second.
#include <cstdint>
#include <string>

namespace pardit::dist {

// Starts (or re-arms) the watchdog of this process; seconds <= 0 turns it off.
void setCollectiveTimeout(double seconds);
double collectiveTimeout();

// What the run is doing, named in the watchdog's message ("loading weights", "step 3/28", ...).
void setWatchContext(const std::string& context);

// Marks one blocking operation in flight for its lifetime (the MPI backend wraps every call in one; on a
// GPU the denoise loop wraps each step, since NCCL collectives return at once and a stalled peer shows as
// a step that never ends). Nests: an inner operation is watched, then the outer one resumes.
class WatchedOperation {
 public:
  explicit WatchedOperation(const char* what);
  ~WatchedOperation();
  WatchedOperation(const WatchedOperation&) = delete;
  WatchedOperation& operator=(const WatchedOperation&) = delete;

 private:
  bool armed_ = false;
  const char* previousWhat_ = nullptr;
  int64_t previousStartNs_ = 0;
};

}  // namespace pardit::dist
