#include "pardit/memory/streamer.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"

#if defined(PARDIT_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pardit::memory {

void WeightAccountant::add(uint64_t bytes) {
  const uint64_t now = current_.fetch_add(bytes) + bytes;
  uint64_t peak = peak_.load();
  while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
  }
}

void WeightAccountant::remove(uint64_t bytes) { current_.fetch_sub(bytes); }

namespace {
uint64_t bytesOf(const std::map<std::string, at::Tensor>& tensors) {
  uint64_t n = 0;
  for (const auto& [k, t] : tensors) n += t.nbytes();
  return n;
}
}  // namespace

std::vector<std::string> StreamingFluxWeights::tensorNames(const std::string& group) const {
  for (const auto& g : model::fluxWeightGroups(config_, options_.format))
    if (g.name == group) {
      std::vector<std::string> names;
      for (const auto& t : g.tensors) names.push_back(t.name);
      return names;
    }
  PARDIT_THROW("unknown weight group '", group, "'");
}

StreamingFluxWeights::StreamingFluxWeights(const model::FluxConfig& config, model::WeightGetter read,
                                           const RankPlan& plan, const c10::Device& device, StreamingOptions options)
    : config_(config),
      read_(std::move(read)),
      device_(device),
      options_(options),
      accountant_(std::make_shared<WeightAccountant>()) {
  std::vector<std::string> held;
  for (const auto& g : plan.groups) {
    streamed_[g.name] = g.streamed;
    held.push_back(g.name);
    if (g.streamed) streamOrder_.push_back(g.name);
  }
  // Resident groups: loaded now and kept.
  auto resident = [&](const std::string& n) { return streamed_.count(n) && !streamed_.at(n); };
  auto devGet = [&](const std::string& name) {
    at::Tensor t = read_(name).to(device_);
    accountant_->add(t.nbytes());
    return t;
  };
  const bool withInput = resident("input_embedders");
  PARDIT_CHECK(resident("conditioning"), "the conditioning embedders must be resident");
  emb_ = std::make_shared<model::EmbedderWeights>(model::makeEmbedderWeights(config_, devGet, withInput));
  for (int64_t i = 0; i < config_.depth; ++i)
    if (resident("double_blocks." + std::to_string(i)))
      double_[i] = std::make_shared<model::DoubleBlockWeights>(model::makeDoubleBlockWeights(config_, i, devGet));
  for (int64_t i = 0; i < config_.depthSingle; ++i)
    if (resident("single_blocks." + std::to_string(i)))
      single_[i] = std::make_shared<model::SingleBlockWeights>(model::makeSingleBlockWeights(config_, i, devGet));
  if (resident("final_layer")) final_ = std::make_shared<model::FinalLayerWeights>(model::makeFinalLayerWeights(config_, devGet));
  // Host copies of the streamed groups (this rank's shard only), pinned for asynchronous copies on CUDA.
  if (options_.hostCache) {
    for (const auto& g : streamOrder_) {
      Tensors& host = hostCache_[g];
      for (const auto& n : tensorNames(g)) {
        at::Tensor t = read_(n);
        if (device_.is_cuda()) t = t.pin_memory();
        host[n] = t;
      }
    }
  }
}

StreamingFluxWeights::~StreamingFluxWeights() {
  if (pending_.valid()) {
    try {
      pending_.get();
    } catch (...) {  // the destructor never throws
    }
  }
}

StreamingFluxWeights::Fetched StreamingFluxWeights::fetch(const std::string& group) {
  auto tensors = std::make_shared<Tensors>();
#if defined(PARDIT_WITH_CUDA)
  std::optional<c10::cuda::CUDAStreamGuard> guard;
  if (device_.is_cuda()) guard.emplace(c10::cuda::getStreamFromPool(false, device_.index()));
#endif
  for (const auto& n : tensorNames(group)) {
    if (stopping_.load()) break;  // the run ended: this read-ahead is not needed
    at::Tensor src;
    if (options_.hostCache) {
      src = hostCache_.at(group).at(n);
    } else {
      src = read_(n);
    }
    at::Tensor dst = device_.is_cpu() ? (options_.hostCache ? src.clone() : src) : src.to(device_, /*non_blocking=*/true);
    (*tensors)[n] = dst;
    accountant_->add(dst.nbytes());  // counted from the moment it is allocated
  }
  Fetched f{tensors, bytesOf(*tensors), {}};
#if defined(PARDIT_WITH_CUDA)
  if (device_.is_cuda()) {
    // The compute stream must not read the weights before the copies finished: it waits on this event
    // (the host does not).
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(c10::cuda::getCurrentCUDAStream(device_.index()));
    const auto index = device_.index();
    f.orderBeforeUse = [done, index] { done->block(c10::cuda::getCurrentCUDAStream(index)); };
  }
#endif
  return f;
}

