#pragma once
// Measurements behind `pardit bench`: the work of a FLUX forward, the machine's GEMM rate and a split of
// a forward's time into its GEMMs and attention calls timed alone. Engine::benchmark() runs the model.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <utility>

#include "pardit/model/attention.h"
#include "pardit/model/flux_config.h"

namespace pardit::pipeline {

// FLOPs of one forward: every Linear (2*M*K*N) plus attention (QK^T and PV: 4*B*H*L^2*D).
double forwardFlops(const model::FluxConfig& config, int64_t batch, int64_t imageTokens, int64_t textTokens);

// The matrix size of gemmRate() on a device: 1024 on the CPU, 8192 on CUDA (large enough to fill a GPU).
int64_t gemmRateSize(const c10::Device& device);
// Best-of-`reps` rate (FLOP/s) of an n x n x n matrix product in `dtype` on `device` (n = gemmRateSize;
// the CPU with the current intra-op thread count; CUDA timed with events).
double gemmRate(c10::ScalarType dtype, const c10::Device& device = c10::kCPU, int reps = 5);

// Seconds of the forward's GEMMs alone (every Linear with its real shape, one layer's operands at a
// time, never a second copy of the model) and of its attention calls alone with `kernel`, on q/k/v laid out
// as the forward lays them out (token-major) (best of 3; CUDA timed with events on the stream, the CPU with
// the wall clock).
std::pair<double, double> componentTimes(const model::FluxConfig& config, int64_t batch, int64_t imageTokens,
                                         int64_t textTokens, c10::ScalarType dtype, const c10::Device& device,
                                         model::AttentionKernel kernel = model::AttentionKernel::kAuto);

// The attention kernel the forward's attention runs on a rank: `kernel` unless auto, else auto's pick for
// the rank's q/k/v (token-major memory, `heads` heads: the model's over the Ulysses degree) with the
// log-sum-exp when `ring` (Ring attention's blocks need it).
model::AttentionKernel forwardAttentionKernel(const model::FluxConfig& config, int64_t batch, int64_t heads, bool ring,
                                              c10::ScalarType dtype, const c10::Device& device,
                                              model::AttentionKernel kernel);

}  // namespace pardit::pipeline
