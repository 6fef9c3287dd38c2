// The watchdog's communicator hooks (NCCL's ncclCommGetAsyncError and ncclCommAbort plug in here): an
// asynchronous error a communicator reports ends the job at once, naming the operation and the error, and
// every registered communicator is aborted before the processes go (an abort that hangs gets a time limit). Run in a child process (the job ends).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "pardit/dist/watchdog.h"
#include "test_util.h"

using namespace pardit;

TEST(Watchdog, ChildSide) {
  const char* marker = std::getenv("PARDIT_WATCHDOG_CHILD");
  if (!marker) GTEST_SKIP() << "the child side of Watchdog.AsyncErrorEndsTheJobAndAbortsCommunicators";
  dist::setCollectiveTimeout(600);  // far away: the error, not the timeout, must end the job
  const std::string path = marker;
  dist::registerCommunicator([] { return std::string(); }, [path] { std::ofstream(path + ".healthy") << "aborted\n"; });
  dist::registerCommunicator([] { return std::string("unhandled system error (a peer died)"); },
                             [path] { std::ofstream(path + ".failed") << "aborted\n"; });
  // An abort that never returns (a driver waiting on a dead peer) must not keep the process alive.
  dist::registerCommunicator([] { return std::string(); }, [] { std::this_thread::sleep_for(std::chrono::hours(1)); });
  dist::setWatchContext("step 2/4");
  dist::WatchedOperation op("ncclAllToAll");
  std::this_thread::sleep_for(std::chrono::seconds(30));
  ADD_FAILURE() << "the watchdog did not end the process";
}

TEST(Watchdog, AsyncErrorEndsTheJobAndAbortsCommunicators) {
  test::TempDir dir;
  const std::string marker = dir.file("m");
  const auto start = std::chrono::steady_clock::now();
  // (Without the sharding variables of a sharded run, which would leave the child nothing to run.)
  const auto r = test::runCommand("env -u GTEST_TOTAL_SHARDS -u GTEST_SHARD_INDEX PARDIT_WATCHDOG_CHILD=" + marker +
                                  " /proc/" + std::to_string(::getpid()) + "/exe --gtest_filter=Watchdog.ChildSide");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(r.exitCode, 124) << r.output;
  EXPECT_NE(r.output.find("ncclAllToAll failed: unhandled system error (a peer died); aborting the job"),
            std::string::npos)
      << r.output;
  EXPECT_LT(seconds, 15.0);  // the error is seen within 0.25 s; a hanging abort gets 5 s
  EXPECT_NE(r.output.find("aborts did not return within 5"), std::string::npos) << r.output;
  EXPECT_TRUE(std::ifstream(marker + ".healthy").good()) << "every registered communicator is aborted";
  EXPECT_TRUE(std::ifstream(marker + ".failed").good());
}
