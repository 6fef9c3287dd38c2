// The in-process communicator: collective and point-to-point semantics, group splitting, byte counters
// (the same formulas as the MPI backend), Runtime::agree and checkSame, and no hang when a rank fails.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>

#include "pardit/core/error.h"
#include "pardit/dist/in_process.h"
#include "pardit/dist/runtime.h"
#include "pardit/model/attention.h"
#include "pardit/parallel/usp_attention.h"

using namespace pardit;

TEST(InProcess, CollectivesMoveTheRightData) {
  dist::runInProcess(3, [](dist::Runtime& rt) {
    auto& w = rt.world();
    const int r = w.rank(), n = w.size();
    EXPECT_EQ(w.backend(), "in-process");
    // all-to-all: chunk j of rank i lands as chunk i on rank j.
    at::Tensor in = at::arange(n, at::kFloat).add(10.0 * r).reshape({n, 1});
    at::Tensor out = dist::allToAll(w, in);
    for (int i = 0; i < n; ++i) EXPECT_EQ(out[i].item<float>(), 10.0f * i + r);
    // all-gather: out[i] is rank i's tensor.
    at::Tensor g = dist::allGather(w, at::full({2}, r, at::kLong));
    for (int i = 0; i < n; ++i) EXPECT_EQ(g[i][1].item<int64_t>(), i);
    // broadcast from rank 2.
    at::Tensor b = at::full({4}, r, at::kInt);
    w.broadcast(b, 2);
    EXPECT_TRUE(at::equal(b, at::full({4}, 2, at::kInt)));
    // all-reduce.
    for (auto [op, expect] :
         {std::pair{dist::ReduceOp::kSum, 3.0}, {dist::ReduceOp::kMax, 2.0}, {dist::ReduceOp::kMin, 0.0}}) {
      at::Tensor x = at::full({2}, static_cast<double>(r), at::kDouble);
      w.allReduce(x, op);
      EXPECT_EQ(x[0].item<double>(), expect);
    }
    // Counters: all-to-all sends (n-1)/n of the buffer, all-gather (n-1) copies, broadcast (root only).
    EXPECT_EQ(w.stats(dist::CollectiveKind::kAllToAll).bytes, in.nbytes() / n * (n - 1));
    EXPECT_EQ(w.stats(dist::CollectiveKind::kAllGather).bytes, 2u * 8u * (n - 1));
    EXPECT_EQ(w.stats(dist::CollectiveKind::kBroadcast).bytes, r == 2 ? 16u * (n - 1) : 0u);
    w.barrier();
  });
}

TEST(InProcess, PointToPointIsOrderedAndRingShiftsDoNotDeadlock) {
  dist::runInProcess(4, [](dist::Runtime& rt) {
    auto& w = rt.world();
    const int r = w.rank(), n = w.size();
    if (r == 0) {
      for (int k = 0; k < 3; ++k) w.send(at::full({2}, k, at::kFloat), 1);
    } else if (r == 1) {
      for (int k = 0; k < 3; ++k) {
        at::Tensor t = at::empty({2}, at::kFloat);
        w.recv(t, 0);
        EXPECT_EQ(t[0].item<float>(), k);  // in the order sent
      }
    }
    // Every rank sends to the next and receives from the previous at once.
    at::Tensor mine = at::full({3}, r, at::kFloat), got = at::empty({3}, at::kFloat);
    w.sendRecv(mine, (r + 1) % n, got, (r + n - 1) % n)->wait();
    EXPECT_EQ(got[0].item<float>(), (r + n - 1) % n);
    at::Tensor wrong = at::empty({5}, at::kFloat);
    if (r == 2) w.send(mine, 3);
    if (r == 3) {
      EXPECT_THROW(w.recv(wrong, 2), Error);  // a size mismatch is an error, never a partial copy
    }
  });
}

TEST(InProcess, SplitMakesGroupsOrderedByKey) {
  dist::runInProcess(4, [](dist::Runtime& rt) {
    const int r = rt.worldRank();
    auto g = rt.world().split(r % 2, -r);  // two groups, ranks in reverse order
    EXPECT_EQ(g->size(), 2);
    EXPECT_EQ(g->rank(), r < 2 ? 1 : 0);
    at::Tensor all = dist::allGather(*g, at::full({1}, r, at::kInt));
    EXPECT_EQ(all[g->rank()].item<int>(), r);
    EXPECT_EQ(all[0].item<int>() % 2, r % 2);
    // The topology's groups come from the same split.
    rt.setTopology({1, 1, 2, 2}, c10::kCPU);
    EXPECT_EQ(rt.group(dist::GroupKind::kUlysses).size(), 2);
    EXPECT_EQ(rt.group(dist::GroupKind::kSequence).rank(), rt.topology().spRank());
  });
}

TEST(InProcess, AgreeEndsEveryRankWhenOneFails) {
  std::atomic<int> failures{0};
  dist::runInProcess(3, [&](dist::Runtime& rt) {
    try {
      rt.agree([&] { PARDIT_CHECK(rt.worldRank() != 1, "rank 1 refuses"); });
    } catch (const dist::CollectiveFailure& e) {
      EXPECT_EQ(e.failedRank(), 1);
      ++failures;
    }
  });
  EXPECT_EQ(failures.load(), 3);
}

