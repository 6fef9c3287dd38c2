#pragma once
// Flow-matching Euler scheduler with FLUX.1-dev's resolution-dependent ("dynamic") shift and
// schnell's plain schedule. Sigmas are computed with the same float32 arithmetic as diffusers'
// FluxPipeline + FlowMatchEulerDiscreteScheduler, so the two agree bit for bit.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace pardit::pipeline {

struct SchedulerConfig {
  bool dynamicShift = true;  // dev: true; schnell: false
  double shift = 1.0;        // static shift, used when dynamicShift is false
  double baseShift = 0.5;
  double maxShift = 1.15;
  int64_t baseSeqLen = 256;
  int64_t maxSeqLen = 4096;
  int64_t numTrainTimesteps = 1000;

  static SchedulerConfig dev() { return SchedulerConfig{}; }
  static SchedulerConfig schnell() {
    SchedulerConfig c;
    c.dynamicShift = false;
    return c;
  }
};

// mu of the dynamic shift for an image of `imageSeqLen` packed tokens (linear, not clamped).
double calculateShift(int64_t imageSeqLen, const SchedulerConfig& config);

class FlowMatchEulerScheduler {
 public:
  FlowMatchEulerScheduler(const SchedulerConfig& config, int steps, int64_t imageSeqLen);

  int steps() const { return static_cast<int>(timesteps_.size()); }
  // steps + 1 values, the last one 0.
  const std::vector<float>& sigmas() const { return sigmas_; }
  // sigma * numTrainTimesteps, one per step.
  const std::vector<float>& timesteps() const { return timesteps_; }
  // x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v, computed in float32 and returned in v's dtype.
  at::Tensor step(const at::Tensor& velocity, int index, const at::Tensor& sample) const;

 private:
  std::vector<float> sigmas_;
  std::vector<float> timesteps_;
};

}  // namespace pardit::pipeline
