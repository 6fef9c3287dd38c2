#pragma once
// Weights under a memory plan: resident groups are loaded once; streamed groups are brought to the
// device just before use while the previous group computes (a background thread reads or copies the next
// streamed group in execution order; on CUDA the copy runs on a side stream and the compute stream waits
// on its event, so the host never blocks on a copy). The source of a streamed group is a host copy of the rank's own shard when host memory
// allows (pinned on CUDA), else the checkpoint file itself. Neither host nor device holds the full model.
//
// Accounting: every device-side weight byte is counted while it is allocated (resident groups, the group
// in use, the one being prefetched), and the peak is kept.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <atomic>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

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

struct StreamingOptions {
  bool hostCache = true;  // keep streamed groups in host memory (pinned on CUDA) instead of re-reading the file
  model::WeightFormat format = model::WeightFormat::kDense;  // FP8: the groups carry their scale tensors too
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

 private:
  using Tensors = std::map<std::string, at::Tensor>;
  struct Fetched {
    std::shared_ptr<Tensors> tensors;
    uint64_t bytes = 0;
    std::function<void()> orderBeforeUse;  // CUDA: makes the compute stream wait for the copies
  };
  Fetched fetch(const std::string& group);            // runs on the prefetch thread or inline
  Fetched take(const std::string& group);             // the prefetched group, or a synchronous fetch
  void prefetchAfter(const std::string& group);
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
  std::vector<std::string> streamOrder_;              // streamed groups in execution order
  std::map<std::string, Tensors> hostCache_;          // host copies of streamed groups
  std::shared_ptr<const model::EmbedderWeights> emb_;
  std::map<int64_t, std::shared_ptr<const model::DoubleBlockWeights>> double_;
  std::map<int64_t, std::shared_ptr<const model::SingleBlockWeights>> single_;
  std::shared_ptr<const model::FinalLayerWeights> final_;
  std::string pendingGroup_;
  std::future<Fetched> pending_;
  std::atomic<bool> stopping_{false};  // set by endOfRun(): fetches in flight stop between tensors
  uint64_t fetched_ = 0;
  double waitSeconds_ = 0.0;
};

}  // namespace pardit::memory
