#include "pardit/dist/watchdog.h"

#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <vector>
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
  struct Hooks {
    std::function<std::string()> asyncError;
    std::function<void()> abort;
  };
  std::map<uint64_t, Hooks> communicators;  // guarded by mutex
  uint64_t nextId = 1;
};

State& state() {
  static State* s = new State();  // never destroyed: the thread may outlive static destruction
  return *s;
}

constexpr double kAbortLimitSeconds = 5.0;
constexpr auto kAbortLimit = std::chrono::milliseconds(static_cast<int64_t>(kAbortLimitSeconds * 1000));

[[noreturn]] void abortJob(const std::string& line) {
  logError(line);  // one line (errors print at every log level), then the whole job goes
  std::fflush(stderr);
  // Device-side work first (NCCL kernels waiting for a lost peer), then the processes.
  std::vector<std::function<void()>> aborts;
  {
    State& s = state();
    std::unique_lock<std::mutex> lock(s.mutex, std::try_to_lock);  // never wait here: the job must end
    if (lock.owns_lock())
      for (const auto& [id, hooks] : s.communicators) aborts.push_back(hooks.abort);
  }
  // On a thread of their own, with a time limit: an abort that hangs (a driver waiting on a dead peer) must
  // not keep the processes alive.
  if (!aborts.empty()) {
    auto done = std::make_shared<std::atomic<bool>>(false);
    std::thread([aborts, done] {
      for (const auto& abort : aborts) {
        try {
          if (abort) abort();
        } catch (...) {  // ending the job matters more than a clean abort
        }
      }
      done->store(true);
    }).detach();
    const auto deadline = std::chrono::steady_clock::now() + kAbortLimit;
    while (!done->load() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (!done->load()) logError("the communicators' aborts did not return within ", formatSeconds(kAbortLimitSeconds),
                                "; ending the processes");
  }
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
    // An asynchronous error a communicator reports (a failed peer, a broken link) ends the job now.
    std::vector<std::function<std::string()>> checks;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      for (const auto& [id, hooks] : s.communicators) checks.push_back(hooks.asyncError);
    }
    for (const auto& check : checks) {
      std::string error;
      try {
        if (check) error = check();
      } catch (const std::exception& e) {
        error = e.what();
      }
      if (!error.empty()) {
        const char* what = s.what.load();
        abortJob(std::string(what ? what : "a collective") + " failed: " + error + "; aborting the job");
      }
    }
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

uint64_t registerCommunicator(std::function<std::string()> asyncError, std::function<void()> abort) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const uint64_t id = s.nextId++;
  s.communicators[id] = State::Hooks{std::move(asyncError), std::move(abort)};
  return id;
}

void unregisterCommunicator(uint64_t id) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.communicators.erase(id);
}

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
