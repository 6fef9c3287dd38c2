#include "pardit/dist/in_process.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"
#include "pardit/dist/runtime.h"

namespace pardit::dist {

namespace {

// Shared by every communicator of one in-process world: set when a rank has failed.
struct World {
  std::atomic<bool> failed{false};
};

// One rank's part of a collective.
struct Slot {
  static Slot of(CollectiveKind kind, at::Tensor in, at::Tensor out = {}) {
    Slot s;
    s.kind = kind;
    s.in = std::move(in);
    s.out = std::move(out);
    return s;
  }
  CollectiveKind kind = CollectiveKind::kBarrier;
  at::Tensor in, out;  // `in` is also the in/out tensor of broadcast and all-reduce
  int root = 0, color = 0, key = 0;
  ReduceOp op = ReduceOp::kSum;
  std::unique_ptr<Communicator> made;  // split's result for this rank
  std::exception_ptr error;
};

class InProcessCommunicator;

// The meeting point of one group's ranks.
class Hub : public std::enable_shared_from_this<Hub> {
 public:
  Hub(int size, std::shared_ptr<World> world) : size_(size), world_(std::move(world)), slots_(size) {}
  int size() const { return size_; }
  const std::shared_ptr<World>& world() const { return world_; }

  // Stores this rank's slot; the last rank to arrive runs `all` over every slot, then every rank
  // leaves with its own slot (which `all` may have filled in).
  Slot rendezvous(int rank, Slot mine, const std::function<void(std::vector<Slot>&)>& all) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    slots_[rank] = std::move(mine);
    if (++arrived_ == size_) {
      try {
        checkSameKind();
        all(slots_);
      } catch (...) {
        for (auto& s : slots_) s.error = std::current_exception();
      }
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      waitUntil(lock, [&] { return generation_ != generation; }, "a collective");
    }
    Slot out = std::move(slots_[rank]);
    slots_[rank] = Slot{};
    if (out.error) std::rethrow_exception(out.error);
    return out;
  }

  void post(int from, int to, at::Tensor message) {
    std::lock_guard<std::mutex> lock(mutex_);
    mail_[{from, to}].push_back(std::move(message));
    cv_.notify_all();
  }

  at::Tensor take(int from, int to) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto& box = mail_[{from, to}];
    waitUntil(lock, [&] { return !box.empty(); }, "a receive");
    at::Tensor m = std::move(box.front());
    box.pop_front();
    return m;
  }

  // Wakes every waiter of this hub (they see the world's failure).
  void wake() {
    std::lock_guard<std::mutex> lock(mutex_);
    cv_.notify_all();
  }

 private:
  template <typename Pred>
  void waitUntil(std::unique_lock<std::mutex>& lock, Pred ready, const char* what) {
    while (!ready()) {
      PARDIT_CHECK(!world_->failed.load(), "in-process job: another rank failed while this rank waited in ", what);
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
  }

  void checkSameKind() const {
    for (const auto& s : slots_)
      PARDIT_CHECK(s.kind == slots_[0].kind, "in-process job: ranks entered different collectives (",
                   collectiveName(slots_[0].kind), " and ", collectiveName(s.kind), ")");
  }

  const int size_;
  std::shared_ptr<World> world_;
  std::mutex mutex_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  int arrived_ = 0;
  std::vector<Slot> slots_;
  std::map<std::pair<int, int>, std::deque<at::Tensor>> mail_;
};

// Every hub of a world, so that a failure can wake them all.
struct HubRegistry {
  std::mutex mutex;
  std::vector<std::weak_ptr<Hub>> hubs;
};

class InProcessWork final : public Work {
 public:
  explicit InProcessWork(std::function<void()> finish = {}) : finish_(std::move(finish)) {}
  void wait() override {
    if (finish_) {
      auto f = std::move(finish_);
      finish_ = nullptr;
      f();
    }
  }

