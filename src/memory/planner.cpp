#include "pardit/memory/planner.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>

#include "pardit/core/error.h"
#include "pardit/core/format.h"
#include "pardit/model/fp8.h"

namespace pardit::memory {

uint64_t groupBytes(const model::FluxConfig& config, const std::string& group, c10::ScalarType dtype,
                    model::WeightFormat format) {
  for (const auto& g : model::fluxWeightGroups(config, format))
    if (g.name == group) return model::storedBytes(g.tensors, dtype);
  PARDIT_THROW("unknown weight group '", group, "'");
}

uint64_t groupBufferBytes(const model::FluxConfig& config, const std::string& group, c10::ScalarType dtype,
                          model::WeightFormat format) {
  for (const auto& g : model::fluxWeightGroups(config, format)) {
    if (g.name != group) continue;
    uint64_t n = 0;
    for (const auto& t : g.tensors)
      n += (model::storedBytes({t}, dtype) + kGroupAlignment - 1) / kGroupAlignment * kGroupAlignment;
    return n;
  }
  PARDIT_THROW("unknown weight group '", group, "'");
}

uint64_t activationEstimate(const RankWorkload& w) {
  // Live tensors at the peak of a single-stream block, per token: the residual stream and its modulated
  // copy (2h), linear1's output (3h + mlp), q/k/v after norm and RoPE (3h, plus float32 RoPE temporaries
  // 2h), the attention output (h), the GELU output (mlp) and linear2's input (h + mlp).
  const int64_t h = w.config.hiddenSize, mlp = w.config.mlpHidden;
  const int64_t perToken = 2 * h + (3 * h + mlp) + 3 * h + 2 * h + h + mlp + (h + mlp);
  const int64_t tokens = w.imageTokens + w.textTokens;
  // Plus a fixed allowance for the loop's own state and library scratch space (latents, embeddings,
  // RoPE tables, GEMM workspaces), measured at about 30 MB on the CPU.
  constexpr uint64_t kFixed = 32ULL << 20;
  return static_cast<uint64_t>(w.batch * tokens * perToken) * c10::elementSize(w.dtype) + kFixed;
}

uint64_t kvBufferEstimate(const RankWorkload& w) {
  if (w.imageTokensKv == 0) return 0;
  // K and V of the image tokens in the buffers (all heads: H/U heads x U sub-stripes), plus the text K/V.
  const int64_t h = w.config.hiddenSize;
  return static_cast<uint64_t>(w.kvLayers * 2 * w.batch * (w.imageTokensKv + w.textTokens / w.ulysses) * h) *
         c10::elementSize(w.dtype);
}

uint64_t commBufferEstimate(const RankWorkload& w) {
  const int64_t h = w.config.hiddenSize, tokens = w.imageTokens + w.textTokens;
  const uint64_t e = c10::elementSize(w.dtype);
  uint64_t bytes = 0;
  // Ulysses: q|k|v send and receive buffers and the output exchange.
  if (w.ulysses > 1) bytes = std::max<uint64_t>(bytes, static_cast<uint64_t>(2 * 4 * w.batch * tokens * h) * e);
  // Ring: the K/V block in use and the one arriving.
  if (w.ring > 1) {
    const int64_t kvTokens = std::max(tokens, w.imageTokensKv + w.textTokens);
    bytes += static_cast<uint64_t>(2 * 2 * w.batch * kvTokens * h) * e;
  }
  // PipeFusion: activations in flight to and from the neighbouring stages.
  if (w.pipefusion > 1) bytes += static_cast<uint64_t>(4 * w.batch * tokens * h) * e;
  return bytes;
}

RankPlan planRank(const RankWorkload& w, uint64_t budget, OffloadMode mode) {
  RankPlan plan;
  plan.budget = budget;
  plan.activationBytes = activationEstimate(w);
  plan.kvBytes = kvBufferEstimate(w);
  plan.commBytes = commBufferEstimate(w);
  for (const auto& g : w.groups)
    plan.groups.push_back({g, groupBytes(w.config, g, w.dtype, w.weightFormat), false,
                           groupBufferBytes(w.config, g, w.dtype, w.weightFormat)});
  auto isBlock = [](const std::string& n) {
    return n.rfind("double_blocks.", 0) == 0 || n.rfind("single_blocks.", 0) == 0;
  };
  auto recompute = [&] {
    plan.residentBytes = plan.streamedBytes = 0;
    uint64_t largest = 0;
    for (const auto& g : plan.groups) {
      (g.streamed ? plan.streamedBytes : plan.residentBytes) += g.bytes;
      if (g.streamed) largest = std::max(largest, g.bufferBytes);
    }
    plan.streamBufferBytes = static_cast<uint64_t>(plan.prefetchDepth + 1) * largest;
  };
  // Streaming order for auto: single blocks from the last, then double blocks from the last.
  std::vector<size_t> order;
  for (size_t i = plan.groups.size(); i-- > 0;)
    if (plan.groups[i].name.rfind("single_blocks.", 0) == 0) order.push_back(i);
  for (size_t i = plan.groups.size(); i-- > 0;)
    if (plan.groups[i].name.rfind("double_blocks.", 0) == 0) order.push_back(i);
  recompute();
  if (mode == OffloadMode::kSequential) {
    for (auto& g : plan.groups)
      if (isBlock(g.name)) g.streamed = true;
    recompute();
  } else if (mode == OffloadMode::kAuto) {
    for (size_t k = 0; k < order.size() && plan.total() > budget; ++k) {
      plan.groups[order[k]].streamed = true;
      recompute();
    }
  }
  // Deeper read-ahead while the budget has room for it (it evens out groups of unequal compute and size).
  if (plan.anyStreamed()) {
    const size_t streamedGroups = plan.streamedGroups();
    while (plan.prefetchDepth < kMaxPrefetchDepth && static_cast<size_t>(plan.prefetchDepth) + 1 < streamedGroups) {
      ++plan.prefetchDepth;
      recompute();
      if (plan.total() > budget) {
        --plan.prefetchDepth;
        recompute();
        break;
      }
    }
  }
  if (plan.total() > budget) {
    plan.fits = false;
    char line[512];
    if (mode == OffloadMode::kNone) {
      std::snprintf(line, sizeof(line),
                    "needs %s (weights %s + activations %s + K/V buffers %s + communication %s) but the budget is %s; "
                    "use --offload auto or a larger --device-memory-budget",
                    formatBytes(plan.total()).c_str(), formatBytes(plan.residentBytes).c_str(),
                    formatBytes(plan.activationBytes).c_str(), formatBytes(plan.kvBytes).c_str(),
                    formatBytes(plan.commBytes).c_str(), formatBytes(budget).c_str());
    } else {
      std::snprintf(line, sizeof(line),
                    "even streaming every block needs %s (resident %s + streaming buffers %s + activations %s + "
                    "K/V buffers %s + communication %s) but the budget is %s",
                    formatBytes(plan.total()).c_str(), formatBytes(plan.residentBytes).c_str(),
                    formatBytes(plan.streamBufferBytes).c_str(), formatBytes(plan.activationBytes).c_str(),
                    formatBytes(plan.kvBytes).c_str(), formatBytes(plan.commBytes).c_str(),
                    formatBytes(budget).c_str());
    }
    plan.problem = line;
    // When the activations alone exceed the budget, no offload helps: say what does.
    if (plan.activationBytes + plan.kvBytes + plan.commBytes >= budget)
      plan.problem += "; the activations of " + std::to_string(w.imageTokens) + " image + " +
                      std::to_string(w.textTokens) +
                      " text tokens per rank do not fit: use a smaller --height/--width or more ranks "
                      "(--ulysses-degree, --ring-degree, --pipefusion-degree)";
  }
  return plan;
}

}  // namespace pardit::memory

