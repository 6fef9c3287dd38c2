#include "pardit/memory/streamer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <optional>

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
uint64_t aligned(uint64_t n) { return (n + kGroupAlignment - 1) / kGroupAlignment * kGroupAlignment; }
// Reads from the file are cut into pieces of this size, shared out among the read threads.
constexpr uint64_t kReadPiece = 8ULL << 20;
}  // namespace

// Recycled CPU group buffers, each as large as the largest streamed group: a fresh multi-megabyte
// allocation per group and step would fault every page in again. At most `keep` are kept.
class StreamingFluxWeights::BufferPool {
 public:
  BufferPool(uint64_t capacity, size_t keep) : capacity_(capacity), keep_(keep) {}
  at::Tensor acquire() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        at::Tensor t = free_.back();
        free_.pop_back();
        return t;
      }
    }
    allocated_.fetch_add(capacity_);
    return at::empty({static_cast<int64_t>(capacity_)}, at::TensorOptions().dtype(at::kByte));
  }
  // Back to the pool when nothing else holds the buffer's memory (no view of it survives).
  void release(at::Tensor t) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (t.storage().use_count() == 1 && free_.size() < keep_) {
      free_.push_back(std::move(t));
      return;
    }
    allocated_.fetch_sub(capacity_);
  }
  uint64_t allocated() const { return allocated_.load(); }
  ~BufferPool() = default;

 private:
  uint64_t capacity_;
  size_t keep_;
  std::mutex mutex_;
  std::vector<at::Tensor> free_;
  std::atomic<uint64_t> allocated_{0};
};

