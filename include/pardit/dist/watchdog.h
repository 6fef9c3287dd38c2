#pragma once
// The collective watchdog (--collective-timeout): a rank that stops (SIGSTOP, a hung node, a lost link)
// would leave the others waiting in a collective forever. Each dist::Runtime owns one Watchdog (the runtimes
// of its replica groups share it); every communicator the runtime makes is a channel of it, and each of a
// channel's blocking operations is recorded while in flight with the channel's sequence number, what it is,
// the run's context when it started ("step 3/28") and since when. A thread wakes every 250 ms while a
// timeout is set: when an operation has been in flight longer than the timeout, or a channel reports an
// asynchronous error (NCCL), this rank prints one line naming the operation, its channel and sequence number,
// the context and the time waited (with the channel's last error, if any), aborts the channels' device work
// and ends the whole job (MPI_Abort, exit status 124). The thread is started by the first positive timeout
// and stopped and joined by the destructor.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pardit::dist {

class Watchdog {
 public:
  // Exit status of a job the watchdog ended.
  static constexpr int kExitCode = 124;

  Watchdog();
  ~Watchdog();  // stops and joins the thread
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Seconds an operation may stay in flight; <= 0 turns watching off (the thread then sleeps).
  void setTimeout(double seconds);
  double timeout() const { return timeout_.load(); }

  // What the run is doing, recorded with each operation ("opening the model", "step 3/28", ...).
  void setContext(std::string context);
  std::string context() const;

  // A channel: one communicator (or the denoise loop on a GPU). `lastError` returns the channel's last
  // error text (ncclGetLastError) for the timeout's message, `asyncError` a non-empty description when the
  // library reports an asynchronous error (ncclCommGetAsyncError: a peer failed, a link broke), which ends
  // the job at once; `abort` cancels the channel's in-flight device work (ncclCommAbort, so kernels waiting
  // for a lost peer return) just before the job ends. Each may be empty. They are called from the watchdog's
  // thread.
  struct Hooks {
    std::function<std::string()> lastError;
    std::function<std::string()> asyncError;
    std::function<void()> abort;
  };
  uint64_t addChannel(std::string name, Hooks hooks = {});
  void removeChannel(uint64_t channel);

  // One blocking operation in flight on a channel, for its lifetime (the MPI backend wraps every call in
  // one; on a GPU the denoise loop wraps each step, since NCCL collectives return at once and a stalled
  // peer shows as a step that never ends). Does nothing without a watchdog, a channel or a timeout.
  class Operation {
   public:
    Operation(Watchdog* watchdog, uint64_t channel, const char* what);
    ~Operation();
    Operation(const Operation&) = delete;
    Operation& operator=(const Operation&) = delete;

   private:
    Watchdog* watchdog_ = nullptr;
    uint64_t record_ = 0;
  };

  // Operations recorded so far on a channel (its sequence number), and the channels' names in the order
  // they were added.
  uint64_t sequence(uint64_t channel) const;
  std::vector<std::string> channelNames() const;

 private:
  struct InFlight {
    uint64_t channel = 0;
    uint64_t sequence = 0;
    const char* what = "";
    std::string context;
    int64_t startedNs = 0;
  };
  struct Channel {
    std::string name;
    Hooks hooks;
    uint64_t sequence = 0;
  };
  uint64_t begin(uint64_t channel, const char* what);
  void end(uint64_t record);
  void run();
  void check();
  [[noreturn]] void endJob(const std::string& line);

  std::atomic<double> timeout_{0.0};
  mutable std::mutex mutex_;  // everything below
  std::condition_variable wake_;
  std::thread thread_;
  bool stop_ = false;
  std::string context_ = "starting";
  std::map<uint64_t, Channel> channels_;
  std::map<uint64_t, InFlight> inFlight_;  // by record id, oldest first
  uint64_t nextChannel_ = 1, nextRecord_ = 1;
};

}  // namespace pardit::dist
