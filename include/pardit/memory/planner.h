#pragma once
// Per-rank memory plan, from the checkpoint headers alone: which weight groups stay resident on the
// device and which are streamed in just before use, so that resident weights + streaming buffers +
// activations + PipeFusion K/V buffers + communication buffers fit the device memory budget.

#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "pardit/model/flux_config.h"

namespace pardit::memory {

// --offload: none keeps every group resident (a plan that does not fit is an error); auto streams what does
// not fit; sequential streams every block.
enum class Offload { kNone, kAuto, kSequential };
using OffloadMode = Offload;
// --stream-from: where streamed groups come from (chooseStreamSource).
enum class StreamSource { kAuto, kHost, kFile };
// --device-memory-budget and --host-memory-budget: "auto" (what is free, less headroom) or a size in bytes.
struct MemoryBudget {
  bool automatic = true;
  uint64_t bytes = 0;
  std::string str() const;  // "auto" or the bytes
  bool operator==(const MemoryBudget& o) const { return automatic == o.automatic && bytes == o.bytes; }
};

// Headroom left free by --device-memory-budget auto (allocator fragmentation, library workspaces).
constexpr uint64_t kAutoHeadroomBytes = 1ULL << 30;
// A streamed group is one buffer with its tensors at offsets aligned to this (memory/streamer.h).
constexpr uint64_t kGroupAlignment = 256;
// Streaming from the file on CUDA: each of the two pinned staging buffers.
constexpr uint64_t kStagingBytes = 64ULL << 20;
// Streamed groups fetched ahead of the one in use, at most (more when the budget leaves room).
constexpr int kMaxPrefetchDepth = 3;

// What one rank runs, for the estimates.
struct RankWorkload {
  model::FluxConfig config;
  std::vector<std::string> groups;  // weight groups this rank holds (all, or its PipeFusion stage's)
  c10::ScalarType dtype = c10::kBFloat16;
  model::WeightFormat weightFormat = model::WeightFormat::kDense;  // FP8 block weights: 1 byte + row scales
  int64_t batch = 1;          // transformer batch on this rank (2x with true CFG on one rank)
  int64_t imageTokens = 0;    // image tokens this rank computes at once (its shard or patch)
  int64_t imageTokensKv = 0;  // image tokens in its PipeFusion K/V buffers (0 without PipeFusion)
  int64_t textTokens = 0;
  int64_t ulysses = 1, ring = 1, pipefusion = 1;
  int64_t kvLayers = 0;  // attention layers with K/V buffers on this rank
};

struct GroupPlan {
  std::string name;
  uint64_t bytes = 0;
  bool streamed = false;
  uint64_t bufferBytes = 0;  // as one streamed buffer (groupBufferBytes)
};

struct RankPlan {
  std::vector<GroupPlan> groups;
  uint64_t residentBytes = 0, streamedBytes = 0;
  uint64_t streamBufferBytes = 0;  // room for the group in use and the ones being prefetched
  int prefetchDepth = 1;           // streamed groups fetched ahead of the one in use
  // Where streamed groups come from (chooseStreamSource) and the host memory that takes.
  bool streamFromHost = false;
  uint64_t hostBytes = 0;
  uint64_t activationBytes = 0, kvBytes = 0, commBytes = 0;
  uint64_t budget = 0;
  bool fits = true;
  std::string problem;  // one line when it does not fit

  uint64_t total() const { return residentBytes + streamBufferBytes + activationBytes + kvBytes + commBytes; }
  bool anyStreamed() const { return streamedBytes > 0; }
  size_t streamedGroups() const {
    size_t n = 0;
    for (const auto& g : groups) n += g.streamed;
    return n;
  }
};

// Bytes of a weight group on the device: compute-dtype tensors, FP8 values (1 byte) and float32 scales.
uint64_t groupBytes(const model::FluxConfig& config, const std::string& group, c10::ScalarType dtype,
                    model::WeightFormat format = model::WeightFormat::kDense);
// Bytes of a streamed group's buffer: its tensors at kGroupAlignment-aligned offsets.
uint64_t groupBufferBytes(const model::FluxConfig& config, const std::string& group, c10::ScalarType dtype,
                          model::WeightFormat format = model::WeightFormat::kDense);
uint64_t activationEstimate(const RankWorkload& w);
uint64_t kvBufferEstimate(const RankWorkload& w);
uint64_t commBufferEstimate(const RankWorkload& w);

// The plan. kAuto keeps resident first what is hardest to hide when streamed (the embedders and final
// layer, then double blocks, which carry 2.4x the bytes of a single block for the same compute) and
// streams single blocks first, then double blocks, until the budget holds. kSequential streams every
// block. kNone streams nothing. With streamed groups, the prefetch depth grows (up to kMaxPrefetchDepth)
// while the budget has room for another group buffer.
RankPlan planRank(const RankWorkload& workload, uint64_t budget, OffloadMode mode);

// Where a plan's streamed groups come from (--stream-from) under --host-memory-budget: host copies of
// them all (pinned on CUDA), or the checkpoint file (CUDA: two pinned staging buffers; the CPU reads into
// the stream buffers the device budget already holds). auto: the host on CUDA when the copies fit the
// host budget, else the file. An explicit host source beyond the host budget is an error naming both.
void chooseStreamSource(RankPlan& plan, StreamSource source, bool cuda, uint64_t hostBudget);

}  // namespace pardit::memory

namespace pardit::memory {
// Bytes available to one rank for --device-memory-budget auto: free device memory (CUDA) or available
// host memory shared by the node's ranks (CPU), minus kAutoHeadroomBytes.
uint64_t autoBudget(bool cuda, int deviceIndex, int ranksOnNode);
// Available host memory (MemAvailable), in bytes.
uint64_t hostAvailableBytes();
// --host-memory-budget resolved: a size, or auto: available host memory shared by the node's ranks, minus
// kAutoHeadroomBytes (0 when less is available).
uint64_t hostBudget(const MemoryBudget& budget, int ranksOnNode);
}  // namespace pardit::memory

namespace pardit::memory {
// Peak bytes allocated on a CUDA device by the caching allocator (0 for the CPU).
uint64_t devicePeakBytes(bool cuda, int deviceIndex);
}  // namespace pardit::memory