#include <fstream>
#include <sstream>
#if defined(PARDIT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace pardit::memory {

uint64_t hostAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t value = 0;
  std::string unit;
  while (in >> key >> value >> unit)
    if (key == "MemAvailable:") return value * 1024;
  return 0;
}

std::string MemoryBudget::str() const { return automatic ? "auto" : std::to_string(bytes); }

uint64_t hostBudget(const MemoryBudget& budget, int ranksOnNode) {
  if (!budget.automatic) return budget.bytes;
  const uint64_t share = hostAvailableBytes() / static_cast<uint64_t>(std::max(1, ranksOnNode));
  return share > kAutoHeadroomBytes ? share - kAutoHeadroomBytes : 0;
}

void chooseStreamSource(RankPlan& plan, StreamSource source, bool cuda, uint64_t hostBudget) {
  plan.streamFromHost = false;
  plan.hostBytes = 0;
  if (!plan.anyStreamed()) return;
  uint64_t copies = 0;  // the host copies: every streamed group's buffer
  for (const auto& g : plan.groups)
    if (g.streamed) copies += g.bufferBytes;
  const uint64_t fileBytes = cuda ? 2 * kStagingBytes : 0;
  switch (source) {
    case StreamSource::kHost:
      PARDIT_CHECK(copies <= hostBudget, "--stream-from host needs ", formatBytes(copies),
                   " of host memory for this rank's streamed weights, but --host-memory-budget is ",
                   formatBytes(hostBudget), ": use --stream-from file (or auto), or a larger --host-memory-budget");
      plan.streamFromHost = true;
      break;
    case StreamSource::kFile:
      plan.streamFromHost = false;
      break;
    case StreamSource::kAuto:
      plan.streamFromHost = cuda && copies <= hostBudget;
      break;
  }
  plan.hostBytes = plan.streamFromHost ? copies : fileBytes;
}

uint64_t autoBudget(bool cuda, int deviceIndex, int ranksOnNode) {
  uint64_t free = 0;
  if (cuda) {
#if defined(PARDIT_WITH_CUDA)
    size_t f = 0, total = 0;
    int previous = 0;
    auto check = [&](cudaError_t rc, const char* what) {
      PARDIT_CHECK(rc == cudaSuccess, "--device-memory-budget auto: ", what, " failed for device ", deviceIndex, ": ",
                   cudaGetErrorString(rc));
    };
    check(cudaGetDevice(&previous), "cudaGetDevice");
    check(cudaSetDevice(deviceIndex), "cudaSetDevice");
    check(cudaMemGetInfo(&f, &total), "cudaMemGetInfo");
    check(cudaSetDevice(previous), "cudaSetDevice");
    free = f;
#else
    PARDIT_THROW("--device-memory-budget auto: this build has no CUDA");
#endif
  } else {
    free = hostAvailableBytes() / static_cast<uint64_t>(std::max(1, ranksOnNode));
  }
  PARDIT_CHECK(free > kAutoHeadroomBytes, "--device-memory-budget auto: only ", formatBytes(free),
               " free, less than the ", formatBytes(kAutoHeadroomBytes), " headroom");
  return free - kAutoHeadroomBytes;
}

}  // namespace pardit::memory

#if defined(PARDIT_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace pardit::memory {
uint64_t devicePeakBytes(bool cuda, int deviceIndex) {
#if defined(PARDIT_WITH_CUDA)
  if (cuda) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(deviceIndex));
    return static_cast<uint64_t>(stats.allocated_bytes[0].peak);
  }
#endif
  return 0;
}
}  // namespace pardit::memory