 private:
  std::function<void()> finish_;
};

void checkContiguous(const at::Tensor& t, const char* what) {
  PARDIT_CHECK(t.is_contiguous(), what, ": tensor must be contiguous");
}

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Hub> hub, int rank, std::shared_ptr<HubRegistry> registry)
      : hub_(std::move(hub)), rank_(rank), registry_(std::move(registry)) {}

  int rank() const override { return rank_; }
  int size() const override { return hub_->size(); }
  std::string backend() const override { return "in-process"; }

  void allToAll(const at::Tensor& in, at::Tensor& out) override {
    checkContiguous(in, "all_to_all");
    PARDIT_CHECK(in.dim() >= 1 && in.size(0) == size() && out.sizes() == in.sizes() && out.dtype() == in.dtype(),
                 "all_to_all: dim 0 must equal the group size ", size(), " and out must match in");
    collective(Slot::of(CollectiveKind::kAllToAll, in, out), in.nbytes() / size() * (size() - 1),
               [](std::vector<Slot>& all) {
                 for (size_t r = 0; r < all.size(); ++r)
                   for (size_t i = 0; i < all.size(); ++i)
                     all[r].out.select(0, static_cast<int64_t>(i)).copy_(all[i].in.select(0, static_cast<int64_t>(r)));
               });
  }

  void allGather(const at::Tensor& in, at::Tensor& out) override {
    checkContiguous(in, "all_gather");
    checkContiguous(out, "all_gather");
    PARDIT_CHECK(out.nbytes() == in.nbytes() * static_cast<uint64_t>(size()) && out.dtype() == in.dtype(),
                 "all_gather: output must hold ", size(), " copies of the input");
    collective(Slot::of(CollectiveKind::kAllGather, in, out), in.nbytes() * static_cast<uint64_t>(size() - 1),
               [](std::vector<Slot>& all) {
                 const auto n = static_cast<int64_t>(all.size());
                 for (auto& dst : all)
                   for (int64_t i = 0; i < n; ++i) dst.out.view({n, -1}).select(0, i).copy_(all[i].in.reshape({-1}));
               });
  }

  void broadcast(at::Tensor& tensor, int root) override {
    checkContiguous(tensor, "broadcast");
    Slot s = Slot::of(CollectiveKind::kBroadcast, tensor);
    s.root = root;
    collective(std::move(s), rank_ == root ? tensor.nbytes() * static_cast<uint64_t>(size() - 1) : 0,
               [](std::vector<Slot>& all) {
                 const int from = all[0].root;
                 for (const auto& x : all) PARDIT_CHECK(x.root == from, "broadcast: ranks named different roots");
                 for (auto& x : all)
                   if (!x.in.is_same(all[from].in)) x.in.copy_(all[from].in);
               });
  }

  void allReduce(at::Tensor& tensor, ReduceOp op) override {
    checkContiguous(tensor, "all_reduce");
    Slot s = Slot::of(CollectiveKind::kAllReduce, tensor);
    s.op = op;
    collective(std::move(s), tensor.nbytes() * 2 * static_cast<uint64_t>(size() - 1) / size(), [](std::vector<Slot>& all) {
      at::Tensor acc = all[0].in.clone();
      for (size_t i = 1; i < all.size(); ++i) {
        switch (all[0].op) {
          case ReduceOp::kSum: acc.add_(all[i].in); break;
          case ReduceOp::kMax: acc = at::maximum(acc, all[i].in); break;
          case ReduceOp::kMin: acc = at::minimum(acc, all[i].in); break;
        }
      }
      for (auto& x : all) x.in.copy_(acc);
    });
  }

  void send(const at::Tensor& tensor, int peer) override { isend(tensor, peer)->wait(); }

  void recv(at::Tensor& tensor, int peer) override { irecv(tensor, peer)->wait(); }

  std::unique_ptr<Work> isend(const at::Tensor& tensor, int peer) override {
    checkContiguous(tensor, "isend");
    checkPeer(peer, "isend");
    Timer t;
    hub_->post(rank_, peer, tensor.clone());
    record(CollectiveKind::kSendRecv, tensor.nbytes(), t.seconds());
    return std::make_unique<InProcessWork>();
  }

  std::unique_ptr<Work> irecv(at::Tensor& tensor, int peer) override {
    checkContiguous(tensor, "irecv");
    checkPeer(peer, "irecv");
    record(CollectiveKind::kSendRecv, 0, 0.0);
    return std::make_unique<InProcessWork>([this, tensor, peer]() mutable {
      Timer t;
      at::Tensor m = hub_->take(peer, rank_);
      PARDIT_CHECK(m.nbytes() == tensor.nbytes(), "recv: expected ", tensor.nbytes(), " bytes from rank ", peer,
                   ", got ", m.nbytes());
      tensor.copy_(m.view(tensor.sizes()));
      record(CollectiveKind::kSendRecv, 0, t.seconds(), 0);
    });
  }

  std::unique_ptr<Work> sendRecv(const at::Tensor& out, int to, at::Tensor& in, int from) override {
    auto r = irecv(in, from);
    isend(out, to);
    return r;
  }

  void barrier() override { collective(Slot::of(CollectiveKind::kBarrier, {}), 0, [](std::vector<Slot>&) {}); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    Slot s = Slot::of(CollectiveKind::kCount, {});  // not a counted collective
    s.color = color;
    s.key = key;
    auto registry = registry_;
    auto world = hub_->world();
    Slot mine = hub_->rendezvous(rank_, std::move(s), [registry, world](std::vector<Slot>& all) {
      std::map<int, std::vector<std::pair<std::pair<int, int>, int>>> groups;  // color -> ((key, rank), rank)
      for (int r = 0; r < static_cast<int>(all.size()); ++r)
        if (all[r].color >= 0) groups[all[r].color].push_back({{all[r].key, r}, r});
      for (auto& [color, members] : groups) {
        std::sort(members.begin(), members.end());
        auto hub = std::make_shared<Hub>(static_cast<int>(members.size()), world);
        {
          std::lock_guard<std::mutex> lock(registry->mutex);
          registry->hubs.push_back(hub);
        }
        for (size_t i = 0; i < members.size(); ++i)
          all[members[i].second].made = std::make_unique<InProcessCommunicator>(hub, static_cast<int>(i), registry);
      }
    });
    return std::move(mine.made);
  }

 private:
  // Meets the group's other ranks, and counts this rank's bytes sent and the time.
  void collective(Slot mine, uint64_t bytesSent, const std::function<void(std::vector<Slot>&)>& all) {
    const CollectiveKind kind = mine.kind;
    Timer t;
    hub_->rendezvous(rank_, std::move(mine), all);
    record(kind, bytesSent, t.seconds());
  }

  void checkPeer(int peer, const char* what) const {
    PARDIT_CHECK(peer >= 0 && peer < size(), what, ": peer ", peer, " is not in a group of ", size());
  }

  std::shared_ptr<Hub> hub_;
  int rank_;
  std::shared_ptr<HubRegistry> registry_;
};

