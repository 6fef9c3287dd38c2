#include "pardit/dist/watchdog.h"

#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "pardit/core/format.h"
#include "pardit/core/log.h"

namespace pardit::dist {
namespace {

int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr auto kPeriod = std::chrono::milliseconds(250);
constexpr double kAbortLimitSeconds = 5.0;

}  // namespace

Watchdog::Watchdog() = default;

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::setTimeout(double seconds) {
  timeout_.store(seconds);
  std::lock_guard<std::mutex> lock(mutex_);
  if (seconds > 0 && !thread_.joinable()) thread_ = std::thread([this] { run(); });
}

void Watchdog::setContext(std::string context) {
  std::lock_guard<std::mutex> lock(mutex_);
  context_ = std::move(context);
}

std::string Watchdog::context() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return context_;
}

uint64_t Watchdog::addChannel(std::string name, Hooks hooks) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t id = nextChannel_++;
  channels_[id] = Channel{std::move(name), std::move(hooks), 0};
  return id;
}

void Watchdog::removeChannel(uint64_t channel) {
  std::lock_guard<std::mutex> lock(mutex_);
  channels_.erase(channel);
}

uint64_t Watchdog::sequence(uint64_t channel) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = channels_.find(channel);
  return it == channels_.end() ? 0 : it->second.sequence;
}

std::vector<std::string> Watchdog::channelNames() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> names;
  for (const auto& [id, c] : channels_) names.push_back(c.name);
  return names;
}

uint64_t Watchdog::begin(uint64_t channel, const char* what) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = channels_.find(channel);
  if (it == channels_.end()) return 0;
  const uint64_t record = nextRecord_++;
  inFlight_[record] = InFlight{channel, ++it->second.sequence, what, context_, nowNs()};
  return record;
}

void Watchdog::end(uint64_t record) {
  std::lock_guard<std::mutex> lock(mutex_);
  inFlight_.erase(record);
}

Watchdog::Operation::Operation(Watchdog* watchdog, uint64_t channel, const char* what) {
  if (watchdog == nullptr || channel == 0 || watchdog->timeout() <= 0) return;
  record_ = watchdog->begin(channel, what);
  if (record_ != 0) watchdog_ = watchdog;
}

Watchdog::Operation::~Operation() {
  if (watchdog_ != nullptr) watchdog_->end(record_);
}

void Watchdog::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    wake_.wait_for(lock, kPeriod, [this] { return stop_; });
    if (stop_ || timeout_.load() <= 0 || inFlight_.empty()) continue;
    lock.unlock();
    check();  // ends the process when an operation failed or waited too long
    lock.lock();
  }
}

void Watchdog::check() {
  const double timeout = timeout_.load();
  // Copies under the lock: the hooks run without it (a hook may block in a driver).
  std::vector<std::pair<std::string, Hooks>> channels;
  std::vector<InFlight> inFlight;
  std::map<uint64_t, std::string> names;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [id, c] : channels_) {
      channels.emplace_back(c.name, c.hooks);
      names[id] = c.name;
    }
    for (const auto& [id, op] : inFlight_) inFlight.push_back(op);
  }
  if (inFlight.empty()) return;
  const auto describe = [&](const InFlight& op) {
    return std::string(op.what) + " #" + std::to_string(op.sequence) + " on " + names[op.channel];
  };
  // An asynchronous error a channel reports (a failed peer, a broken link) ends the job now.
  for (const auto& [name, hooks] : channels) {
    std::string error;
    try {
      if (hooks.asyncError) error = hooks.asyncError();
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty())
      endJob(describe(inFlight.front()) + " (" + inFlight.front().context + ") failed: " + name + ": " + error +
             "; aborting the job");
  }
  // The oldest operation in flight (the others started while it waited).
  const InFlight& oldest = inFlight.front();
  const double waited = static_cast<double>(nowNs() - oldest.startedNs) * 1e-9;
  if (timeout <= 0 || waited < timeout) return;
  std::string line = describe(oldest) + " has not completed after " + formatSeconds(waited) + " (started at " +
                     oldest.context + "; --collective-timeout " + formatNumber(timeout) + ")";
  for (const auto& [name, hooks] : channels) {
    if (names[oldest.channel] != name || !hooks.lastError) continue;
    std::string last;
    try {
      last = hooks.lastError();
    } catch (...) {
    }
    if (!last.empty()) line += "; last error on " + name + ": " + last;
  }
  if (inFlight.size() > 1) {
    line += "; also in flight:";
    for (size_t i = 1; i < inFlight.size(); ++i) line += (i > 1 ? ", " : " ") + describe(inFlight[i]);
  }
  endJob(line + ": another rank stopped, hung or lost its link; aborting the job");
}

void Watchdog::endJob(const std::string& line) {
  logError(line);  // one line (errors print at every log level), then the whole job goes
  std::fflush(stderr);
  // Device-side work first (NCCL kernels waiting for a lost peer), then the processes.
  std::vector<std::function<void()>> aborts;
  {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);  // never wait here: the job must end
    if (lock.owns_lock())
      for (const auto& [id, c] : channels_)
        if (c.hooks.abort) aborts.push_back(c.hooks.abort);
  }
  // On a thread of their own, with a time limit: an abort that hangs (a driver waiting on a dead peer) must
  // not keep the processes alive. (Left running: the process ends below.)
  if (!aborts.empty()) {
    auto done = std::make_shared<std::atomic<bool>>(false);
    std::thread([aborts, done] {
      for (const auto& abort : aborts) {
        try {
          abort();
        } catch (...) {  // ending the job matters more than a clean abort
        }
      }
      done->store(true);
    }).detach();
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(kAbortLimitSeconds * 1000));
    while (!done->load() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (!done->load())
      logError("the communicators' aborts did not return within ", formatSeconds(kAbortLimitSeconds),
               "; ending the processes");
  }
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, kExitCode);
  ::_exit(kExitCode);
}

}  // namespace pardit::dist
