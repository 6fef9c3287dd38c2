#pragma once
// Splitting a loop over ATen's intra-op threads from pardit's own code.

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace pardit {

// Calls f(begin, end) on disjoint chunks that together cover [0, n) exactly once, on ATen's intra-op
// threads (at::set_num_threads): about n / threads indices per chunk, with no more chunks than n / grain
// (one call when n <= grain); serially inside another parallel region or with one thread. An exception
// thrown by f reaches the caller.
//
// Why not at::parallel_for: with LibTorch's OpenMP threading it is a header template whose parallel
// branch exists only in translation units compiled with OpenMP. pardit's are not (they would have to link
// LibTorch's own OpenMP runtime, and clang's OpenMP runtime differs), so there it silently runs on one
// thread. This runs the split inside LibTorch, on the threads its operators use.
void parallelFor(int64_t n, int64_t grain, c10::function_ref<void(int64_t, int64_t)> f);

}  // namespace pardit
