// The rank order and group membership of the parallel topology.
#include <gtest/gtest.h>

#include "pardit/core/error.h"
#include "pardit/dist/topology.h"

using namespace pardit;

TEST(Topology, RankOrderAndGroups) {
  // rank = u + U * (r + R * (p + P * c)), checked on every rank of a 16-rank layout.
  const dist::ParallelDegrees d{2, 2, 2, 2};
  for (int rank = 0; rank < 16; ++rank) {
    dist::Topology t(d, rank);
    EXPECT_EQ(t.rankOf(t.cfgRank(), t.pipefusionRank(), t.ringRank(), t.ulyssesRank()), rank);
    EXPECT_EQ(t.group(dist::GroupKind::kUlysses).size(), 2u);
    EXPECT_EQ(t.group(dist::GroupKind::kSequence).size(), 4u);
    EXPECT_EQ(t.group(dist::GroupKind::kSequence)[t.spRank()], rank);
  }
  dist::Topology t(d, 13);  // u=1, r=0, p=1, c=1
  EXPECT_EQ(t.group(dist::GroupKind::kRing), (std::vector<int>{13, 15}));
  EXPECT_EQ(t.group(dist::GroupKind::kPipeFusion), (std::vector<int>{9, 13}));
  EXPECT_EQ(t.group(dist::GroupKind::kCfg), (std::vector<int>{5, 13}));
  EXPECT_THROW(dist::Topology::validate(d, 8), Error);
}
