// main() of the MPI test binaries: one pardit runtime for the whole run, GoogleTest output from rank 0
// only (every rank's exit status still counts: mpiexec fails when any rank fails).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <memory>

#include "mpi_env.h"

namespace pardit::test {
dist::Runtime* gRuntime = nullptr;
dist::Runtime& runtime() { return *gRuntime; }
}  // namespace pardit::test

int main(int argc, char** argv) {
  auto rt = std::make_unique<pardit::dist::Runtime>(&argc, &argv);
  pardit::test::gRuntime = rt.get();
  at::set_num_threads(1);
  ::testing::InitGoogleTest(&argc, argv);
  if (rt->worldRank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  // Every rank reports; a failure anywhere fails the job.
  at::Tensor status = at::full({1}, rc, at::kInt);
  rt->world().allReduce(status, pardit::dist::ReduceOp::kMax);
  if (rt->worldRank() == 0 && status.item<int>() != 0 && rc == 0)
    std::fprintf(stderr, "[rank 0] another rank reported test failures\n");
  rt.reset();
  return status.item<int>();
}
