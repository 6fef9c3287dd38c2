#include "pardit/dist/comm_bench.h"

#include <ATen/ATen.h>

#include <functional>

#include "pardit/core/error.h"
#include "pardit/core/timer.h"
#include "pardit/dist/runtime.h"

namespace pardit::dist {

std::vector<CollectiveSample> benchmarkCollectives(Runtime& rt, const c10::Device& device, uint64_t maxBytes) {
  PARDIT_CHECK(rt.worldSize() >= 2, "bench --comm needs at least 2 ranks (run it under mpirun)");
  PARDIT_CHECK(maxBytes >= 1024, "--comm-max-bytes must be at least 1024");
  ParallelDegrees flat;
  flat.ulysses = rt.worldSize();
  rt.setTopology(flat, device);
  Communicator& comm = rt.group(GroupKind::kUlysses);  // all ranks, on the run's device
  const int n = comm.size();
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  auto timeIt = [&](const std::function<void()>& op, int iters) {
    for (int i = 0; i < 2; ++i) op();
    rt.world().barrier();
    Timer t;
    for (int i = 0; i < iters; ++i) op();
    at::Tensor s = at::tensor({t.seconds() / iters}, at::kDouble);
    rt.world().allReduce(s, ReduceOp::kMax);
    return s.item<double>();
  };
  std::vector<CollectiveSample> out;
  for (uint64_t bytes = 1024; bytes <= maxBytes; bytes *= 4) {
    const int64_t count = static_cast<int64_t>(bytes / 4 / n) * n;  // divisible by n
    const uint64_t actual = static_cast<uint64_t>(count) * 4;
    const int iters = bytes <= (1u << 20) ? 20 : 5;
    at::Tensor a = at::ones({n, count / n}, opts), b = at::empty_like(a);
    at::Tensor gin = at::ones({count / n}, opts), gout = at::empty({n, count / n}, opts);
    at::Tensor sin = at::ones({count}, opts), sout = at::empty_like(sin);
    const int next = (comm.rank() + 1) % n, prev = (comm.rank() + n - 1) % n;
    const double shareOfBus = static_cast<double>(n - 1) / n;
    auto add = [&](const char* op, double s, double busFactor) {
      out.push_back({actual, op, s, actual / s, actual / s * busFactor});
    };
    add("all_to_all", timeIt([&] { comm.allToAll(a, b); }, iters), shareOfBus);
    add("all_gather", timeIt([&] { comm.allGather(gin, gout); }, iters), shareOfBus);
    add("sendrecv", timeIt([&] { comm.sendRecv(sin, next, sout, prev)->wait(); }, iters), 1.0);
  }
  return out;
}

}  // namespace pardit::dist
