#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/synth.h"
#include "pardit/memory/planner.h"
#include "pardit/memory/streamer.h"
#include "pardit/pipeline/latents.h"
#include "test_util.h"

using namespace pardit;

TEST(Planner, FluxDevOnOne24GiBCardStreamsSingleBlocksFirst) {
  const auto dev = model::FluxConfig::preset("flux-dev");
  const auto w = test::wholeModel(dev, at::kBFloat16, 4096, 512);
  const uint64_t budget = 24ULL << 30;
  auto none = memory::planRank(w, 20ULL << 30, memory::OffloadMode::kNone);
  EXPECT_FALSE(none.fits);
  EXPECT_NE(none.problem.find("--offload auto"), std::string::npos);
  auto plan = memory::planRank(w, 16ULL << 30, memory::OffloadMode::kAuto);
  EXPECT_TRUE(plan.fits) << plan.problem;
  EXPECT_LE(plan.total(), 16ULL << 30);
  bool anyDoubleStreamed = false, allSinglesStreamedBeforeDoubles = true;
  for (const auto& g : plan.groups) {
    if (g.name.rfind("double_blocks.", 0) == 0 && g.streamed) anyDoubleStreamed = true;
    if (g.name == "conditioning" || g.name == "input_embedders" || g.name == "final_layer") {
      EXPECT_FALSE(g.streamed);
    }
  }
  if (anyDoubleStreamed)
    for (const auto& g : plan.groups)
      if (g.name.rfind("single_blocks.", 0) == 0 && !g.streamed) allSinglesStreamedBeforeDoubles = false;
  EXPECT_TRUE(allSinglesStreamedBeforeDoubles);
  // The whole model fits a 24 GiB budget only with streaming (23.8 GB of weights plus activations).
  EXPECT_TRUE(memory::planRank(w, budget, memory::OffloadMode::kAuto).fits);
  auto seq = memory::planRank(w, 4ULL << 30, memory::OffloadMode::kSequential);
  EXPECT_TRUE(seq.fits) << seq.problem;
  // The group in use and those read ahead, each a buffer of the largest group (a double block).
  EXPECT_EQ(seq.streamBufferBytes, static_cast<uint64_t>(seq.prefetchDepth + 1) *
                                       memory::groupBufferBytes(dev, "double_blocks.0", at::kBFloat16));
  auto impossible = memory::planRank(w, 1ULL << 30, memory::OffloadMode::kAuto);
  EXPECT_FALSE(impossible.fits);
  EXPECT_NE(impossible.problem.find("even streaming every block"), std::string::npos);
}

// A model under a budget well below its size (40%): the accounted weight peak stays within the budget
// and the output equals the fully resident run exactly, streaming from the source and from a host copy.
TEST(Streamer, OutputEqualsResidentAndPeakStaysWithinBudget) {
  const model::FluxConfig c = model::FluxConfig::preset("small");
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& g : model::fluxWeightGroups(c))
    for (const auto& t : g.tensors) shapes[t.name] = t.shape;
  const model::WeightGetter read = [shapes](const std::string& n) { return io::synthTensor(4, n, shapes.at(n)); };
  const pipeline::LatentGeometry geom{64, 64, 16};
  at::manual_seed(3);
  model::FluxInputs in{at::randn({1, geom.tokens(), c.inChannels}),
                       at::randn({1, 8, c.contextInDim}),
                       at::randn({1, c.vecInDim}),
                       at::tensor({0.6f}),
                       at::tensor({3.5f}),
                       pipeline::imageIds(geom),
                       pipeline::textIds(8)};
  at::Tensor ref;
  {
    model::FluxTransformer resident(c, std::make_shared<model::ResidentFluxWeights>(c, read),
                                    std::make_shared<model::LocalAttention>());
    ref = resident.forward(in);
  }
  auto w = test::wholeModel(c, at::kFloat, geom.tokens(), 8);
  uint64_t weights = 0;
  for (const auto& g : w.groups) weights += memory::groupBytes(c, g, at::kFloat);
  const uint64_t budget = weights * 4 / 10;
  const auto plan = memory::planRank(w, budget, memory::OffloadMode::kAuto);
  ASSERT_TRUE(plan.fits) << plan.problem;
  ASSERT_TRUE(plan.anyStreamed());
  size_t streamedGroups = 0;
  for (const auto& g : plan.groups) streamedGroups += g.streamed;
  for (bool hostCache : {false, true}) {
    memory::StreamingOptions options;
    options.hostCache = hostCache;
    auto streaming = std::make_shared<memory::StreamingFluxWeights>(c, read, plan, at::kCPU, options);
    const uint64_t residentOnly = streaming->accountant().current();
    model::FluxTransformer t(c, streaming, std::make_shared<model::LocalAttention>());
    for (int rep = 0; rep < 2; ++rep) EXPECT_TRUE(at::equal(t.forward(in), ref)) << "host cache " << hostCache;
    EXPECT_EQ(streaming->streamedGroupsFetched(), 2 * streamedGroups);
    // The read-ahead of the first streamed group for a next pass (in flight or done) is dropped when the
    // run says it is over.
    streaming->endOfRun();
    EXPECT_EQ(streaming->accountant().current(), residentOnly);
    EXPECT_TRUE(at::equal(t.forward(in), ref)) << "a run after endOfRun()";
    streaming->endOfRun();
    EXPECT_EQ(streaming->streamedGroupsFetched(), 3 * streamedGroups);
    EXPECT_LE(streaming->accountant().peak(), budget) << "host cache " << hostCache;
    EXPECT_LE(streaming->accountant().peak(), plan.residentBytes + plan.streamBufferBytes);
    EXPECT_GT(streaming->accountant().peak(), plan.residentBytes);  // streamed groups were counted
    std::printf("[streaming] %s: weights %llu B, budget %llu B, accounted peak %llu B, planned %llu B\n",
                hostCache ? "host copy" : "source", static_cast<unsigned long long>(weights),
                static_cast<unsigned long long>(budget),
                static_cast<unsigned long long>(streaming->accountant().peak()),
                static_cast<unsigned long long>(plan.residentBytes + plan.streamBufferBytes));
  }
}

TEST(Planner, ActivationsBeyondTheBudgetNameTheImageSizeAndTheRanks) {
  const model::FluxConfig c = model::FluxConfig::preset("small");
  const auto plan =
      memory::planRank(test::wholeModel(c, at::kFloat, 1 << 20, 64), uint64_t{2} << 30, memory::OffloadMode::kAuto);
  ASSERT_FALSE(plan.fits);
  EXPECT_NE(plan.problem.find("the activations of 1048576 image + 64 text tokens per rank do not fit: use a smaller "
                              "--height/--width or more ranks"),
            std::string::npos)
      << plan.problem;
}
