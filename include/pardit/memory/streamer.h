#pragma once
// Weights under a memory plan: resident groups are loaded once; streamed groups are brought to the
// device just before use while earlier groups compute. A prefetch thread fetches the next
// `prefetchDepth` streamed groups in execution order, one at a time. Each streamed group lives in one
// buffer, its tensors packed at kGroupAlignment-byte offsets (views of it), so a group moves as one copy
// and its memory is one allocation.
//
// The source of a streamed group is a host copy of the rank's own shard when host memory allows (pinned
// on CUDA, read straight into its buffers: no second copy), else the checkpoint file. From the file, the
// tensors stored as they are used are read as bytes, with large pread()s by several threads: on the CPU
// straight into the group's buffer (recycled, so no page faults per step), on CUDA through two pinned
// staging buffers whose host-to-device copies run on a side stream while the next chunk is read. Tensors
// that must be converted (another stored dtype, quantized while loading) go through the getter. The
// compute stream waits on the copies' event; the host never blocks on a copy.
//
// Accounting: every device-side weight byte is counted while it is allocated (resident groups, the group
// in use, the ones being prefetched), and the peak is kept.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pardit/io/checkpoint.h"
#include "pardit/memory/planner.h"
#include "pardit/model/flux.h"

namespace pardit::memory {

class WeightAccountant {
 public:
  void add(uint64_t bytes);
  void remove(uint64_t bytes);
  uint64_t current() const { return current_.load(); }
  uint64_t peak() const { return peak_.load(); }

 private:
  std::atomic<uint64_t> current_{0}, peak_{0};
};

// The file ranges of a tensor stored exactly as it is used (name, dtype), or none: read through the getter.
using StoredSource = std::function<std::vector<io::StoredRange>(const std::string& name, c10::ScalarType dtype)>;

struct StreamingOptions {
  bool hostCache = true;  // keep streamed groups in host memory (pinned on CUDA) instead of re-reading the file
  model::WeightFormat format = model::WeightFormat::kDense;  // FP8: the groups carry their scale tensors too
  c10::ScalarType dtype = c10::kFloat;    // the compute dtype: what the getter returns for kCompute tensors
  StoredSource stored;                    // null: every tensor through the getter
  int readThreads = 0;                    // parallel reads per group from the file; 0: min(4, hardware threads)
  int prefetchDepth = 1;                  // streamed groups fetched ahead of the one in use (the plan's)
  uint64_t stagingBytes = kStagingBytes;  // CUDA, file source: each of the two pinned staging buffers
};

// A streamed group's buffer layout: its tensors at kGroupAlignment-aligned offsets.
struct PackedTensor {
  std::string name;
  c10::ScalarType dtype = c10::kFloat;
  std::vector<int64_t> shape;
  uint64_t offset = 0, bytes = 0;
  std::vector<io::StoredRange> ranges;  // the bytes in the file, in order; empty: through the getter
};
struct GroupLayout {
  std::vector<PackedTensor> tensors;
  uint64_t bytes = 0;        // the buffer
  uint64_t storedBytes = 0;  // of it, read from the file as stored
};

class StreamingFluxWeights final : public model::FluxWeightProvider {
 public:
  // `read` returns a tensor by internal name on the CPU in the compute dtype (e.g. the checkpoint's getter).
  StreamingFluxWeights(const model::FluxConfig& config, model::WeightGetter read, const RankPlan& plan,
                       const c10::Device& device, StreamingOptions options = {});
  ~StreamingFluxWeights() override;

  std::shared_ptr<const model::EmbedderWeights> embedders() override;
  std::shared_ptr<const model::DoubleBlockWeights> doubleBlock(int64_t index) override;
  std::shared_ptr<const model::SingleBlockWeights> singleBlock(int64_t index) override;
  std::shared_ptr<const model::FinalLayerWeights> finalLayer() override;
  // Stops the read-ahead (the wrap-around prefetch of the first streamed group for a next step that will
  // not come): the pending fetch stops between tensors, and its memory is released.
  void endOfRun() override;

