#include "parallel_setup.h"

#include <ATen/ATen.h>

#include <functional>
#include <sstream>

#include "pardit/core/error.h"

namespace pardit::app {

dist::ParallelDegrees degreesOf(const config::EngineConfig& c) {
  dist::ParallelDegrees d;
  d.cfg = c.cfgDegree;
  d.ring = c.ringDegree;
  d.ulysses = c.ulyssesDegree;
  return d;
}

void checkConsistentOptions(dist::Runtime& rt, const config::EngineConfig& c) {
  if (rt.worldSize() == 1) return;
  std::ostringstream os;
  os << c.command << '|' << c.dtype << '|' << c.device << '|' << c.ulyssesDegree << '|' << c.ringDegree << '|'
     << c.cfgDegree << '|' << c.height << '|' << c.width << '|' << c.steps << '|' << c.guidanceScale << '|'
     << c.trueCfgScale << '|' << c.seed << '|' << c.schedule << '|' << c.negativePromptEmbeds.empty() << '|'
     << c.warmup << '|' << c.iters << '|' << c.batch << '|' << c.textLen;
  const int64_t h = static_cast<int64_t>(std::hash<std::string>{}(os.str()) & 0x3fffffffffffffffULL);
  at::Tensor lo = at::full({1}, h, at::kLong), hi = at::full({1}, h, at::kLong);
  rt.world().allReduce(lo, dist::ReduceOp::kMin);
  rt.world().allReduce(hi, dist::ReduceOp::kMax);
  PARDIT_CHECK(lo.item<int64_t>() == hi.item<int64_t>(),
               "the ranks were started with different options (degrees, size, steps, seed, dtype, ...); "
               "every rank must run the same command");
}

RankModel makeRankModel(dist::Runtime& rt, const model::FluxConfig& config,
                        std::shared_ptr<model::FluxWeightProvider> weights) {
  RankModel m;
  const auto& topo = rt.topology();
  if (topo.spDegree() == 1) {
    m.transformer = std::make_shared<model::FluxTransformer>(config, std::move(weights),
                                                             std::make_shared<model::LocalAttention>());
    m.fn = pipeline::localTransformer(m.transformer);
    return m;
  }
  m.usp = std::make_shared<parallel::UspAttention>(rt.group(dist::GroupKind::kUlysses), rt.group(dist::GroupKind::kRing));
  m.transformer = std::make_shared<model::FluxTransformer>(config, std::move(weights), m.usp);
  m.sp = std::make_shared<parallel::SequenceParallelTransformer>(m.transformer, m.usp,
                                                                 rt.group(dist::GroupKind::kSequence));
  m.fn = [sp = m.sp](const model::FluxInputs& in) { return sp->forward(in); };
  return m;
}

std::string collectiveSummary(const dist::Runtime& rt) {
  std::ostringstream os;
  bool first = true;
  for (const auto& [name, s] : rt.collectiveTotals()) {
    if (s.calls == 0) continue;
    os << (first ? "" : "; ") << name << ": " << s.calls << " calls, " << s.bytes << " bytes sent, " << s.seconds
       << " s";
    first = false;
  }
  return first ? "no communication" : os.str();
}

}  // namespace pardit::app
