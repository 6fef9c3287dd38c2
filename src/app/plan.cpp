// pardit plan: every rank's memory plan from the checkpoint headers alone (no MPI job, no weight data).
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "pardit/core/dtype.h"
#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/pipeline/latents.h"
#include "parallel_setup.h"

namespace pardit::app {

int runPlan(const config::EngineConfig& c) {
  PARDIT_CHECK(!c.model.empty(), "--model is required");
  PARDIT_CHECK(c.worldSize >= 1, "--world-size must be >= 1");
  const dist::ParallelDegrees degrees = degreesOf(c);
  dist::Topology::validate(degrees, c.worldSize);
  PARDIT_CHECK(c.deviceMemoryBudget != "auto",
               "pardit plan needs an explicit --device-memory-budget (e.g. 24GiB): it queries no device");
  const c10::ScalarType dtype = c.dtype == "auto" ? c10::kBFloat16 : parseDtype(c.dtype);
  const io::FluxCheckpoint ck = io::FluxCheckpoint::open(c.model);  // headers only
  const auto& mc = ck.config();
  pipeline::LatentGeometry geom{c.height, c.width, 16};
  geom.validate();
  PARDIT_CHECK(c.batch >= 1, "--batch must be >= 1");
  std::optional<PipeFusionSetup> pf;
  if (degrees.pipefusion > 1) {
    pf = checkPipeFusion(c, degrees, mc, geom.tokenRows(), geom.tokenCols(), /*patched=*/true);
  } else {
    parallel::checkSequenceParallel(degrees, mc.numHeads, geom.tokens());
  }
  const bool trueCfg = c.trueCfgScale > 1.0;
  const int64_t batch = c.batch * ((trueCfg && degrees.cfg == 1 && pf) ? 2 : 1);
  nlohmann::ordered_json out;
  out["model"] = c.model;
  out["config"] = mc.describe();
  out["checkpoint_bytes"] = ck.totalBytes();
  out["dtype"] = dtypeName(dtype);
  out["world_size"] = c.worldSize;
  out["degrees"] = {{"cfg", degrees.cfg}, {"pipefusion", degrees.pipefusion}, {"ring", degrees.ring},
                    {"ulysses", degrees.ulysses}};
  out["image"] = {{"height", c.height}, {"width", c.width}, {"tokens", geom.tokens()}, {"text_tokens", c.textLen}};
  out["offload"] = c.offload;
  if (pf) out["stages"] = pf->partition.describe(mc);
  nlohmann::ordered_json ranks = nlohmann::ordered_json::array();
  bool allFit = true;
  std::vector<memory::RankPlan> plans;
  for (int r = 0; r < c.worldSize; ++r) {
    const dist::Topology topo(degrees, r);
    const auto w = workloadOf(topo, mc, pf, dtype, batch, geom.tokens(), c.textLen);
    memory::RankPlan plan = memory::planRank(w, memory::parseSize(c.deviceMemoryBudget, "--device-memory-budget"),
                                             memory::parseOffload(c.offload));
    allFit &= plan.fits;
    nlohmann::ordered_json j;
    j["rank"] = r;
    j["stage"] = topo.pipefusionRank();
    size_t streamed = 0;
    for (const auto& g : plan.groups) streamed += g.streamed;
    j["groups"] = plan.groups.size();
    j["streamed_groups"] = streamed;
    j["resident_bytes"] = plan.residentBytes;
    j["streamed_bytes"] = plan.streamedBytes;
    j["stream_buffer_bytes"] = plan.streamBufferBytes;
    j["activation_bytes"] = plan.activationBytes;
    j["kv_buffer_bytes"] = plan.kvBytes;
    j["comm_buffer_bytes"] = plan.commBytes;
    j["total_bytes"] = plan.total();
    j["budget_bytes"] = plan.budget;
    j["fits"] = plan.fits;
    if (!plan.fits) j["problem"] = plan.problem;
    ranks.push_back(j);
    plans.push_back(plan);
  }
  out["ranks"] = ranks;
  if (c.json) {
    std::cout << out.dump(2) << std::endl;
  } else {
    std::printf("model %s: %s, %.3f GiB of weights (%s)\n", c.model.c_str(), mc.describe().c_str(),
                ck.totalBytes() / double(1ULL << 30), dtypeName(dtype).c_str());
    std::printf("%d rank(s): %s; %lldx%lld px (%lld image + %lld text tokens), batch %lld%s; offload %s\n",
                c.worldSize, degrees.describe().c_str(), static_cast<long long>(c.width),
                static_cast<long long>(c.height), static_cast<long long>(geom.tokens()),
                static_cast<long long>(c.textLen), static_cast<long long>(c.batch), trueCfg ? ", true CFG" : "",
                c.offload.c_str());
    if (pf) std::printf("stages: %s\n", pf->partition.describe(mc).c_str());
    std::printf("%4s %5s %8s %11s %11s %10s %11s %10s %10s %11s %11s  %s\n", "rank", "stage", "streamed", "resident",
                "streamed", "stream_buf", "activations", "kv_buffers", "comm_buf", "total", "budget", "fits");
    auto g = [](uint64_t b) { return b / double(1ULL << 30); };
    for (size_t r = 0; r < plans.size(); ++r) {
      const auto& p = plans[r];
      size_t streamed = 0;
      for (const auto& x : p.groups) streamed += x.streamed;
      std::printf("%4zu %5d %4zu/%-3zu %9.3fGiB %9.3fGiB %8.3fGiB %9.3fGiB %8.3fGiB %8.3fGiB %9.3fGiB %9.3fGiB  %s\n", r,
                  dist::Topology(degrees, static_cast<int>(r)).pipefusionRank(), streamed, p.groups.size(),
                  g(p.residentBytes), g(p.streamedBytes), g(p.streamBufferBytes), g(p.activationBytes), g(p.kvBytes),
                  g(p.commBytes), g(p.total()), g(p.budget), p.fits ? "yes" : "NO");
    }
    for (size_t r = 0; r < plans.size(); ++r)
      if (!plans[r].fits) std::printf("rank %zu: %s\n", r, plans[r].problem.c_str());
  }
  return allFit ? 0 : 1;
}

}  // namespace pardit::app