TEST(InProcess, CheckSameNamesTheOptionThatDiffers) {
  std::atomic<int> failures{0};
  dist::runInProcess(2, [&](dist::Runtime& rt) {
    const std::string steps = rt.worldRank() == 0 ? "4" : "3";
    try {
      rt.agree([&] { rt.checkSame({{"--seed", "1"}, {"--steps", steps}}, "options"); });
    } catch (const dist::CollectiveFailure& e) {
      EXPECT_EQ(e.failedRank(), 1);
      ++failures;
    }
    rt.agree([&] { rt.checkSame({{"--seed", "1"}}, "options"); });  // equal: passes
  });
  EXPECT_EQ(failures.load(), 2);
  try {
    dist::runInProcess(2, [](dist::Runtime& rt) {
      rt.checkSame({{"--steps", rt.worldRank() == 0 ? "4" : "3"}}, "options");
    });
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("--steps is '4' on rank 0 and '3' on rank 1"), std::string::npos) << e.message();
  }
}

TEST(InProcess, AFailingRankReleasesTheOthers) {
  const auto start = std::chrono::steady_clock::now();
  try {
    dist::runInProcess(3, [](dist::Runtime& rt) {
      if (rt.worldRank() == 2) PARDIT_THROW("rank 2 gave up");
      at::Tensor x = at::ones({1});
      rt.world().allReduce(x);  // ranks 0 and 1 wait here for rank 2
    });
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.message(), "rank 2 gave up");  // the first error, not the released ranks'
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
}

// Ring attention's log-sum-exp merge: K/V blocks visiting every rank give full attention.
TEST(InProcess, RingAttentionEqualsFullAttention) {
  at::manual_seed(3);
  const at::Tensor q = at::randn({1, 2, 12, 8}), k = at::randn({1, 2, 12, 8}), v = at::randn({1, 2, 12, 8});
  const at::Tensor full = model::localAttention(q, k, v, false).out;
  for (int R : {2, 3, 4}) {
    dist::runInProcess(R, [&](dist::Runtime& rt) {
      const int64_t chunk = 12 / R, r = rt.worldRank();
      auto mine = [&](const at::Tensor& x) { return x.narrow(2, r * chunk, chunk).contiguous(); };
      const at::Tensor out = parallel::ringAttention(rt.world(), mine(q), mine(k), mine(v));
      EXPECT_LE((out - mine(full)).abs().max().item<double>(), 1e-5) << "R=" << R;
      // Each block with the kernel --attention names (here the math composition).
      const at::Tensor math =
          parallel::ringAttention(rt.world(), mine(q), mine(k), mine(v), {}, {}, model::AttentionKernel::kMath);
      EXPECT_LE((math - mine(full)).abs().max().item<double>(), 1e-5) << "R=" << R << ", math";
    });
  }
  // Merging two halves' partial results equals attending to the whole.
  auto a = model::localAttention(q, k.narrow(2, 0, 5), v.narrow(2, 0, 5), true);
  auto b = model::localAttention(q, k.narrow(2, 5, 7), v.narrow(2, 5, 7), true);
  at::Tensor out = a.out.to(at::kFloat), lse = a.lse.clone();
  parallel::mergeAttention(out, lse, b.out.to(at::kFloat), b.lse);
  EXPECT_LE((out - full).abs().max().item<double>(), 1e-5);
}

// Rendezvous point-to-point (NCCL's semantics on GPUs): two neighbours that each receive before they send
// can never complete, and the wait says so instead of hanging; the same exchange as one grouped sendRecv
// completes, and the buffered default accepts both orders.
TEST(InProcess, RendezvousPointToPointReportsAnExchangeThatWouldHangOnNccl) {
  struct ShortDeadlock {
    ShortDeadlock() { dist::setInProcessDeadlockSeconds(1.0); }
    ~ShortDeadlock() { dist::setInProcessDeadlockSeconds(60.0); }
  } shortDeadlock;
  auto receiveFirst = [](dist::Runtime& rt) {
    auto& w = rt.world();
    const int peer = 1 - w.rank();
    at::Tensor in = at::empty({4}), out = at::full({4}, static_cast<double>(w.rank()));
    auto r = w.irecv(in, peer);
    auto s = w.isend(out, peer);
    r->wait();
    s->wait();
    EXPECT_TRUE(in.eq(peer).all().item<bool>());
  };
  EXPECT_NO_THROW(dist::runInProcess(2, receiveFirst));  // buffered: the sends complete at once
  try {
    dist::runInProcess(2, receiveFirst, dist::PointToPoint::kRendezvous);
    FAIL() << "expected the exchange to be reported";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("recv from rank"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("cannot complete"), std::string::npos) << e.message();
  }
  dist::runInProcess(
      2,
      [](dist::Runtime& rt) {
        auto& w = rt.world();
        const int peer = 1 - w.rank();
        at::Tensor in = at::empty({4}), out = at::full({4}, static_cast<double>(w.rank()));
        w.sendRecv(out, peer, in, peer)->wait();
        EXPECT_TRUE(in.eq(peer).all().item<bool>());
        // In issue order between a pair: two sends are received in the order they were sent.
        at::Tensor a = at::full({2}, 10.0 + w.rank()), b = at::full({3}, 20.0 + w.rank());
        if (w.rank() == 0) {
          auto s1 = w.isend(a, 1);
          auto s2 = w.isend(b, 1);
          s1->wait();
          s2->wait();
        } else {
          at::Tensor ra = at::empty({2}), rb = at::empty({3});
          w.recv(ra, 0);
          w.recv(rb, 0);
          EXPECT_TRUE(ra.eq(10.0).all().item<bool>());
          EXPECT_TRUE(rb.eq(20.0).all().item<bool>());
        }
      },
      dist::PointToPoint::kRendezvous);
}
