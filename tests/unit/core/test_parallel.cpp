// pardit::parallelFor: every index once, on ATen's intra-op threads, exceptions reach the caller.
#include <gtest/gtest.h>

#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "pardit/core/parallel.h"
#include "test_util.h"

namespace {

struct Chunks {
  std::mutex m;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  std::set<std::thread::id> threads;
  void add(int64_t b, int64_t e) {
    std::lock_guard<std::mutex> lock(m);
    ranges.emplace_back(b, e);
    threads.insert(std::this_thread::get_id());
  }
};

}  // namespace

TEST(ParallelFor, CoversTheRangeOnceAndUsesTheIntraOpThreads) {
  pardit::test::ThreadCount threads(2);
  const int64_t n = 100003, grain = 1000;
  std::vector<int> hits(n, 0);
  Chunks chunks;
  pardit::parallelFor(n, grain, [&](int64_t b, int64_t e) {
    ASSERT_LE(0, b);
    ASSERT_LT(b, e);
    ASSERT_LE(e, n);
    // Long enough that both threads are inside at once (each chunk also records its thread).
    volatile double sink = 0;
    for (int64_t i = b; i < e; ++i) {
      ++hits[i];
      for (int k = 0; k < 200; ++k) sink = sink + static_cast<double>(k);
    }
    chunks.add(b, e);
  });
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i], 1) << "index " << i;
  EXPECT_GE(chunks.ranges.size(), 2u);
  EXPECT_LE(chunks.ranges.size(), static_cast<size_t>(n / grain));
  // The point of the helper: at::parallel_for from a translation unit built without OpenMP runs all of
  // this on the calling thread.
  EXPECT_EQ(chunks.threads.size(), 2u) << "the loop ran on one thread with 2 intra-op threads set";
}

TEST(ParallelFor, OneCallWhenSmallSerialOrEmpty) {
  pardit::test::ThreadCount threads(2);
  Chunks small;
  pardit::parallelFor(500, 1000, [&](int64_t b, int64_t e) { small.add(b, e); });
  ASSERT_EQ(small.ranges.size(), 1u);
  EXPECT_EQ(small.ranges[0], std::make_pair(int64_t{0}, int64_t{500}));
  {
    pardit::test::ThreadCount one(1);
    Chunks serial;
    pardit::parallelFor(100000, 10, [&](int64_t b, int64_t e) { serial.add(b, e); });
    ASSERT_EQ(serial.ranges.size(), 1u);
    EXPECT_EQ(serial.ranges[0], std::make_pair(int64_t{0}, int64_t{100000}));
  }
  int calls = 0;
  pardit::parallelFor(0, 10, [&](int64_t, int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST(ParallelFor, AnExceptionReachesTheCaller) {
  pardit::test::ThreadCount threads(2);
  EXPECT_THROW(pardit::parallelFor(100000, 100,
                                   [&](int64_t b, int64_t e) {
                                     if (b <= 70000 && 70000 < e) throw std::runtime_error("index 70000");
                                   }),
               std::runtime_error);
}
