// USP, CFG and PipeFusion scheduling on in-process ranks (threads of this process) against the
// single-rank result: the cases of tests/common/parallel_cases, without mpiexec.
#include <gtest/gtest.h>

#include "parallel_cases.h"
#include "pardit/dist/in_process.h"

using namespace pardit;

class InProcessLayouts : public ::testing::TestWithParam<int> {};

TEST_P(InProcessLayouts, UspCfgForward) { dist::runInProcess(GetParam(), test::uspCfgForwardMatchesSingleRank); }
TEST_P(InProcessLayouts, UspCfgGenerate) { dist::runInProcess(GetParam(), test::uspCfgGenerateMatchesSingleRank); }
TEST_P(InProcessLayouts, CommunicationVolume) { dist::runInProcess(GetParam(), test::communicationVolumeIsAnalytic); }
TEST_P(InProcessLayouts, PipeFusionTiny) { dist::runInProcess(GetParam(), test::pipeFusionTinyMatchesSingleRank); }
// With NCCL's point-to-point semantics (nothing buffered, each rank's operations in issue order): the
// patch pipeline's sends and receives, including the last stage's send-back of the latents, complete.
TEST_P(InProcessLayouts, PipeFusionTinyWithRendezvousPointToPoint) {
  dist::runInProcess(GetParam(), test::pipeFusionTinyMatchesSingleRank, dist::PointToPoint::kRendezvous);
}
TEST_P(InProcessLayouts, PipeFusionReadsItsStage) {
  dist::runInProcess(GetParam(), test::pipeFusionRanksReadTheirStage);
}

INSTANTIATE_TEST_SUITE_P(Ranks, InProcessLayouts, ::testing::Values(2, 4),
                         [](const auto& info) { return "n" + std::to_string(info.param); });

TEST(InProcessLayouts, PipeFusionSmallPreset) { dist::runInProcess(2, test::pipeFusionSmallMatchesSingleRank); }
