// PipeFusion under mpiexec (MPI backend) against the single-rank result; the same cases run in-process
// in tests/unit/parallel.
#include <gtest/gtest.h>

#include "mpi_env.h"
#include "parallel_cases.h"

using namespace pardit;

TEST(PipeFusion, TinyModelAgainstSingleRank) { test::pipeFusionTinyMatchesSingleRank(test::runtime()); }

TEST(PipeFusion, SmallModelAgainstSingleRank) { test::pipeFusionSmallMatchesSingleRank(test::runtime()); }

TEST(PipeFusion, EachRankReadsExactlyItsStage) { test::pipeFusionRanksReadTheirStage(test::runtime()); }