StreamingFluxWeights::Fetched StreamingFluxWeights::take(const std::string& group) {
  stopping_.store(false);  // a new run (endOfRun() left nothing pending)
  Fetched f;
  if (pending_.valid() && pendingGroup_ == group) {
    Timer t;
    f = pending_.get();
    waitSeconds_ += t.seconds();
  } else {
    if (pending_.valid()) {
      Fetched stale = pending_.get();  // prefetched out of order: drop it
      accountant_->remove(stale.bytes);
    }
    f = fetch(group);
  }
  if (f.orderBeforeUse) f.orderBeforeUse();
#if defined(PARDIT_WITH_CUDA)
  if (device_.is_cuda()) {
    // Allocated on the copy stream, used on the compute stream: keep the allocator from reusing the memory
    // for the next prefetch before the compute stream is done with it.
    const auto compute = c10::cuda::getCurrentCUDAStream(device_.index());
    for (auto& [n, t] : *f.tensors) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), compute);
  }
#endif
  ++fetched_;
  prefetchAfter(group);
  return f;
}

void StreamingFluxWeights::endOfRun() {
  stopping_.store(true);
  if (!pending_.valid()) return;
  Fetched unused = pending_.get();
  accountant_->remove(unused.bytes);
}

void StreamingFluxWeights::prefetchAfter(const std::string& group) {
  if (stopping_.load()) return;
  auto it = std::find(streamOrder_.begin(), streamOrder_.end(), group);
  if (it == streamOrder_.end() || streamOrder_.size() < 2) return;
  const std::string next = (it + 1 == streamOrder_.end()) ? streamOrder_.front() : *(it + 1);
  pendingGroup_ = next;
  pending_ = std::async(std::launch::async, [this, next] { return fetch(next); });
}

model::WeightGetter StreamingFluxWeights::getterFor(const Fetched& f) const {
  return [t = f.tensors](const std::string& name) { return t->at(name); };
}

std::shared_ptr<const model::EmbedderWeights> StreamingFluxWeights::embedders() { return emb_; }

template <typename W, typename Make>
std::shared_ptr<const W> StreamingFluxWeights::held(const std::map<int64_t, std::shared_ptr<const W>>& resident,
                                                    int64_t index, const std::string& group, const Make& make) {
  if (auto it = resident.find(index); it != resident.end()) return it->second;
  PARDIT_CHECK(streamed_.count(group), "weight group ", group, " is not held by this rank");
  Fetched f = take(group);
  auto acc = accountant_;
  const uint64_t bytes = f.bytes;
  // The streamed group's device memory is released (and uncounted) when its last user lets go.
  return std::shared_ptr<const W>(new W(make(getterFor(f))), [acc, bytes](const W* w) {
    delete w;
    acc->remove(bytes);
  });
}

std::shared_ptr<const model::DoubleBlockWeights> StreamingFluxWeights::doubleBlock(int64_t i) {
  return held(double_, i, "double_blocks." + std::to_string(i),
              [&](const model::WeightGetter& get) { return model::makeDoubleBlockWeights(config_, i, get); });
}

std::shared_ptr<const model::SingleBlockWeights> StreamingFluxWeights::singleBlock(int64_t i) {
  return held(single_, i, "single_blocks." + std::to_string(i),
              [&](const model::WeightGetter& get) { return model::makeSingleBlockWeights(config_, i, get); });
}

std::shared_ptr<const model::FinalLayerWeights> StreamingFluxWeights::finalLayer() {
  PARDIT_CHECK(final_ != nullptr, "weight group final_layer is not held by this rank");
  return final_;
}

}  // namespace pardit::memory
