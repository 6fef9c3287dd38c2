// The collective watchdog (dist/watchdog.h), in death tests (each case runs in a child process, which the
// watchdog ends): an operation in flight past the timeout ends the job with exit status 124 and one line that
// names the operation, its channel and sequence number, the context it started in, the time waited and the
// channel's last error; an asynchronous error a channel reports ends it at once, after every channel's abort
// (an abort that hangs gets a time limit). Owned: a watchdog with a running thread is destroyed (joined) in a
// test that goes on.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <unistd.h>

#include "pardit/dist/in_process.h"
#include "pardit/dist/runtime.h"
#include "pardit/dist/watchdog.h"
#include "test_util.h"

using namespace pardit;

namespace {

// Each death test re-runs the binary for its child (threads and fork do not mix).
class WatchdogDeathTest : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

}  // namespace

TEST_F(WatchdogDeathTest, AnOperationPastTheTimeoutEndsTheJobNamingIt) {
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EXIT(
      {
        dist::Watchdog watchdog;
        watchdog.setTimeout(0.5);
        const uint64_t ulysses =
            watchdog.addChannel("the ulysses group", {[] { return std::string("peer 3 gone"); }, {}, {}});
        const uint64_t world = watchdog.addChannel("the world");
        watchdog.setContext("step 1/4");
        { dist::Watchdog::Operation done(&watchdog, ulysses, "MPI_Alltoall"); }  // #1, completed
        watchdog.setContext("step 2/4");
        dist::Watchdog::Operation stuck(&watchdog, ulysses, "MPI_Alltoall");  // #2, never completes
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        dist::Watchdog::Operation other(&watchdog, world, "MPI_Barrier");
        std::this_thread::sleep_for(std::chrono::seconds(20));
        std::exit(0);  // not reached
      },
      ::testing::ExitedWithCode(dist::Watchdog::kExitCode),
      "MPI_Alltoall #2 on the ulysses group has not completed after [0-9.]+ ?m?s \\(started at step 2/4; "
      "--collective-timeout 0.5\\); last error on the ulysses group: peer 3 gone; also in flight: MPI_Barrier #1 on "
      "the world: another rank stopped, hung or lost its link; aborting the job");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
}

TEST_F(WatchdogDeathTest, AsyncErrorEndsTheJobAtOnceAfterEveryAbort) {
  // The child runs this body again (threadsafe style): it finds the parent's marker path in the environment.
  if (!std::getenv("PARDIT_WATCHDOG_MARKER"))
    ::setenv("PARDIT_WATCHDOG_MARKER", (::testing::TempDir() + "pardit-watchdog-" + std::to_string(::getpid())).c_str(),
             1);
  const std::string marker = std::getenv("PARDIT_WATCHDOG_MARKER");
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EXIT(
      {
        dist::Watchdog watchdog;
        watchdog.setTimeout(600);  // far away: the error, not the timeout, must end the job
        watchdog.addChannel("a healthy group",
                            {{}, {}, [marker] { std::ofstream(marker + ".healthy") << "aborted\n"; }});
        const uint64_t failed = watchdog.addChannel("the ring group (NCCL)",
                                                    {{},
                                                     [] { return std::string("unhandled system error (a peer died)"); },
                                                     [marker] { std::ofstream(marker + ".failed") << "aborted\n"; }});
        // An abort that never returns (a driver waiting on a dead peer) must not keep the process alive.
        watchdog.addChannel("a hanging group", {{}, {}, [] { std::this_thread::sleep_for(std::chrono::hours(1)); }});
        watchdog.setContext("step 2/4");
        dist::Watchdog::Operation op(&watchdog, failed, "ncclAllToAll");
        std::this_thread::sleep_for(std::chrono::seconds(30));
        std::exit(0);  // not reached
      },
      ::testing::ExitedWithCode(dist::Watchdog::kExitCode),
      "ncclAllToAll #1 on the ring group \\(NCCL\\) \\(step 2/4\\) failed: the ring group \\(NCCL\\): unhandled system "
      "error \\(a peer died\\); aborting the job(.|\n)*aborts did not return within 5");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 15.0);
  EXPECT_TRUE(std::ifstream(marker + ".healthy").good()) << "every channel is aborted";
  EXPECT_TRUE(std::ifstream(marker + ".failed").good());
  std::remove((marker + ".healthy").c_str());
  std::remove((marker + ".failed").c_str());
  ::unsetenv("PARDIT_WATCHDOG_MARKER");
}

TEST(Watchdog, IsOwnedJoinedAndCountsEachChannelsOperations) {
  const auto start = std::chrono::steady_clock::now();
  {
    dist::Watchdog watchdog;
    watchdog.setTimeout(30);  // starts the thread
    const uint64_t a = watchdog.addChannel("a"), b = watchdog.addChannel("b");
    for (int i = 0; i < 3; ++i) dist::Watchdog::Operation op(&watchdog, a, "op");
    { dist::Watchdog::Operation op(&watchdog, b, "op"); }
    { dist::Watchdog::Operation op(&watchdog, 0, "op"); }  // no channel: not recorded
    EXPECT_EQ(watchdog.sequence(a), 3u);
    EXPECT_EQ(watchdog.sequence(b), 1u);
    watchdog.setTimeout(0);  // off: nothing is recorded
    { dist::Watchdog::Operation op(&watchdog, a, "op"); }
    EXPECT_EQ(watchdog.sequence(a), 3u);
  }  // joined here, within one period
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 2.0);
}

TEST(Watchdog, EveryCommunicatorOfARuntimeIsAChannelOfItsWatchdog) {
  dist::runInProcess(2, [](dist::Runtime& rt) {
    EXPECT_EQ(rt.watchdog().channelNames(), std::vector<std::string>{"the world"});
    rt.setTopology(dist::ParallelDegrees{1, 1, 1, 2}, c10::Device(c10::kCPU));
    const auto names = rt.watchdog().channelNames();
    for (const char* name : {"the world", "the ulysses group", "the ring group", "the sequence group",
                             "the pipefusion group", "the cfg group"})
      EXPECT_NE(std::find(names.begin(), names.end(), name), names.end()) << name;
    EXPECT_EQ(names.size(), 6u);
    // Rebuilding the topology replaces the groups' channels instead of adding to them.
    rt.setTopology(dist::ParallelDegrees{1, 1, 1, 2}, c10::Device(c10::kCPU));
    EXPECT_EQ(rt.watchdog().channelNames().size(), 6u);
  });
}