// Two pinned buffers the file is read into while the previous one's copy to the device runs.
struct StreamingFluxWeights::Staging {
  at::Tensor buffer[2];
#if defined(PARDIT_WITH_CUDA)
  at::cuda::CUDAEvent copied[2];
#endif
  uint64_t bytes = 0;
};

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
      options_(std::move(options)),
      accountant_(std::make_shared<WeightAccountant>()) {
  std::vector<std::string> held;
  for (const auto& g : plan.groups) {
    streamed_[g.name] = g.streamed;
    held.push_back(g.name);
    if (g.streamed) streamOrder_.push_back(g.name);
  }
  readThreads_ = options_.readThreads > 0
                     ? options_.readThreads
                     : static_cast<int>(std::clamp<unsigned>(std::thread::hardware_concurrency(), 1u, 4u));
  options_.prefetchDepth = std::max(1, options_.prefetchDepth);
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
  if (resident("final_layer"))
    final_ = std::make_shared<model::FinalLayerWeights>(model::makeFinalLayerWeights(config_, devGet));
  // The streamed groups' layouts: tensors at aligned offsets, with their file ranges when stored as used.
  uint64_t largest = 0;
  for (const auto& g : model::fluxWeightGroups(config_, options_.format)) {
    if (!streamed_.count(g.name) || !streamed_.at(g.name)) continue;
    GroupLayout& l = layouts_[g.name];
    for (const auto& spec : g.tensors) {
      PackedTensor t;
      t.name = spec.name;
      t.dtype = spec.storage == model::TensorStorage::kFp8       ? at::kFloat8_e4m3fn
                : spec.storage == model::TensorStorage::kFloat32 ? at::kFloat
                                                                 : options_.dtype;
      t.shape = spec.shape;
      t.offset = l.bytes;
      t.bytes = model::storedBytes({spec}, options_.dtype);
      if (options_.stored) t.ranges = options_.stored(t.name, t.dtype);
      uint64_t covered = 0;
      for (const auto& r : t.ranges) covered += r.bytes;
      PARDIT_CHECK(t.ranges.empty() || covered == t.bytes, "tensor '", t.name, "': its file ranges hold ", covered,
                   " bytes, expected ", t.bytes);
      if (!t.ranges.empty()) l.storedBytes += t.bytes;
      l.bytes = aligned(l.bytes + t.bytes);
      l.tensors.push_back(std::move(t));
    }
    largest = std::max(largest, l.bytes);
  }
  if (device_.is_cpu()) pool_ = std::make_shared<BufferPool>(largest, static_cast<size_t>(options_.prefetchDepth) + 1);
  // Host copies of the streamed groups (this rank's shard only), read straight into their buffers (pinned
  // for asynchronous copies on CUDA).
  if (options_.hostCache) {
    for (const auto& g : streamOrder_) {
      const GroupLayout& l = layouts_.at(g);
      at::Tensor host = at::empty({static_cast<int64_t>(l.bytes)},
                                  at::TensorOptions().dtype(at::kByte).pinned_memory(device_.is_cuda()));
      readStored(l, 0, l.bytes, host.data_ptr<uint8_t>());
      readThroughGetter(l, host);
      hostCache_[g] = host;
    }
  } else if (device_.is_cuda() && !streamOrder_.empty()) {
    staging_ = std::make_unique<Staging>();
    staging_->bytes = std::min(options_.stagingBytes, largest);
    for (auto& b : staging_->buffer)
      b = at::empty({static_cast<int64_t>(staging_->bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  if (!streamOrder_.empty()) worker_ = std::thread([this] { worker(); });
}

StreamingFluxWeights::~StreamingFluxWeights() {
  stopping_.store(true);
  for (auto& [g, f] : ahead_) {
    try {
      Fetched unused = f.get();
      drop(unused);
    } catch (...) {  // the destructor never throws
    }
  }
  {
    std::lock_guard<std::mutex> lock(queueMutex_);
    quit_ = true;
  }
  queueCv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

uint64_t StreamingFluxWeights::hostBytes() const {
  uint64_t n = pool_ ? pool_->allocated() : 0;
  for (const auto& [g, t] : hostCache_) n += t.nbytes();
  if (staging_) n += 2 * staging_->bytes;
  return n;
}

void StreamingFluxWeights::worker() {
#if defined(PARDIT_WITH_CUDA)
  std::optional<c10::cuda::CUDAGuard> device;
  if (device_.is_cuda()) device.emplace(device_.index());
#endif
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(queueMutex_);
      queueCv_.wait(lock, [&] { return quit_ || !queue_.empty(); });
      if (queue_.empty()) return;  // quit_, nothing left
      job = queue_.front();
      queue_.pop_front();
    }
    try {
      job->promise.set_value(fetch(job->group));
    } catch (...) {
      job->promise.set_exception(std::current_exception());
    }
  }
}

void StreamingFluxWeights::request(const std::string& group) {
  auto job = std::make_shared<Job>();
  job->group = group;
  ahead_.emplace_back(group, job->promise.get_future());
  {
    std::lock_guard<std::mutex> lock(queueMutex_);
    queue_.push_back(std::move(job));
  }
  queueCv_.notify_one();
}

void StreamingFluxWeights::readStored(const GroupLayout& l, uint64_t lo, uint64_t hi, uint8_t* at) {
  struct Piece {
    const io::StoredRange* range;
    uint64_t offset, bytes;  // within the range's tensor
    uint8_t* dst;
  };
  std::vector<Piece> pieces;
  for (const auto& t : l.tensors) {
    uint64_t pos = t.offset;  // buffer offset of the current range's first byte
    for (const auto& r : t.ranges) {
      const uint64_t b = std::max(pos, lo), e = std::min(pos + r.bytes, hi);
      for (uint64_t x = b; x < e; x += kReadPiece) {
        const uint64_t n = std::min(kReadPiece, e - x);
        pieces.push_back({&r, r.offset + (x - pos), n, at + (x - lo)});
      }
      pos += r.bytes;
    }
  }
  if (pieces.empty()) return;
  const Timer timer;
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0};
  std::exception_ptr failure;
  std::mutex failureMutex;
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
      if (stopping_.load()) return;
      try {
        const Piece& p = pieces[i];
        p.range->file->readBytes(*p.range->tensor, p.offset, p.bytes, p.dst);
        done.fetch_add(p.bytes);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failureMutex);
        if (!failure) failure = std::current_exception();
        next.store(pieces.size());
      }
    }
  };
  const size_t helpers = std::min<size_t>(static_cast<size_t>(readThreads_), pieces.size()) - 1;
  std::vector<std::thread> threads;
  threads.reserve(helpers);
  for (size_t k = 0; k < helpers; ++k) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  storedRead_.fetch_add(done.load());
  readNanos_.fetch_add(static_cast<uint64_t>(timer.seconds() * 1e9));
  if (failure) std::rethrow_exception(failure);
}

