#pragma once
// The collective watchdog (--collective-timeout): a rank that stops (SIGSTOP, a hung node, a lost link)
// would leave the others spinning in a collective forever. Every blocking MPI operation is watched; when
// one has not completed after the timeout, this rank prints which operation, on which communicator, at
// which point of the run (the context, e.g. "step 3/28") and for how long, and aborts the whole job
// (MPI_Abort). One watchdog thread per process; it only reads the watched state, so an idle job costs
// nothing but one wake-up per second.
#include <cstdint>
#include <functional>
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

// A communicator with device-side work the watchdog must know about (NCCL): `asyncError` returns a
// non-empty description when the library reports an asynchronous error (ncclCommGetAsyncError: a peer
// failed, a link broke), which ends the job at once instead of after the timeout; `abort` cancels the
// communicator's in-flight operations (ncclCommAbort, so GPU kernels waiting for a lost peer return) just
// before the job is aborted. Both are called from the watchdog thread, only while an operation is watched
// (asyncError) or when the job ends (abort). Returns an id for unregisterCommunicator().
uint64_t registerCommunicator(std::function<std::string()> asyncError, std::function<void()> abort);
void unregisterCommunicator(uint64_t id);

}  // namespace pardit::dist
