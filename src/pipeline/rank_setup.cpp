#include "rank_setup.h"

#include <ATen/ATen.h>

#include <tuple>

#include "pardit/core/error.h"
#include "pardit/memory/streamer.h"

namespace pardit::pipeline::detail {

std::optional<PipeFusionLayout> checkLayout(const EngineOptions& c, const dist::ParallelDegrees& d,
                                            const model::FluxConfig& mc, int64_t tokenRows, int64_t tokenCols,
                                            bool patched) {
  if (d.pipefusion == 1) {
    parallel::checkSequenceParallel(d, mc.numHeads, tokenRows * tokenCols);
    return std::nullopt;
  }
  PARDIT_CHECK(mc.numHeads % d.ulysses == 0, "--ulysses-degree ", d.ulysses, " does not divide the model's ",
               mc.numHeads, " attention heads");
  PipeFusionLayout s;
  s.partition = parallel::partitionStages(mc, d.pipefusion, c.ppPartition);
  const int patches = !patched ? 1 : (c.numPipelinePatch > 0 ? c.numPipelinePatch : d.pipefusion);
  s.layout = parallel::PatchLayout{tokenRows, tokenCols, patches, d.spDegree(), 0};
  s.layout.check();
  PARDIT_CHECK(patches == 1 || c.warmupSteps >= 1, "--num-pipeline-patch ", patches,
               " needs --warmup-steps >= 1 (the first step fills the K/V buffers)");
  s.warmupSteps = c.warmupSteps;
  return s;
}

memory::RankWorkload workloadOf(const dist::Topology& topo, const model::FluxConfig& mc,
                                const std::optional<PipeFusionLayout>& pf, c10::ScalarType dtype,
                                model::WeightFormat format, int64_t batch, int64_t imageTokens, int64_t textTokens) {
  memory::RankWorkload w;
  w.config = mc;
  w.dtype = dtype;
  w.weightFormat = format;
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

uint64_t budgetOf(const EngineOptions& c, const c10::Device& device, int ranksOnNode) {
  if (!c.deviceMemoryBudget.automatic) return c.deviceMemoryBudget.bytes;
  return memory::autoBudget(device.is_cuda(), device.is_cuda() ? device.index() : 0, ranksOnNode);
}

uint64_t hostBudgetOf(const EngineOptions& c, int ranksOnNode) {
  return memory::hostBudget(c.hostMemoryBudget, ranksOnNode);
}

std::shared_ptr<model::FluxWeightProvider> loadPlannedWeights(const model::FluxConfig& mc, const TensorReader& read,
                                                              const io::FluxCheckpoint* checkpoint,
                                                              const memory::RankPlan& plan, c10::ScalarType dtype,
                                                              model::WeightFormat format, const c10::Device& device) {
  std::vector<std::string> groups;
  for (const auto& g : plan.groups) groups.push_back(g.name);
  if (!plan.anyStreamed())
    return std::make_shared<model::ResidentFluxWeights>(
        mc, [&](const std::string& n) { return read(n, dtype, device); }, groups);
  memory::StreamingOptions opts;
  opts.format = format;
  opts.dtype = dtype;
  opts.hostCache = plan.streamFromHost;
  opts.prefetchDepth = plan.prefetchDepth;
  if (checkpoint)
    opts.stored = [checkpoint](const std::string& n, c10::ScalarType t) {
      return checkpoint->has(n) ? checkpoint->storedRanges(n, t) : std::vector<io::StoredRange>{};
    };
  return std::make_shared<memory::StreamingFluxWeights>(
      mc, [read, dtype](const std::string& n) { return read(n, dtype, c10::kCPU); }, plan, device, opts);
}

RankModel makeRankModel(dist::Runtime& rt, const model::FluxConfig& mc,
                        std::shared_ptr<model::FluxWeightProvider> weights, bool cudaGraphs,
                        model::AttentionKernel attention) {
  RankModel m;
  if (rt.topology().spDegree() == 1) {
    m.transformer = std::make_shared<model::FluxTransformer>(mc, std::move(weights),
                                                             std::make_shared<model::LocalAttention>(attention));
    m.fn = localTransformer(m.transformer);
    if (cudaGraphs) std::tie(m.fn, m.graphs) = cudaGraphed(m.fn);
    return m;
  }
  PARDIT_CHECK(!cudaGraphs, "--cuda-graphs cannot capture a transformer call split over a sequence-parallel group");
  m.usp = std::make_shared<parallel::UspAttention>(rt.group(dist::GroupKind::kUlysses),
                                                   rt.group(dist::GroupKind::kRing), attention);
  m.transformer = std::make_shared<model::FluxTransformer>(mc, std::move(weights), m.usp);
  m.sp = std::make_shared<parallel::SequenceParallelTransformer>(m.transformer, m.usp,
                                                                 rt.group(dist::GroupKind::kSequence));
  m.fn = [sp = m.sp](const model::FluxInputs& in) { return sp->forward(in); };
  return m;
}

model::AttentionKernel attentionKernelOf(Attention attention) {
  switch (attention) {
    case Attention::kAuto:
      return model::AttentionKernel::kAuto;
    case Attention::kFlash:
      return model::AttentionKernel::kFlash;
    case Attention::kEfficient:
      return model::AttentionKernel::kEfficient;
    case Attention::kCudnn:
      return model::AttentionKernel::kCudnn;
    case Attention::kMath:
      return model::AttentionKernel::kMath;
  }
  return model::AttentionKernel::kAuto;
}

void checkCudaGraphs(const c10::Device& device, const dist::Topology& topo, bool pipefusion,
                     const memory::RankPlan& plan) {
  PARDIT_CHECK(device.is_cuda(), "--cuda-graphs captures the transformer on a GPU, but this rank runs on ",
               device.str(), " (use --device cuda, or drop --cuda-graphs)");
  PARDIT_CHECK(cudaGraphsBuilt(), "--cuda-graphs needs a build with CUDA (LibTorch with CUDA); this one has none");
  PARDIT_CHECK(topo.spDegree() == 1 && !pipefusion,
               "--cuda-graphs captures one GPU's whole transformer call: it cannot be combined with "
               "--ulysses-degree, --ring-degree or --pipefusion-degree > 1, whose communication runs inside the "
               "call (--cfg-degree 2 can: its exchange is outside)");
  PARDIT_CHECK(!plan.anyStreamed(), "--cuda-graphs needs every weight resident, but this rank's plan streams ",
               plan.streamedGroups(),
               " weight groups: use a larger --device-memory-budget, --weight-dtype fp8, or "
               "drop --cuda-graphs");
}

std::shared_ptr<parallel::PipeFusionRunner> makePipeFusionRunner(dist::Runtime& rt, const model::FluxConfig& mc,
                                                                 std::shared_ptr<model::FluxWeightProvider> weights,
                                                                 const PipeFusionLayout& pf, const c10::Device& device,
                                                                 model::AttentionKernel attention) {
  auto usp = std::make_shared<parallel::UspAttention>(rt.group(dist::GroupKind::kUlysses),
                                                      rt.group(dist::GroupKind::kRing), attention);
  auto transformer = std::make_shared<model::FluxTransformer>(mc, std::move(weights), usp);
  parallel::PipeFusionOptions options;
  options.partition = pf.partition;
  options.stage = rt.topology().pipefusionRank();
  options.layout = pf.layout;
  options.layout.spRank = rt.topology().spRank();
  options.device = device;
  parallel::PipeFusionComms comms{&rt.group(dist::GroupKind::kPipeFusion), &rt.group(dist::GroupKind::kSequence),
                                  &rt.pipelineReturn()};
  return std::make_shared<parallel::PipeFusionRunner>(transformer, usp, options, comms);
}

model::WeightFormat t5WeightFormat(WeightDtype weightDtype, const io::T5Checkpoint& t5) {
  if (weightDtype == WeightDtype::kFp8) return model::WeightFormat::kFp8;
  if (weightDtype == WeightDtype::kCompute) return model::WeightFormat::kDense;
  return t5.storedFormat();
}

double worldReduce(dist::Runtime& rt, double v, dist::ReduceOp op) {
  at::Tensor t = at::tensor({v}, at::kDouble);
  rt.world().allReduce(t, op);
  return t.item<double>();
}

}  // namespace pardit::pipeline::detail