void StreamingFluxWeights::readThroughGetter(const GroupLayout& l, const at::Tensor& buffer) {
  for (const auto& t : l.tensors) {
    if (!t.ranges.empty()) continue;
    if (stopping_.load()) return;
    at::Tensor v = read_(t.name).contiguous();
    PARDIT_CHECK(v.scalar_type() == t.dtype && v.sizes().vec() == t.shape, "tensor '", t.name, "' was read as ",
                 v.scalar_type(), " ", v.sizes(), ", expected ", t.dtype, " ", at::IntArrayRef(t.shape));
    buffer.narrow(0, static_cast<int64_t>(t.offset), static_cast<int64_t>(t.bytes)).copy_(v.view({-1}).view(at::kByte));
    getterRead_.fetch_add(t.bytes);
  }
}

StreamingFluxWeights::Tensors StreamingFluxWeights::viewsOf(const GroupLayout& l, const at::Tensor& buffer) const {
  Tensors out;
  for (const auto& t : l.tensors) {
    at::Tensor bytes = buffer.narrow(0, static_cast<int64_t>(t.offset), static_cast<int64_t>(t.bytes));
    out[t.name] =
        t.shape.empty() ? bytes.view(t.dtype).view(std::vector<int64_t>{}) : bytes.view(t.dtype).view(t.shape);
  }
  return out;
}

StreamingFluxWeights::Fetched StreamingFluxWeights::fetch(const std::string& group) {
  const GroupLayout& l = layouts_.at(group);
  Fetched f;
  f.bytes = l.bytes;
  if (device_.is_cpu()) {
    f.buffer = pool_->acquire();
    accountant_->add(f.bytes);  // counted from the moment it is held
    uint8_t* base = f.buffer.data_ptr<uint8_t>();
    if (options_.hostCache) {
      std::memcpy(base, hostCache_.at(group).data_ptr<uint8_t>(), l.bytes);
    } else {
      readStored(l, 0, l.bytes, base);
      readThroughGetter(l, f.buffer);
    }
    f.tensors = std::make_shared<Tensors>(viewsOf(l, f.buffer));
    return f;
  }
#if defined(PARDIT_WITH_CUDA)
  c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool(false, device_.index()));
  const auto copyStream = c10::cuda::getCurrentCUDAStream(device_.index());
  f.buffer = at::empty({static_cast<int64_t>(l.bytes)}, at::TensorOptions().dtype(at::kByte).device(device_));
  accountant_->add(f.bytes);
  if (options_.hostCache) {
    f.buffer.copy_(hostCache_.at(group), /*non_blocking=*/true);  // one copy from pinned memory
  } else {
    // The file in chunks through the two staging buffers: chunk k+1 is read while chunk k copies.
    Staging& s = *staging_;
    int slot = 0;
    for (uint64_t lo = 0; lo < l.bytes && !stopping_.load(); lo += s.bytes, slot ^= 1) {
      const uint64_t n = std::min(s.bytes, l.bytes - lo);
      s.copied[slot].synchronize();  // its previous copy is done (returns at once if never recorded)
      bool any = false;
      for (const auto& t : l.tensors) any |= !t.ranges.empty() && t.offset < lo + n && lo < t.offset + t.bytes;
      if (!any) continue;
      readStored(l, lo, lo + n, s.buffer[slot].data_ptr<uint8_t>());
      f.buffer.narrow(0, static_cast<int64_t>(lo), static_cast<int64_t>(n))
          .copy_(s.buffer[slot].narrow(0, 0, static_cast<int64_t>(n)), /*non_blocking=*/true);
      s.copied[slot].record(copyStream);
    }
    readThroughGetter(l, f.buffer);  // tensors converted while reading (few and small: scales, other dtypes)
  }
  f.tensors = std::make_shared<Tensors>(viewsOf(l, f.buffer));
  // The compute stream must not read the weights before the copies finished: it waits on this event
  // (the host does not).
  auto done = std::make_shared<at::cuda::CUDAEvent>();
  done->record(copyStream);
  const auto index = device_.index();
  f.orderBeforeUse = [done, index]() -> std::function<double()> {
    // Timed events just before and after the wait: their distance is how long the compute stream stood.
    const auto compute = c10::cuda::getCurrentCUDAStream(index);
    auto before = std::make_shared<at::cuda::CUDAEvent>(cudaEventDefault);
    auto after = std::make_shared<at::cuda::CUDAEvent>(cudaEventDefault);
    before->record(compute);
    done->block(compute);
    after->record(compute);
    return [before, after] {
      after->synchronize();
      return static_cast<double>(before->elapsed_time(*after)) * 1e-3;
    };
  };
  return f;
