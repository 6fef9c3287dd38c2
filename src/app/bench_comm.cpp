// pardit bench --comm: collective micro-benchmark over the world communicator. Sizes double from 1 KiB;
// each size is timed after warm-up and the slowest rank's time counts. Bandwidths follow nccl-tests:
// algbw = bytes / time; busbw = algbw * (n - 1) / n for all-to-all and all-gather (bytes = the whole
// buffer), busbw = algbw for the ring send/recv (bytes = what each rank sends).
#include <ATen/ATen.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/version.h"

namespace pardit::app {

int runCommBench(const config::EngineConfig& c, dist::Runtime& rt) {
  c10::Device device = c10::kCPU;
  rt.agree([&] {
    PARDIT_CHECK(rt.worldSize() >= 2, "bench --comm needs at least 2 ranks (run it under mpirun)");
    PARDIT_CHECK(c.commMaxBytes >= 1024, "--comm-max-bytes must be at least 1024");
    device = dist::deviceForRank(c.device, rt.localRank());
  });
  dist::ParallelDegrees flat;
  flat.ulysses = rt.worldSize();
  rt.setTopology(flat, device);
  dist::Communicator& comm = rt.group(dist::GroupKind::kUlysses);  // all ranks, on the run's device
  const int n = comm.size();
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  logInfo0("collectives over ", n, " ranks (", comm.backend(), ", ", device.str(), "); times are the slowest rank's");
  logInfo0("      bytes  op            time_us  algbw_GB/s  busbw_GB/s");
  auto timeIt = [&](const std::function<void()>& op, int iters) {
    for (int i = 0; i < 2; ++i) op();
    rt.world().barrier();
    Timer t;
    for (int i = 0; i < iters; ++i) op();
    at::Tensor s = at::tensor({t.seconds() / iters}, at::kDouble);
    rt.world().allReduce(s, dist::ReduceOp::kMax);
    return s.item<double>();
  };
  for (uint64_t bytes = 1024; bytes <= c.commMaxBytes; bytes *= 4) {
    const int64_t count = static_cast<int64_t>(bytes / 4 / n) * n;  // divisible by n
    const uint64_t actual = static_cast<uint64_t>(count) * 4;
    const int iters = bytes <= (1u << 20) ? 20 : 5;
    at::Tensor a = at::ones({n, count / n}, opts), b = at::empty_like(a);
    at::Tensor gin = at::ones({count / n}, opts), gout = at::empty({n, count / n}, opts);
    at::Tensor sin = at::ones({count}, opts), sout = at::empty_like(sin);
    const int next = (comm.rank() + 1) % n, prev = (comm.rank() + n - 1) % n;
    struct Row {
      const char* op;
      double seconds, algbw, busbw;
    };
    std::vector<Row> rows;
    double s = timeIt([&] { comm.allToAll(a, b); }, iters);
    rows.push_back({"all_to_all", s, actual / s / 1e9, actual / s / 1e9 * (n - 1) / n});
    s = timeIt([&] { comm.allGather(gin, gout); }, iters);
    rows.push_back({"all_gather", s, actual / s / 1e9, actual / s / 1e9 * (n - 1) / n});
    s = timeIt([&] { comm.sendRecv(sin, next, sout, prev)->wait(); }, iters);
    rows.push_back({"sendrecv", s, actual / s / 1e9, actual / s / 1e9});
    for (const auto& r : rows) {
      char line[160];
      std::snprintf(line, sizeof(line), "%11llu  %-12s %9.1f  %10.3f  %10.3f", static_cast<unsigned long long>(actual),
                    r.op, r.seconds * 1e6, r.algbw, r.busbw);
      logInfo0(line);
      results.push_back({{"bytes", actual}, {"op", r.op}, {"time_s", r.seconds}, {"algbw_GBps", r.algbw},
                         {"busbw_GBps", r.busbw}});
    }
  }
  if (!c.benchOutput.empty()) {
    rt.agree([&] {
      if (rt.worldRank() != 0) return;
      nlohmann::ordered_json j;
      j["tool"] = "pardit bench --comm";
      j["commit"] = PARDIT_GIT_COMMIT;
      j["ranks"] = n;
      j["backend"] = comm.backend();
      j["device"] = device.str();
      j["results"] = results;
      std::ofstream out(c.benchOutput);
      PARDIT_CHECK(out.good(), c.benchOutput, ": cannot write (--output)");
      out << j.dump(2) << "\n";
    });
  }
  return 0;
}

}  // namespace pardit::app
