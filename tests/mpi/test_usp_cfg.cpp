// USP and CFG under mpiexec (MPI backend) against the single-rank result; the same cases run in-process
// in tests/unit/parallel.
#include <gtest/gtest.h>

#include "mpi_env.h"
#include "parallel_cases.h"

using namespace pardit;

TEST(UspCfg, ForwardMatchesSingleRank) { test::uspCfgForwardMatchesSingleRank(test::runtime()); }

TEST(UspCfg, GenerateMatchesSingleRank) { test::uspCfgGenerateMatchesSingleRank(test::runtime()); }

TEST(UspCfg, CommunicationVolumeIsAnalytic) { test::communicationVolumeIsAnalytic(test::runtime()); }
