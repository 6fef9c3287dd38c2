#include "parallel_setup.h"

#include <ATen/ATen.h>

#include <functional>
#include <sstream>

#include "pardit/core/error.h"

namespace pardit::app {

dist::ParallelDegrees degreesOf(const config::EngineConfig& c) {
  dist::ParallelDegrees d;
  d.cfg = c.cfgDegree;
  d.pipefusion = c.pipefusionDegree;
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
     << c.warmup << '|' << c.iters << '|' << c.batch << '|' << c.textLen << '|' << c.pipefusionDegree << '|'
     << c.numPipelinePatch << '|' << c.warmupSteps << '|' << c.ppPartition;
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

PipeFusionSetup checkPipeFusion(const config::EngineConfig& c, const dist::ParallelDegrees& d,
                                const model::FluxConfig& mc, int64_t tokenRows, int64_t tokenCols, bool patched) {
  PipeFusionSetup s;
  PARDIT_CHECK(mc.numHeads % d.ulysses == 0, "--ulysses-degree ", d.ulysses, " does not divide the model's ",
               mc.numHeads, " attention heads");
  s.partition = parallel::partitionStages(mc, d.pipefusion, c.ppPartition);
  PARDIT_CHECK(c.numPipelinePatch >= 0, "--num-pipeline-patch must be >= 0, got ", c.numPipelinePatch);
  const int patches = !patched ? 1 : (c.numPipelinePatch > 0 ? c.numPipelinePatch : d.pipefusion);
  s.layout = parallel::PatchLayout{tokenRows, tokenCols, patches, d.spDegree(), 0};
  s.layout.check();
  PARDIT_CHECK(c.warmupSteps >= 0, "--warmup-steps must be >= 0, got ", c.warmupSteps);
  PARDIT_CHECK(patches == 1 || c.warmupSteps >= 1, "--num-pipeline-patch ", patches,
               " needs --warmup-steps >= 1 (the first step fills the K/V buffers)");
  s.warmupSteps = c.warmupSteps;
  return s;
}

std::unique_ptr<parallel::PipeFusionRunner> makePipeFusionRunner(dist::Runtime& rt, const model::FluxConfig& mc,
                                                                 std::shared_ptr<model::FluxWeightProvider> weights,
                                                                 const PipeFusionSetup& setup, const c10::Device& device) {
  auto usp = std::make_shared<parallel::UspAttention>(rt.group(dist::GroupKind::kUlysses), rt.group(dist::GroupKind::kRing));
  auto transformer = std::make_shared<model::FluxTransformer>(mc, std::move(weights), usp);
  parallel::PatchLayout layout = setup.layout;
  layout.spRank = rt.topology().spRank();
  parallel::PipeFusionComms comms;
  comms.pipeline = &rt.group(dist::GroupKind::kPipeFusion);
  comms.sequence = &rt.group(dist::GroupKind::kSequence);
  if (rt.topology().degrees().cfg > 1) comms.cfg = &rt.group(dist::GroupKind::kCfg);
  return std::make_unique<parallel::PipeFusionRunner>(transformer, usp, setup.partition,
                                                      rt.topology().pipefusionRank(), layout, comms, device);
}

memory::RankWorkload workloadOf(const dist::Topology& topo, const model::FluxConfig& mc,
                                const std::optional<PipeFusionSetup>& pf, c10::ScalarType dtype, int64_t batch,
                                int64_t imageTokens, int64_t textTokens) {
  memory::RankWorkload w;
  w.config = mc;
  w.dtype = dtype;
  w.batch = batch;
  const auto& d = topo.degrees();
  w.ulysses = d.ulysses;
  w.ring = d.ring;
  w.pipefusion = d.pipefusion;
  const int64_t sp = d.spDegree();
  if (pf) {
    const int stage = topo.pipefusionRank();
    w.groups = pf->partition.groupsOf(stage, mc);
    // Warm-up steps run all local tokens at once; the K/V buffers hold them for every layer of the stage.
    w.imageTokens = imageTokens / sp;
    w.imageTokensKv = imageTokens / sp;
    w.textTokens = textTokens;
    w.kvLayers = pf->partition.end(stage) - pf->partition.begin(stage);
  } else {
    for (const auto& g : model::fluxWeightGroups(mc)) w.groups.push_back(g.name);
    w.imageTokens = imageTokens / sp;
    w.textTokens = textTokens % sp == 0 ? textTokens / sp : textTokens;
  }
  return w;
}

memory::RankPlan planFor(const config::EngineConfig& c, const memory::RankWorkload& w, const c10::Device& device,
                         int ranksOnNode) {
  const memory::OffloadMode mode = memory::parseOffload(c.offload);
  const uint64_t budget = c.deviceMemoryBudget == "auto"
                              ? memory::autoBudget(device.is_cuda(), device.is_cuda() ? device.index() : 0, ranksOnNode)
                              : memory::parseSize(c.deviceMemoryBudget, "--device-memory-budget");
  return memory::planRank(w, budget, mode);
}

std::shared_ptr<model::FluxWeightProvider> loadPlannedWeights(const config::EngineConfig& c, const io::FluxCheckpoint& ck,
                                                              const memory::RankPlan& plan, c10::ScalarType dtype,
                                                              const c10::Device& device) {
  std::vector<std::string> groups;
  for (const auto& g : plan.groups) groups.push_back(g.name);
  if (!plan.anyStreamed()) return std::make_shared<model::ResidentFluxWeights>(ck.config(), ck.getter(dtype, device), groups);
  memory::StreamingOptions opts;
  PARDIT_CHECK(c.streamFrom == "auto" || c.streamFrom == "host" || c.streamFrom == "file",
               "--stream-from must be host, file or auto, got '", c.streamFrom, "'");
  if (c.streamFrom == "auto") {
    opts.hostCache = device.is_cuda() && plan.streamedBytes < memory::hostAvailableBytes() / 2;
  } else {
    opts.hostCache = c.streamFrom == "host";
  }
  return std::make_shared<memory::StreamingFluxWeights>(ck.config(), ck.getter(dtype, c10::kCPU), plan, device, opts);
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
