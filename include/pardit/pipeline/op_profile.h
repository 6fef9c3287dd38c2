#pragma once
// A profiler of ATen operators for `pardit bench --profile`: while an OpProfile lives, every top-level
// operator the constructing thread calls (an operator called from inside another one counts in its
// caller) is timed by wall clock and totalled by name. On the CPU this splits a forward into its
// operators exactly; CUDA work is asynchronous, so on a GPU the times are launch costs unless the
// caller synchronizes. One OpProfile at a time.

#include <cstdint>
#include <string>
#include <vector>

namespace pardit::pipeline {

class OpProfile {
 public:
  OpProfile();
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
  // The operator's class: "GEMM", "attention", "norm", "copy/layout", "elementwise" or "other".
  static std::string classOf(const std::string& name);

 private:
  uint64_t handle_ = 0;
};

}  // namespace pardit::pipeline
