// The memory module with FP8 weights (model/fp8.h): the planner's byte counts and the streamer moving FP8
// groups, against the dense weights' numbers and the resident FP8 output.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <map>

#include "pardit/io/synth.h"
#include "pardit/memory/planner.h"
#include "pardit/memory/streamer.h"
#include "pardit/model/flux.h"
#include "pardit/model/fp8.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "test_util.h"

using namespace pardit;

// The planner counts FP8 bytes: a FLUX.1-dev block in FP8 is half its bf16 bytes plus 4 bytes per row.
// FLUX.1-dev at 1024x1024 on one rank: FP8 weights fit 24 GiB resident (bf16 does not); at 12 GiB FP8
// streams less than half what bf16 streams.
TEST(Fp8Memory, PlannerCountsFp8Bytes) {
  const model::FluxConfig dev = model::FluxConfig::preset("flux-dev");
  const uint64_t bf16 = memory::groupBytes(dev, "double_blocks.0", at::kBFloat16);
  const uint64_t f8 = memory::groupBytes(dev, "double_blocks.0", at::kBFloat16, model::WeightFormat::kFp8);
  EXPECT_GT(f8, bf16 / 2);
  EXPECT_LT(f8, bf16 / 2 + bf16 / 100);
  memory::RankWorkload w;
  w.config = dev;
  for (const auto& g : model::fluxWeightGroups(dev)) w.groups.push_back(g.name);
  w.imageTokens = 4096;
  w.textTokens = 512;
  const uint64_t GiB = 1ULL << 30;
  auto plan = [&](model::WeightFormat f, uint64_t budget) {
    w.weightFormat = f;
    return memory::planRank(w, budget, memory::Offload::kAuto);
  };
  const auto dense24 = plan(model::WeightFormat::kDense, 24 * GiB), fp824 = plan(model::WeightFormat::kFp8, 24 * GiB);
  EXPECT_TRUE(fp824.fits);
  EXPECT_FALSE(fp824.anyStreamed());
  const auto dense12 = plan(model::WeightFormat::kDense, 12 * GiB), fp812 = plan(model::WeightFormat::kFp8, 12 * GiB);
  EXPECT_TRUE(dense12.fits && fp812.fits);
  EXPECT_LT(fp812.streamedBytes, dense12.streamedBytes / 2);
  std::printf(
      "[fp8] FLUX.1-dev 1024x1024, one rank: 24 GiB: bf16 streams %.2f GiB, fp8 %.2f GiB (resident %.2f "
      "GiB); 12 GiB: bf16 streams %.2f GiB, fp8 %.2f GiB\n",
      dense24.streamedBytes / double(GiB), fp824.streamedBytes / double(GiB), fp824.residentBytes / double(GiB),
      dense12.streamedBytes / double(GiB), fp812.streamedBytes / double(GiB));
}

// Streaming FP8 groups: the output is the resident FP8 output bit for bit (from the file and from a host
// copy), every fetched byte is counted, and a pass streams about half the bytes of the dense weights.
TEST(Fp8Memory, StreamedGroupsMoveHalfTheBytes) {
  const model::FluxConfig c = model::FluxConfig::preset("small");
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& g : model::fluxWeightGroups(c))
    for (const auto& t : g.tensors) shapes[t.name] = t.shape;
  const pipeline::TensorReader read = pipeline::formatReader(
      model::WeightFormat::kFp8,
      [shapes](const std::string& n, c10::ScalarType t, c10::Device d) {
        return io::synthTensor(4, n, shapes.at(n)).to(t).to(d);
      },
      [shapes](const std::string& n, c10::Device) {
        return model::quantizeFp8Rows(io::synthTensor(4, n, shapes.at(n)));
      });
  const model::WeightGetter get = pipeline::getterOf(read, at::kFloat);
  const pipeline::LatentGeometry geom{64, 64, 16};
  at::manual_seed(3);
  model::FluxInputs in{at::randn({1, geom.tokens(), c.inChannels}),
                       at::randn({1, 8, c.contextInDim}),
                       at::randn({1, c.vecInDim}),
                       at::tensor({0.6f}),
                       at::tensor({3.5f}),
                       pipeline::imageIds(geom),
                       pipeline::textIds(8)};
  const at::Tensor ref = model::FluxTransformer(c, std::make_shared<model::ResidentFluxWeights>(c, get),
                                                std::make_shared<model::LocalAttention>())
                             .forward(in);
  memory::RankWorkload w;
  w.config = c;
  w.dtype = at::kFloat;
  for (const auto& g : model::fluxWeightGroups(c)) w.groups.push_back(g.name);
  w.imageTokens = geom.tokens();
  w.textTokens = 8;
  const auto dense = memory::planRank(w, 1ULL << 40, memory::Offload::kSequential);
  w.weightFormat = model::WeightFormat::kFp8;
  const auto plan = memory::planRank(w, 1ULL << 40, memory::Offload::kSequential);
  std::printf("[fp8] small preset, every block streamed: %llu B per pass in FP8, %llu B dense (fp32 here: %.2fx)\n",
              static_cast<unsigned long long>(plan.streamedBytes), static_cast<unsigned long long>(dense.streamedBytes),
              double(dense.streamedBytes) / plan.streamedBytes);
  EXPECT_LT(plan.streamedBytes * 2, dense.streamedBytes / 2 + dense.streamedBytes / 50);  // 1 byte for 4, plus scales
  for (bool hostCache : {false, true}) {
    memory::StreamingOptions options;
    options.hostCache = hostCache;
    options.format = model::WeightFormat::kFp8;
    auto s = std::make_shared<memory::StreamingFluxWeights>(c, get, plan, at::kCPU, options);
    model::FluxTransformer t(c, s, std::make_shared<model::LocalAttention>());
    EXPECT_TRUE(at::equal(t.forward(in), ref)) << "host cache " << hostCache;
    s->endOfRun();
    EXPECT_LE(s->accountant().peak(), plan.residentBytes + plan.streamBufferBytes);
    EXPECT_GT(s->accountant().peak(), plan.residentBytes);
  }
}