struct WorldHandle {
  std::shared_ptr<World> world;
  std::shared_ptr<HubRegistry> registry;
  std::vector<std::unique_ptr<Communicator>> comms;

  void fail() {
    world->failed = true;
    std::lock_guard<std::mutex> lock(registry->mutex);
    for (auto& weak : registry->hubs)
      if (auto hub = weak.lock()) hub->wake();
  }
};

WorldHandle makeWorld(int size) {
  PARDIT_CHECK(size >= 1, "an in-process world needs at least 1 rank, got ", size);
  WorldHandle h;
  h.world = std::make_shared<World>();
  h.registry = std::make_shared<HubRegistry>();
  auto hub = std::make_shared<Hub>(size, h.world);
  h.registry->hubs.push_back(hub);
  for (int r = 0; r < size; ++r) h.comms.push_back(std::make_unique<InProcessCommunicator>(hub, r, h.registry));
  return h;
}

}  // namespace

std::vector<std::unique_ptr<Communicator>> makeInProcessWorld(int size) { return std::move(makeWorld(size).comms); }

void runInProcess(int size, const std::function<void(Runtime&)>& body) {
  WorldHandle h = makeWorld(size);
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  std::mutex errorMutex;
  std::exception_ptr firstError;
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r, comm = std::move(h.comms[r])]() mutable {
      try {
        Runtime rt(std::move(comm), RankPlacement{r, size, host});
        body(rt);
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(errorMutex);
          if (!firstError) firstError = std::current_exception();
        }
        h.fail();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (firstError) std::rethrow_exception(firstError);
}

}  // namespace pardit::dist