#else
  PARDIT_THROW("streaming to ", device_.str(), ": this build has no CUDA");
#endif
}

void StreamingFluxWeights::drop(Fetched& f) {
  if (!f.buffer.defined()) return;
  f.tensors.reset();
  accountant_->remove(f.bytes);
  if (pool_) pool_->release(std::move(f.buffer));
  f.buffer = at::Tensor();
}

StreamingFluxWeights::Fetched StreamingFluxWeights::take(const std::string& group) {
  stopping_.store(false);  // a new run (endOfRun() left nothing pending)
  if (!ahead_.empty() && ahead_.front().first != group) {
    for (auto& [g, stale] : ahead_) {  // prefetched out of order: dropped
      Fetched unused = stale.get();
      drop(unused);
    }
    ahead_.clear();
  }
  if (ahead_.empty()) request(group);
  Timer t;
  Fetched f = ahead_.front().second.get();
  ahead_.pop_front();
  waitSeconds_ += t.seconds();
  // The next streamed groups in execution order (wrapping around to the first for the next step).
  if (streamOrder_.size() > 1) {
    const auto at = std::find(streamOrder_.begin(), streamOrder_.end(), group) - streamOrder_.begin();
    const size_t depth = std::min<size_t>(static_cast<size_t>(options_.prefetchDepth), streamOrder_.size() - 1);
    for (size_t k = ahead_.size() + 1; k <= depth; ++k)
      request(streamOrder_[(static_cast<size_t>(at) + k) % streamOrder_.size()]);
  }
  if (f.orderBeforeUse) pendingDeviceWaits_.push_back(f.orderBeforeUse());
#if defined(PARDIT_WITH_CUDA)
  if (device_.is_cuda()) {
    // Allocated on the copy stream, used on the compute stream: keep the allocator from reusing the memory
    // for the next prefetch before the compute stream is done with it.
    const auto compute = c10::cuda::getCurrentCUDAStream(device_.index());
    c10::cuda::CUDACachingAllocator::recordStream(f.buffer.storage().data_ptr(), compute);
  }
#endif
  ++fetched_;
  return f;
}

void StreamingFluxWeights::endOfRun() {
  stopping_.store(true);
  for (auto& [g, pending] : ahead_) {
    Fetched unused = pending.get();
    drop(unused);
  }
  ahead_.clear();
  (void)deviceWaitSeconds();  // the run's events read now: none accumulate across runs
}

double StreamingFluxWeights::deviceWaitSeconds() {
  const auto pending = std::move(pendingDeviceWaits_);
  pendingDeviceWaits_.clear();
  for (const auto& read : pending) deviceWaitSeconds_ += read();
  return deviceWaitSeconds_;
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
  auto pool = pool_;
  const uint64_t bytes = f.bytes;
  W* w = new W(make(getterFor(f)));
  f.tensors.reset();
  // The streamed group's device memory is released (and uncounted) when its last user lets go; on the
  // CPU its buffer goes back to the pool.
  return std::shared_ptr<const W>(w, [acc, pool, bytes, buffer = std::move(f.buffer)](const W* p) mutable {
    delete p;
    acc->remove(bytes);
    if (pool) pool->release(std::move(buffer));
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
