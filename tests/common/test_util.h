#pragma once
// Helpers shared by the unit tests.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "pardit/io/safetensors.h"
#include "pardit/memory/planner.h"
#include "pardit/model/flux.h"

// The first statement of a CUDA test (suite names start with "Cuda", CTest label gpu): skips it, visibly,
// where LibTorch has no CUDA device.
#define PARDIT_REQUIRE_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device (LibTorch sees none)"

namespace pardit::test {

// A file of tests/fixtures (the environment's PARDIT_FIXTURE_DIR first: the test binary run from a bundle).
inline std::string fixture(const std::string& rel) {
  const char* dir = std::getenv("PARDIT_FIXTURE_DIR");
  return std::string(dir && *dir ? dir : PARDIT_FIXTURE_DIR) + "/" + rel;
}

// A fresh directory under the system temp dir, removed by the destructor.
// ATen's intra-op thread count set for one scope (at::set_num_threads), restored after it.
class ThreadCount {
 public:
  explicit ThreadCount(int n) : before_(at::get_num_threads()) { at::set_num_threads(n); }
  ~ThreadCount() { at::set_num_threads(before_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int before_;
};

class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// The same inputs on another device.
model::FluxInputs inputsOn(const model::FluxInputs& in, const c10::Device& device);

// A transformer call's inputs from a fixture written by tests/reference (hidden_states,
// encoder_hidden_states, pooled_projections and guidance in `dtype`; timestep and position ids as stored).
model::FluxInputs fixtureInputs(const io::SafetensorsFile& f, at::ScalarType dtype);

// One rank holding every weight group of `c` (no parallelism), for the planner and streamer tests.
memory::RankWorkload wholeModel(const model::FluxConfig& c, c10::ScalarType dtype, int64_t imageTokens,
                                int64_t textTokens, model::WeightFormat format = model::WeightFormat::kDense);

// max |a - b| / max |b|
double maxRelError(const at::Tensor& a, const at::Tensor& b);

// Whether this binary was built with AddressSanitizer (gcc's and clang's ways of saying so).
constexpr bool underAddressSanitizer() {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  return true;
#else
  return false;
#endif
#else
  return false;
#endif
}

struct CommandResult {
  int exitCode = -1;
  std::string output;  // stdout and stderr
};
// Runs a shell command line, capturing stdout and stderr together.
CommandResult runCommand(const std::string& commandLine);
// Runs the pardit executable (the environment's PARDIT_BINARY first, else the build's) with the given
// arguments (a shell-quoted string).
CommandResult runPardit(const std::string& args);

}  // namespace pardit::test
