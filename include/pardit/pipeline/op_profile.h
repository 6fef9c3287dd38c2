#pragma once
// A profiler of ATen operators for `pardit bench --profile`: while an OpProfile lives, every top-level
// operator the constructing thread calls (an operator called from inside another one counts in its
// caller) is timed and totalled by name. On the CPU by wall clock, which splits a forward into its
// operators exactly. On CUDA (asynchronous) by events recorded on the current stream around each operator,
// which then waits for them: an operator's time is its device time from an idle stream (the forward runs
// without overlap between operators while profiled). One OpProfile at a time.

#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pardit::pipeline {

class OpProfile {
 public:
  explicit OpProfile(const c10::Device& device = c10::kCPU);
  ~OpProfile();
  OpProfile(const OpProfile&) = delete;
  OpProfile& operator=(const OpProfile&) = delete;

  struct Op {
    std::string name;  // e.g. "aten::linear"
    int64_t calls = 0;
    double seconds = 0.0;
  };
  // Operators by total time, largest first.
  std::vector<Op> ops() const;
  // The operator's class: "GEMM", "attention", "norms/RoPE/modulation" (with pardit's fused passes),
  // "communication" (pardit's collectives and transfers), "copy/layout", "elementwise" or "other".
  static std::string classOf(const std::string& name);

 private:
  uint64_t handle_ = 0;
};

}  // namespace pardit::pipeline
