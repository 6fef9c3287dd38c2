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
#include <string>
#include <thread>
#include <vector>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"
#include "pardit/dist/runtime.h"
#include "profile_scope.h"

namespace pardit::dist {

namespace {

// Shared by every communicator of one in-process world: set when a rank has failed.
struct World {
  std::atomic<bool> failed{false};
  PointToPoint p2p = PointToPoint::kBuffered;
};

std::atomic<double> gDeadlockSeconds{60.0};

// One rendezvous point-to-point operation of a rank: its sends and receives, which complete together.
struct P2pOp {
  struct Part {
    bool send = false;
    int peer = 0;
    at::Tensor tensor;  // sent from, or received into (not copied: the caller keeps it until wait())
    bool matched = false;
  };
  int rank = 0;
  std::string what;
  std::vector<Part> parts;
  bool done = false;
  std::string error;
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
      waitUntil(
          lock, [&] { return generation_ != generation; }, "a collective");
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
    waitUntil(
        lock, [&] { return !box.empty(); }, "a receive");
    at::Tensor m = std::move(box.front());
    box.pop_front();
    return m;
  }

  // Rendezvous point-to-point: queues `op` behind the rank's earlier operations and matches what can be.
  void enqueue(const std::shared_ptr<P2pOp>& op) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (queues_.empty()) queues_.resize(size_);
    queues_[op->rank].push_back(op);
    progress();
  }

