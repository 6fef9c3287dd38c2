#include "pardit/pipeline/scheduler.h"

#include <ATen/ATen.h>

#include <cmath>

#include "pardit/core/error.h"

namespace pardit::pipeline {

double calculateShift(int64_t imageSeqLen, const SchedulerConfig& c) {
  const double m = (c.maxShift - c.baseShift) / static_cast<double>(c.maxSeqLen - c.baseSeqLen);
  const double b = c.baseShift - m * static_cast<double>(c.baseSeqLen);
  return static_cast<double>(imageSeqLen) * m + b;
}

FlowMatchEulerScheduler::FlowMatchEulerScheduler(const SchedulerConfig& config, int steps, int64_t imageSeqLen) {
  PARDIT_CHECK(steps >= 1, "--steps must be at least 1, got ", steps);
  // linspace(1, 1/N, N) in float64 (numpy's formula: start + i * step, last point exact), then float32.
  std::vector<float> base(steps);
  const double stop = 1.0 / steps;
  if (steps == 1) {
    base[0] = 1.0f;
  } else {
    const double step = (stop - 1.0) / (steps - 1);
    for (int i = 0; i < steps; ++i) base[i] = static_cast<float>(static_cast<double>(i) * step + 1.0);
    base[steps - 1] = static_cast<float>(stop);
  }
  sigmas_.resize(steps);
  if (config.dynamicShift) {
    // exp(mu) / (exp(mu) + (1/t - 1)^1), all in float32 as numpy evaluates it on a float32 array.
    const float e = static_cast<float>(std::exp(calculateShift(imageSeqLen, config)));
    for (int i = 0; i < steps; ++i) {
      const float t = base[i];
      const float r = 1.0f / t - 1.0f;
      sigmas_[i] = e / (e + r);
    }
  } else {
    const float s = static_cast<float>(config.shift);
    const float sm1 = static_cast<float>(config.shift - 1.0);
    for (int i = 0; i < steps; ++i) sigmas_[i] = s * base[i] / (1.0f + sm1 * base[i]);
  }
  timesteps_.resize(steps);
  const float scale = static_cast<float>(config.numTrainTimesteps);
  for (int i = 0; i < steps; ++i) timesteps_[i] = sigmas_[i] * scale;
  sigmas_.push_back(0.0f);
}

at::Tensor FlowMatchEulerScheduler::step(const at::Tensor& velocity, int index, const at::Tensor& sample) const {
  PARDIT_CHECK(index >= 0 && index < steps(), "scheduler step ", index, " out of range");
  // dt is a 0-dim float32 tensor, so dt * v is evaluated in v's dtype, exactly as the reference does.
  const at::Tensor sigma = at::scalar_tensor(sigmas_[index], at::TensorOptions().dtype(at::kFloat));
  const at::Tensor sigmaNext = at::scalar_tensor(sigmas_[index + 1], at::TensorOptions().dtype(at::kFloat));
  const at::Tensor dt = (sigmaNext - sigma).to(velocity.device());
  return (sample.to(at::kFloat) + dt * velocity).to(velocity.scalar_type());
}

}  // namespace pardit::pipeline
