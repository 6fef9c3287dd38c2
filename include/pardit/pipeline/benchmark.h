#pragma once
// Measurements behind `pardit bench`: the work of a FLUX forward, the machine's GEMM rate and a split of
// a forward's time into its GEMMs and attention calls timed alone. Engine::benchmark() runs the model.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <utility>

#include "pardit/model/flux_config.h"

namespace pardit::pipeline {

// FLOPs of one forward: every Linear (2*M*K*N) plus attention (QK^T and PV: 4*B*H*L^2*D).
double forwardFlops(const model::FluxConfig& config, int64_t batch, int64_t imageTokens, int64_t textTokens);

// Best-of-`reps` rate (FLOP/s) of an n x n x n matrix product in `dtype` on the CPU, with the current
// intra-op thread count.
double gemmRate(c10::ScalarType dtype, int64_t n = 1024, int reps = 5);

// Seconds of the forward's GEMMs alone (every Linear with its real shape, one layer's operands at a
// time, never a second copy of the model) and of its attention calls alone (best of 3).
std::pair<double, double> componentTimes(const model::FluxConfig& config, int64_t batch, int64_t imageTokens,
                                         int64_t textTokens, c10::ScalarType dtype, const c10::Device& device);

}  // namespace pardit::pipeline