  void waitFor(const std::shared_ptr<P2pOp>& op) {
    std::unique_lock<std::mutex> lock(mutex_);
    uint64_t seen = matches_;
    auto last = std::chrono::steady_clock::now();
    while (!op->done) {
      PARDIT_CHECK(!world_->failed.load(), "in-process job: another rank failed while rank ", op->rank, " waited in ",
                   op->what);
      const auto now = std::chrono::steady_clock::now();
      if (matches_ != seen) {
        seen = matches_;
        last = now;
      }
      const double idle = std::chrono::duration<double>(now - last).count();
      PARDIT_CHECK(idle < gDeadlockSeconds.load(), "in-process job: rank ", op->rank, "'s ", op->what,
                   " cannot complete: the group's point-to-point operations made no progress for ", idle,
                   " s (each rank's complete in the order issued, a send only with its receive, as on NCCL, "
                   "where this hangs the GPUs); pending: ",
                   pending());
      cv_.wait_for(lock, std::chrono::milliseconds(20));
      progress();
    }
    PARDIT_CHECK(op->error.empty(), op->error);
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

  // Matches the send parts at the head of each rank's queue with the receive parts at the head of their
  // peers' queues (so in issue order between every pair), and retires heads whose parts all matched.
  void progress() {
    bool changed = true;
    while (changed) {
      changed = false;
      for (int r = 0; r < size_; ++r) {
        if (queues_[r].empty()) continue;
        P2pOp& head = *queues_[r].front();
        for (auto& part : head.parts) {
          if (part.matched || !part.send || part.peer < 0 || part.peer >= size_ || queues_[part.peer].empty()) continue;
          P2pOp& other = *queues_[part.peer].front();
          for (auto& recv : other.parts) {
            if (recv.matched || recv.send || recv.peer != r) continue;
            if (recv.tensor.nbytes() != part.tensor.nbytes()) {
              other.error = "recv: expected " + std::to_string(recv.tensor.nbytes()) + " bytes from rank " +
                            std::to_string(r) + ", got " + std::to_string(part.tensor.nbytes());
              head.error = "send to rank " + std::to_string(part.peer) + ": the receive expected another size";
            } else {
              recv.tensor.copy_(part.tensor.reshape(recv.tensor.sizes()));
            }
            part.matched = recv.matched = true;
            ++matches_;
            changed = true;
            break;
          }
        }
      }
      for (auto& q : queues_) {
        while (!q.empty() && std::all_of(q.front()->parts.begin(), q.front()->parts.end(),
                                         [](const P2pOp::Part& x) { return x.matched; })) {
          q.front()->done = true;
          q.pop_front();
          changed = true;
        }
      }
    }
    cv_.notify_all();
  }

  std::string pending() const {
    std::string out;
    for (size_t r = 0; r < queues_.size(); ++r) {
      if (queues_[r].empty()) continue;
      if (!out.empty()) out += "; ";
      out += "rank " + std::to_string(r) + ": " + queues_[r].front()->what;
      if (queues_[r].size() > 1) out += " (+" + std::to_string(queues_[r].size() - 1) + " queued)";
    }
    return out.empty() ? "none" : out;
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
  std::vector<std::deque<std::shared_ptr<P2pOp>>> queues_;  // rendezvous point-to-point, per rank
  uint64_t matches_ = 0;                                    // sends matched so far (progress)
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
    PARDIT_PROFILE_COMMUNICATION("wait");
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
    PARDIT_PROFILE_COMMUNICATION("all_to_all");
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
    PARDIT_PROFILE_COMMUNICATION("all_gather");
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
    PARDIT_PROFILE_COMMUNICATION("broadcast");
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
    PARDIT_PROFILE_COMMUNICATION("all_reduce");
    checkContiguous(tensor, "all_reduce");
    Slot s = Slot::of(CollectiveKind::kAllReduce, tensor);
    s.op = op;
    collective(std::move(s), tensor.nbytes() * 2 * static_cast<uint64_t>(size() - 1) / size(),
               [](std::vector<Slot>& all) {
                 at::Tensor acc = all[0].in.clone();
                 for (size_t i = 1; i < all.size(); ++i) {
                   switch (all[0].op) {
                     case ReduceOp::kSum:
                       acc.add_(all[i].in);
                       break;
                     case ReduceOp::kMax:
                       acc = at::maximum(acc, all[i].in);
                       break;
                     case ReduceOp::kMin:
                       acc = at::minimum(acc, all[i].in);
                       break;
                   }
                 }
                 for (auto& x : all) x.in.copy_(acc);
               });
  }

  void send(const at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("send");
    isend(tensor, peer)->wait();
  }

  void recv(at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("recv");
    irecv(tensor, peer)->wait();
  }

  std::unique_ptr<Work> isend(const at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("isend");
    checkContiguous(tensor, "isend");
    checkPeer(peer, "isend");
    if (rendezvous()) {
      record(CollectiveKind::kSendRecv, tensor.nbytes(), 0.0);
      return issue("send to rank " + std::to_string(peer), {{true, peer, tensor}});
    }
    Timer t;
    hub_->post(rank_, peer, tensor.clone());
    record(CollectiveKind::kSendRecv, tensor.nbytes(), t.seconds());
    return std::make_unique<InProcessWork>();
  }

  std::unique_ptr<Work> irecv(at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("irecv");
    checkContiguous(tensor, "irecv");
    checkPeer(peer, "irecv");
    record(CollectiveKind::kSendRecv, 0, 0.0);
    if (rendezvous()) return issue("recv from rank " + std::to_string(peer), {{false, peer, tensor}});
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
    PARDIT_PROFILE_COMMUNICATION("send_recv");
    if (rendezvous()) {
      checkContiguous(out, "send_recv");
      checkContiguous(in, "send_recv");
      checkPeer(to, "send_recv");
      checkPeer(from, "send_recv");
      record(CollectiveKind::kSendRecv, out.nbytes(), 0.0);
      return issue("send to rank " + std::to_string(to) + " with recv from rank " + std::to_string(from),
                   {{true, to, out}, {false, from, in}});
    }
    auto r = irecv(in, from);
    isend(out, to);
    return r;
  }

  void barrier() override {
    PARDIT_PROFILE_COMMUNICATION("barrier");
    collective(Slot::of(CollectiveKind::kBarrier, {}), 0, [](std::vector<Slot>&) {});
  }

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

  bool rendezvous() const { return hub_->world()->p2p == PointToPoint::kRendezvous; }

  std::unique_ptr<Work> issue(std::string what, std::vector<P2pOp::Part> parts) {
    auto op = std::make_shared<P2pOp>();
    op->rank = rank_;
    op->what = std::move(what);
    op->parts = std::move(parts);
    hub_->enqueue(op);
    auto hub = hub_;
    return std::make_unique<InProcessWork>([hub, op] { hub->waitFor(op); });
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

WorldHandle makeWorld(int size, PointToPoint p2p) {
  PARDIT_CHECK(size >= 1, "an in-process world needs at least 1 rank, got ", size);
  WorldHandle h;
  h.world = std::make_shared<World>();
  h.world->p2p = p2p;
  h.registry = std::make_shared<HubRegistry>();
  auto hub = std::make_shared<Hub>(size, h.world);
  h.registry->hubs.push_back(hub);
  for (int r = 0; r < size; ++r) h.comms.push_back(std::make_unique<InProcessCommunicator>(hub, r, h.registry));
  return h;
}

}  // namespace

std::vector<std::unique_ptr<Communicator>> makeInProcessWorld(int size, PointToPoint p2p) {
  return std::move(makeWorld(size, p2p).comms);
}

void setInProcessDeadlockSeconds(double seconds) { gDeadlockSeconds.store(seconds); }

void runInProcess(int size, const std::function<void(Runtime&)>& body, PointToPoint p2p) {
  WorldHandle h = makeWorld(size, p2p);
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
