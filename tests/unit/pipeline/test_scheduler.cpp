#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pardit/pipeline/scheduler.h"
#include "test_util.h"

using namespace pardit;

namespace {
float fromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
}  // namespace

TEST(Scheduler, SigmasAreBitIdenticalToDiffusers) {
  std::ifstream in(test::fixture("schedules.json"));
  const auto j = nlohmann::json::parse(in);
  int cases = 0;
  for (const auto& c : j["cases"]) {
    const auto cfg = c["scheduler"] == "dev" ? pipeline::SchedulerConfig::dev() : pipeline::SchedulerConfig::schnell();
    pipeline::FlowMatchEulerScheduler s(cfg, c["steps"].get<int>(), c["image_seq_len"].get<int64_t>());
    const auto& sig = c["sigmas_f32_bits"];
    ASSERT_EQ(s.sigmas().size(), sig.size());
    for (size_t i = 0; i < sig.size(); ++i)
      EXPECT_EQ(s.sigmas()[i], fromBits(sig[i].get<uint32_t>()))
          << c["scheduler"] << " steps " << c["steps"] << " seq " << c["image_seq_len"] << " i " << i;
    const auto& ts = c["timesteps_f32_bits"];
    for (size_t i = 0; i < ts.size(); ++i) EXPECT_EQ(s.timesteps()[i], fromBits(ts[i].get<uint32_t>()));
    ++cases;
  }
  EXPECT_EQ(cases, 50);
}

TEST(Scheduler, MatchesTheBflScheduleTestVectors) {
  // flux-model.md section 6.1 (float64 values, 6 decimals).
  pipeline::FlowMatchEulerScheduler dev(pipeline::SchedulerConfig::dev(), 28, 4096);
  const double expect28[] = {1.000000, 0.988409, 0.976222, 0.963394, 0.949873, 0.935599, 0.920509, 0.904531,
                             0.887583, 0.869576, 0.850406, 0.829956, 0.808095, 0.784672, 0.759511, 0.732413,
                             0.703145, 0.671435, 0.636965, 0.599357, 0.558163, 0.512844, 0.462748, 0.407078,
                             0.344849, 0.274828, 0.195455, 0.104721, 0.0};
  for (int i = 0; i <= 28; ++i) EXPECT_NEAR(dev.sigmas()[i], expect28[i], 1.5e-6) << i;
  pipeline::FlowMatchEulerScheduler schnell(pipeline::SchedulerConfig::schnell(), 4, 4096);
  const double expect4[] = {1.0, 0.75, 0.5, 0.25, 0.0};
  for (int i = 0; i <= 4; ++i) EXPECT_NEAR(schnell.sigmas()[i], expect4[i], 1e-7);
  pipeline::FlowMatchEulerScheduler tiny(pipeline::SchedulerConfig::dev(), 2, 16);
  EXPECT_NEAR(tiny.sigmas()[1], 0.612866, 1e-6);
  EXPECT_NEAR(pipeline::calculateShift(4096, pipeline::SchedulerConfig::dev()), 1.15, 1e-12);
  EXPECT_NEAR(pipeline::calculateShift(6144, pipeline::SchedulerConfig::dev()), 1.4967, 1e-4);
}

TEST(Scheduler, EulerStepUpcastsAndReturnsTheVelocityDtype) {
  pipeline::FlowMatchEulerScheduler s(pipeline::SchedulerConfig::schnell(), 4, 16);
  at::Tensor x = at::ones({1, 2, 4}, at::kBFloat16), v = at::full({1, 2, 4}, 2.0, at::kBFloat16);
  at::Tensor y = s.step(v, 1, x);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::allclose(y.to(at::kFloat), at::full({1, 2, 4}, 0.5)));  // 1 + (0.5 - 0.75) * 2
}
