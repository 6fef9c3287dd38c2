// PipeFusion's stage partition and patch layout.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "pardit/core/error.h"
#include "pardit/parallel/pipefusion.h"

using namespace pardit;

namespace {
parallel::Partition byCompute() { return {}; }
parallel::Partition byMemory() { return {parallel::Partition::Mode::kMemory, {}}; }
parallel::Partition counts(std::vector<int64_t> c) { return {parallel::Partition::Mode::kExplicit, std::move(c)}; }
}  // namespace

TEST(PipeFusion, PartitionModes) {
  const model::FluxConfig dev = model::FluxConfig::preset("flux-dev");
  auto compute = parallel::partitionStages(dev, 4, byCompute());
  EXPECT_EQ(compute.counts(), (std::vector<int64_t>{15, 14, 14, 14}));
  auto memory = parallel::partitionStages(dev, 4, byMemory());
  int64_t sum = 0;
  for (auto n : memory.counts()) sum += n;
  EXPECT_EQ(sum, 57);
  EXPECT_LT(memory.counts()[0], memory.counts()[3]);  // double blocks are 2.4x heavier than single ones
  EXPECT_EQ(parallel::partitionStages(dev, 2, counts({20, 37})).counts(), (std::vector<int64_t>{20, 37}));
  // 3 double + 6 single blocks over 4 contiguous stages: D | D | D S S | S S S S is the best split
  // (largest stage D + 2S = 623M parameters; any other split has a larger one).
  model::FluxConfig mix = dev;
  mix.depth = 3;
  mix.depthSingle = 6;
  EXPECT_EQ(parallel::partitionStages(mix, 4, byMemory()).counts(), (std::vector<int64_t>{1, 1, 3, 4}));
  EXPECT_THROW(parallel::partitionStages(dev, 2, counts({20, 30})), Error);
  EXPECT_THROW(parallel::partitionStages(dev, 3, counts({20, 37})), Error);
  parallel::PatchLayout bad{64, 64, 3, 2, 0};
  EXPECT_THROW(bad.check(), Error);
  parallel::PatchLayout l{8, 2, 2, 2, 1};  // 8 rows, 2 patches, 2 SP ranks: rank 1 owns rows 2-3 and 6-7
  EXPECT_TRUE(at::equal(l.localTokenIndex(), at::tensor({4, 5, 6, 7, 12, 13, 14, 15}, at::kLong)));
}
