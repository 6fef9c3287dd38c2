#pragma once
// Communicators: the collectives DiT parallelism needs, over a group of ranks.
//
// Backends
//   * MPI (CPU tensors): every call is complete when it returns, except isend/irecv, which are
//     complete after Work::wait().
//   * In-process (dist/in_process.h): ranks are threads of one process; CPU or CUDA tensors; every call
//     is complete when it returns (sends are buffered), so tests exercise the parallel code without MPI.
//   * NCCL (CUDA tensors): collectives are enqueued on the current CUDA stream of the tensors' device
//     and the call returns after enqueueing, so results are ordered with the kernels around them.
//     isend/irecv run on the communicator's own stream, which first waits for the current stream;
//     Work::wait() makes the current stream wait for the transfer (it does not block the host).
// Tensors must be contiguous. Every call adds to per-kind counters (calls, bytes sent to other ranks,
// seconds spent in the call; for NCCL the host time unless timing is synchronous).
// No MPI or NCCL header is needed to use this interface.

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pardit/dist/watchdog.h"

namespace pardit::dist {

enum class CollectiveKind { kAllToAll = 0, kAllGather, kBroadcast, kAllReduce, kSendRecv, kBarrier, kCount };
const char* collectiveName(CollectiveKind kind);

struct CollectiveStats {
  uint64_t calls = 0;
  uint64_t bytes = 0;  // bytes this rank sent to other ranks
  double seconds = 0.0;
};

enum class ReduceOp { kSum, kMax, kMin };

// A pending point-to-point transfer.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  Communicator() = default;
  virtual ~Communicator() { unwatch(); }
  // A communicator owns a group handle (an MPI communicator, an NCCL comm): never copied.
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // in: dim 0 has size() equal chunks; chunk j goes to rank j. out (same shape): chunk i came from rank i.
  virtual void allToAll(const at::Tensor& in, at::Tensor& out) = 0;
  // out: [size(), in.shape...]; out[i] is rank i's in.
  virtual void allGather(const at::Tensor& in, at::Tensor& out) = 0;
  virtual void broadcast(at::Tensor& tensor, int root) = 0;
  virtual void allReduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum) = 0;
  virtual void send(const at::Tensor& tensor, int peer) = 0;
  virtual void recv(at::Tensor& tensor, int peer) = 0;
  // Point-to-point without pairing: on NCCL each runs on the GPU after the previous one and blocks the
  // stream until its peer's matching call runs, so two ranks that both receive (or both send large
  // messages) first deadlock. Exchanges between two ranks go through sendRecv.
  virtual std::unique_ptr<Work> isend(const at::Tensor& tensor, int peer) = 0;
  virtual std::unique_ptr<Work> irecv(at::Tensor& tensor, int peer) = 0;
  // Sends `out` to `to` while receiving `in` from `from`, as one operation (a ring shift never
  // deadlocks, whatever the group size).
  virtual std::unique_ptr<Work> sendRecv(const at::Tensor& out, int to, at::Tensor& in, int from) = 0;
  virtual void barrier() = 0;
  // A new communicator per distinct `color` over the ranks that passed it, ordered by (key, rank).
  // Collective over this communicator (MPI_Comm_split semantics).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Makes this communicator a channel of `watchdog` named `name` ("world", "ulysses group", ...); the
  // runtime that made it calls this. Blocking calls are then recorded while in flight (watched()).
  void watchWith(std::shared_ptr<Watchdog> watchdog, const std::string& name) {
    unwatch();
    if (!watchdog) return;
    watchChannel_ = watchdog->addChannel(name, watchHooks());
    watchdog_ = std::move(watchdog);
  }
  // The watchdog's record of one blocking call of a backend, for its lifetime (nothing without a watchdog
  // or a timeout).
  Watchdog::Operation watched(const char* what) { return Watchdog::Operation(watchdog_.get(), watchChannel_, what); }
  const CollectiveStats& stats(CollectiveKind kind) const { return stats_[static_cast<size_t>(kind)]; }
  void resetStats() { stats_ = {}; }
  // Adds to the counters; backends call it for every operation (calls == 0 adds time only, e.g. a wait).
  void record(CollectiveKind kind, uint64_t bytes, double seconds, uint64_t calls = 1) {
    auto& s = stats_[static_cast<size_t>(kind)];
    s.calls += calls;
    s.bytes += bytes;
    s.seconds += seconds;
  }

 protected:
  // What the watchdog may ask of this backend (NCCL: its errors and ncclCommAbort).
  virtual Watchdog::Hooks watchHooks() { return {}; }
  // Removes the channel; a backend with hooks calls it first in its destructor (before its handle goes).
  void unwatch() {
    if (watchdog_ && watchChannel_ != 0) watchdog_->removeChannel(watchChannel_);
    watchChannel_ = 0;
  }

 private:
  std::shared_ptr<Watchdog> watchdog_;
  uint64_t watchChannel_ = 0;
  std::array<CollectiveStats, static_cast<size_t>(CollectiveKind::kCount)> stats_{};
};

// Helpers that allocate the outputs.
at::Tensor allToAll(Communicator& comm, const at::Tensor& in);
at::Tensor allGather(Communicator& comm, const at::Tensor& in);  // [size, in.shape...]

}  // namespace pardit::dist
