#include "pardit/dist/watchdog.h"

#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>

#include "pardit/core/format.h"
#include "pardit/core/log.h"

namespace pardit::dist {
namespace {

int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct State {
  std::atomic<double> timeout{0.0};
  std::atomic<int64_t> startedNs{0};  // 0: nothing in flight
  std::atomic<const char*> what{nullptr};
  std::mutex mutex;  // guards context and the thread's start
  std::string context = "starting";
  bool running = false;  // the watching thread was started (it runs until the process ends)
};

State& state() {
  static State* s = new State();  // never destroyed: the thread may outlive static destruction
  return *s;
}

[[noreturn]] void abortJob(const std::string& line) {
  logError(line);  // one line (errors print at every log level), then the whole job goes
  std::fflush(stderr);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, 124);
  ::_exit(124);
}

void watch() {
  State& s = state();
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double timeout = s.timeout.load();
    const int64_t started = s.startedNs.load();
    if (timeout <= 0 || started == 0) continue;
    const double waited = static_cast<double>(nowNs() - started) * 1e-9;
    if (waited < timeout) continue;
    const char* what = s.what.load();
    std::string context;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      context = s.context;
    }
    abortJob(std::string(what ? what : "a collective") + " has not completed after " + formatSeconds(waited) + " (" +
             context + "; --collective-timeout " + formatNumber(timeout) +
             "): another rank stopped, hung or lost its link; aborting the job");
  }
}

}  // namespace

void setCollectiveTimeout(double seconds) {
  State& s = state();
  s.timeout.store(seconds);
  if (seconds <= 0) return;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.running) {
    std::thread(watch).detach();
    s.running = true;
  }
}

double collectiveTimeout() { return state().timeout.load(); }

void setWatchContext(const std::string& context) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.context = context;
}

WatchedOperation::WatchedOperation(const char* what) {
  State& s = state();
  if (s.timeout.load() <= 0) return;
  // Nested (an MPI call inside a watched GPU step): the inner one is watched, then the outer one resumes.
  previousWhat_ = s.what.exchange(what);
  previousStartNs_ = s.startedNs.exchange(nowNs());
  armed_ = true;
}

WatchedOperation::~WatchedOperation() {
  if (!armed_) return;
  State& s = state();
  s.what.store(previousWhat_);
  s.startedNs.store(previousStartNs_);
}

}  // namespace pardit::dist
