#pragma once
#include <cstdint>

namespace pardit {
// Peak resident set size of this process so far, in bytes.
uint64_t peakRssBytes();
// Current resident set size of this process, in bytes.
uint64_t currentRssBytes();
// Returns the allocator's free memory to the system (glibc malloc_trim).
void releaseFreedMemory();

// glibc malloc's two settings for the engine's two kinds of work. While loading weights, every block of
// 1 MiB or more gets its own mapping, so a freed read or conversion buffer leaves RSS at once instead of
// staying on the heap (the memory proofs hold peak RSS to the plan). While computing, blocks up to
// 32 MiB come from the heap and are reused from step to step without page faults (a CPU forward with
// every temporary mapped anew spends ~18% of its time faulting pages in). A scope loads; leaving it
// returns to computing and releases what the load freed.
class LoadingAllocations {
 public:
  LoadingAllocations();
  ~LoadingAllocations();
  LoadingAllocations(const LoadingAllocations&) = delete;
  LoadingAllocations& operator=(const LoadingAllocations&) = delete;
};
}  // namespace pardit
