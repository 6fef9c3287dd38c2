// PipeFusion under mpiexec (MPI backend) against the single-rank result; the same cases run in-process
// in tests/unit/parallel.
#include <gtest/gtest.h>

#include "mpi_env.h"
#include "parallel_cases.h"

using namespace pardit;

TEST(PipeFusion, TinyModelAgainstSingleRank) {
  if (test::runtime().worldSize() == 1) GTEST_SKIP() << "needs at least 2 ranks";
  test::pipeFusionTinyMatchesSingleRank(test::runtime());
}

TEST(PipeFusion, SmallModelAgainstSingleRank) {
  if (test::runtime().worldSize() != 2) GTEST_SKIP() << "run with 2 ranks (the small model costs a few seconds per layout)";
  test::pipeFusionSmallMatchesSingleRank(test::runtime());
}

TEST(PipeFusion, EachRankReadsExactlyItsStage) { test::pipeFusionRanksReadTheirStage(test::runtime()); }
