#pragma once
// Shared by the commands: the parallel layout of a run and the transformer function of this rank.
#include <memory>
#include <optional>
#include <string>

#include "pardit/config/config.h"
#include "pardit/dist/runtime.h"
#include "pardit/model/flux.h"
#include "pardit/io/checkpoint.h"
#include "pardit/memory/planner.h"
#include "pardit/memory/streamer.h"
#include "pardit/parallel/pipefusion.h"
#include "pardit/parallel/sequence_parallel.h"
#include "pardit/pipeline/sampler.h"

namespace pardit::app {

dist::ParallelDegrees degreesOf(const config::EngineConfig& c);

// Fails (on every rank) when ranks were started with different values of options that must agree;
// paths may differ (node-local copies of a model are fine).
void checkConsistentOptions(dist::Runtime& rt, const config::EngineConfig& c);

// This rank's transformer: local, or split over its sequence-parallel group with USP attention.
struct RankModel {
  std::shared_ptr<model::FluxTransformer> transformer;
  std::shared_ptr<parallel::UspAttention> usp;
  std::shared_ptr<parallel::SequenceParallelTransformer> sp;
  pipeline::TransformerFn fn;
};
RankModel makeRankModel(dist::Runtime& rt, const model::FluxConfig& config,
                        std::shared_ptr<model::FluxWeightProvider> weights);

// PipeFusion layout of a run: checked before anything is loaded (errors name the flags).
struct PipeFusionSetup {
  parallel::StagePartition partition;
  parallel::PatchLayout layout;  // spRank filled in by makePipeFusionRunner
  int warmupSteps = 1;
};
PipeFusionSetup checkPipeFusion(const config::EngineConfig& c, const dist::ParallelDegrees& d,
                                const model::FluxConfig& mc, int64_t tokenRows, int64_t tokenCols, bool patched);
std::unique_ptr<parallel::PipeFusionRunner> makePipeFusionRunner(dist::Runtime& rt, const model::FluxConfig& mc,
                                                                 std::shared_ptr<model::FluxWeightProvider> weights,
                                                                 const PipeFusionSetup& setup, const c10::Device& device);

// The memory workload of one rank (for the planner), before anything is loaded.
memory::RankWorkload workloadOf(const dist::Topology& topo, const model::FluxConfig& mc,
                                const std::optional<PipeFusionSetup>& pf, c10::ScalarType dtype, int64_t batch,
                                int64_t imageTokens, int64_t textTokens);
// --device-memory-budget and --offload resolved for this rank; the plan of its weight groups.
memory::RankPlan planFor(const config::EngineConfig& c, const memory::RankWorkload& w, const c10::Device& device,
                         int ranksOnNode);
// This rank's weights under the plan: resident, or streamed (memory::StreamingFluxWeights).
std::shared_ptr<model::FluxWeightProvider> loadPlannedWeights(const config::EngineConfig& c, const io::FluxCheckpoint& ck,
                                                              const memory::RankPlan& plan, c10::ScalarType dtype,
                                                              const c10::Device& device);

// One line per collective kind with calls, bytes and seconds (this rank's counters).
std::string collectiveSummary(const dist::Runtime& rt);

}  // namespace pardit::app
