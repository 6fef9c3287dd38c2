#pragma once
// Collective micro-benchmark (`pardit bench --comm`) over every rank of the job: all-to-all, all-gather
// and the ring send/recv at message sizes from 1 KiB growing x4 up to a maximum. Each size is timed after
// warm-up and the slowest rank's time counts. Bandwidths follow nccl-tests: algbw = bytes / time;
// busbw = algbw * (n - 1) / n for all-to-all and all-gather (bytes = the whole buffer), busbw = algbw for
// the ring send/recv (bytes = what each rank sends).

#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pardit::dist {

class Runtime;

struct CollectiveSample {
  uint64_t bytes = 0;
  std::string op;                                  // all_to_all | all_gather | sendrecv
  double seconds = 0.0, algbw = 0.0, busbw = 0.0;  // bandwidths in bytes/s
};

// Sets a flat topology (every rank in one Ulysses group) on `device`. Collective over the world.
std::vector<CollectiveSample> benchmarkCollectives(Runtime& rt, const c10::Device& device, uint64_t maxBytes);

}  // namespace pardit::dist