  const WeightAccountant& accountant() const { return *accountant_; }
  uint64_t streamedGroupsFetched() const { return fetched_; }
  double waitSeconds() const { return waitSeconds_; }  // compute blocked on a group not yet arrived
  // CUDA: how long the compute stream stood still waiting for streamed weights to arrive, timed on the
  // device by events around each of its waits (so 0 means every copy hid behind compute); waits for the
  // events still pending. 0 on the CPU, where waitSeconds() is the whole story.
  double deviceWaitSeconds();
  // Host memory held for streaming: the host copies (host source), or the staging or recycled buffers.
  uint64_t hostBytes() const;
  // Bytes of the file read as stored (pread) and through the getter, by fetches since construction.
  uint64_t storedBytesRead() const { return storedRead_.load(); }
  uint64_t getterBytesRead() const { return getterRead_.load(); }
  // Seconds spent reading stored bytes (wall time of the parallel reads), and the threads that read.
  double storedReadSeconds() const { return static_cast<double>(readNanos_.load()) * 1e-9; }
  int readThreads() const { return readThreads_; }
  bool fromHost() const { return options_.hostCache; }
  const GroupLayout& layout(const std::string& group) const { return layouts_.at(group); }

 private:
  using Tensors = std::map<std::string, at::Tensor>;
  struct Fetched {
    std::shared_ptr<Tensors> tensors;
    at::Tensor buffer;  // the group's buffer (the CPU: a recycled one, maybe larger)
    uint64_t bytes = 0;
    // CUDA: makes the compute stream wait for the copies; returns how to read the wait's length on the device.
    std::function<std::function<double()>()> orderBeforeUse;
  };
  struct Job {
    std::string group;
    std::promise<Fetched> promise;
  };
  class BufferPool;
  struct Staging;
  Fetched fetch(const std::string& group);  // runs on the prefetch thread
  Fetched take(const std::string& group);   // the prefetched group (asked for now if it is not)
  void request(const std::string& group);   // queue a fetch for the prefetch thread
  void drop(Fetched& f);                    // a fetched group that will not be used
  void worker();
  // The stored tensors' bytes in [lo, hi) of a group's buffer into `at` (the address of byte lo), by
  // several threads; the tensors converted while reading (through the getter) into the group's `buffer`
  // (host or device bytes).
  void readStored(const GroupLayout& l, uint64_t lo, uint64_t hi, uint8_t* at);
  void readThroughGetter(const GroupLayout& l, const at::Tensor& buffer);
  Tensors viewsOf(const GroupLayout& l, const at::Tensor& buffer) const;
  model::WeightGetter getterFor(const Fetched& f) const;
  // A block: resident, or streamed in now (and prefetching the next streamed group).
  template <typename W, typename Make>
  std::shared_ptr<const W> held(const std::map<int64_t, std::shared_ptr<const W>>& resident, int64_t index,
                                const std::string& group, const Make& make);
  std::vector<std::string> tensorNames(const std::string& group) const;

  model::FluxConfig config_;
  model::WeightGetter read_;
  c10::Device device_;
  StreamingOptions options_;
  std::shared_ptr<WeightAccountant> accountant_;
  std::map<std::string, bool> streamed_;
  std::vector<std::string> streamOrder_;         // streamed groups in execution order
  std::map<std::string, GroupLayout> layouts_;   // of every streamed group
  std::map<std::string, at::Tensor> hostCache_;  // host copies of streamed groups (their buffers)
  std::shared_ptr<BufferPool> pool_;             // the CPU: recycled group buffers
  std::unique_ptr<Staging> staging_;             // CUDA, file source: pinned staging buffers
  std::shared_ptr<const model::EmbedderWeights> emb_;
  std::map<int64_t, std::shared_ptr<const model::DoubleBlockWeights>> double_;
  std::map<int64_t, std::shared_ptr<const model::SingleBlockWeights>> single_;
  std::shared_ptr<const model::FinalLayerWeights> final_;
  int readThreads_ = 1;
  std::deque<std::pair<std::string, std::future<Fetched>>> ahead_;  // requested, in order (main thread)
  std::mutex queueMutex_;
  std::condition_variable queueCv_;
  std::deque<std::shared_ptr<Job>> queue_;  // for the prefetch thread
  bool quit_ = false;
  std::thread worker_;
  std::atomic<bool> stopping_{false};  // set by endOfRun(): fetches in flight stop between chunks
  std::atomic<uint64_t> storedRead_{0}, getterRead_{0}, readNanos_{0};
  uint64_t fetched_ = 0;
  double waitSeconds_ = 0.0;
  std::vector<std::function<double()>> pendingDeviceWaits_;  // read by deviceWaitSeconds()
  double deviceWaitSeconds_ = 0.0;
};

}  // namespace pardit::memory
