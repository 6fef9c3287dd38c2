#include "pardit/pipeline/job_plan.h"

#include "pardit/core/error.h"
#include "pardit/io/checkpoint.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "rank_setup.h"

namespace pardit::pipeline {

JobPlan planJob(const config::EngineConfig& c) {
  JobPlan p;
  p.degrees = detail::degreesOf(c);
  p.worldSize = c.worldSize > 0 ? c.worldSize : p.degrees.worldSize();
  dist::Topology::validate(p.degrees, p.worldSize);
  PARDIT_CHECK(!c.deviceMemoryBudget.automatic,
               "pardit plan needs an explicit --device-memory-budget (e.g. 24GiB): it queries no device");
  p.dtype = resolveDtype(c.dtype, c10::Device(c10::kCUDA, 0));
  const io::FluxCheckpoint ck = io::FluxCheckpoint::open(c.model);  // headers only
  p.model = c.model;
  p.config = ck.config();
  p.checkpointBytes = ck.totalBytes();
  const LatentGeometry geom{c.height, c.width, 16};
  geom.validate();
  p.imageTokens = geom.tokens();
  const auto pf = detail::checkLayout(c, p.degrees, p.config, geom.tokenRows(), geom.tokenCols(), /*patched=*/true);
  if (pf) p.stages = pf->partition.describe(p.config);
  p.trueCfg = c.trueCfgScale > 1.0;
  const int64_t batch = c.batch * ((p.trueCfg && p.degrees.cfg == 1 && pf) ? 2 : 1);
  for (int r = 0; r < p.worldSize; ++r) {
    const dist::Topology topo(p.degrees, r);
    const auto w = detail::workloadOf(topo, p.config, pf, p.dtype, batch, geom.tokens(), c.textLen);
    p.ranks.push_back(memory::planRank(w, c.deviceMemoryBudget.bytes, c.offload));
    p.stageOf.push_back(topo.pipefusionRank());
    p.allFit &= p.ranks.back().fits;
  }
  return p;
}

}  // namespace pardit::pipeline
