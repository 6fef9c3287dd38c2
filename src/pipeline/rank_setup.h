#pragma once
// Private to src/pipeline: how one rank of a run is laid out, planned, loaded and assembled. Used by the
// engine and by `pardit plan` (which plans every rank of a job without running any).
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "pardit/dist/runtime.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/memory/planner.h"
#include "pardit/model/flux.h"
#include "pardit/parallel/pipefusion.h"
#include "pardit/parallel/sequence_parallel.h"
#include "pardit/pipeline/cuda_graph.h"
#include "pardit/pipeline/denoise.h"
#include "pardit/pipeline/loading.h"
#include "pardit/pipeline/options.h"

namespace pardit::pipeline::detail {

// Reads a tensor by internal name in a dtype onto a device (from the checkpoint, or a preset's
// synthetic weights), in the run's weight format.
using TensorReader = pipeline::TensorReader;

// The PipeFusion layout of a run.
struct PipeFusionLayout {
  parallel::StagePartition partition;
  parallel::PatchLayout layout;  // spRank is filled in per rank
  int warmupSteps = 1;
};

// Checks the parallel layout against the model and the image token grid (rows x cols; a forward call's
// plain sequence is rows x 1) before anything is loaded; errors name the flags. Returns the PipeFusion
// layout with --pipefusion-degree > 1. `patched`: the image is cut into --num-pipeline-patch patches
// (generate), else PipeFusion runs one patch (forward).
std::optional<PipeFusionLayout> checkLayout(const EngineOptions& c, const dist::ParallelDegrees& d,
                                            const model::FluxConfig& mc, int64_t tokenRows, int64_t tokenCols,
                                            bool patched);

// What one rank computes, for the planner. `batch`: the transformer batch of this rank.
memory::RankWorkload workloadOf(const dist::Topology& topo, const model::FluxConfig& mc,
                                const std::optional<PipeFusionLayout>& pf, c10::ScalarType dtype,
                                model::WeightFormat format, int64_t batch, int64_t imageTokens, int64_t textTokens);

// --device-memory-budget resolved for this rank (auto: the device's free memory, or the host's share).
uint64_t budgetOf(const EngineOptions& c, const c10::Device& device, int ranksOnNode);

// v reduced over every rank of the world.
double worldReduce(dist::Runtime& rt, double v, dist::ReduceOp op);

// --host-memory-budget resolved for this rank.
uint64_t hostBudgetOf(const EngineOptions& c, int ranksOnNode);

// This rank's weights under its plan: resident, or streamed (memory::StreamingFluxWeights) from the source
// the plan chose (memory::chooseStreamSource). `checkpoint` (null: synthetic weights) gives the file ranges
// of tensors stored as they are used.
std::shared_ptr<model::FluxWeightProvider> loadPlannedWeights(const model::FluxConfig& mc, const TensorReader& read,
                                                              const io::FluxCheckpoint* checkpoint,
                                                              const memory::RankPlan& plan, c10::ScalarType dtype,
                                                              model::WeightFormat format, const c10::Device& device);

// This rank's transformer call: local, or split over its sequence-parallel group with USP attention.
struct RankModel {
  std::shared_ptr<model::FluxTransformer> transformer;
  std::shared_ptr<parallel::UspAttention> usp;
  std::shared_ptr<parallel::SequenceParallelTransformer> sp;
  TransformerFn fn;
  std::shared_ptr<CudaGraphTransformer> graphs;  // --cuda-graphs: fn replays these
};
// `attention`: the kernel of the local attention (--attention).
RankModel makeRankModel(dist::Runtime& rt, const model::FluxConfig& mc,
                        std::shared_ptr<model::FluxWeightProvider> weights, bool cudaGraphs = false,
                        model::AttentionKernel attention = model::AttentionKernel::kAuto);

// --cuda-graphs against this rank's device, layout and plan: the whole transformer call on one GPU with
// every weight resident (throws naming the flag otherwise).
void checkCudaGraphs(const c10::Device& device, const dist::Topology& topo, bool pipefusion,
                     const memory::RankPlan& plan);

std::shared_ptr<parallel::PipeFusionRunner> makePipeFusionRunner(
    dist::Runtime& rt, const model::FluxConfig& mc, std::shared_ptr<model::FluxWeightProvider> weights,
    const PipeFusionLayout& pf, const c10::Device& device,
    model::AttentionKernel attention = model::AttentionKernel::kAuto);

// --attention as the model spells it.
model::AttentionKernel attentionKernelOf(Attention attention);

// Where the text encoders and tokenizers are: the flags, else the model's folder (a diffusers pipeline's
// text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/; beside a BFL file clip_l.safetensors,
// t5xxl_*.safetensors, clip_tokenizer/, t5_tokenizer/). Throws naming the flag of what is missing.
struct TextSources {
  std::string clip, t5, clipTokenizer, t5Tokenizer;
};
// --weight-dtype for T5: auto keeps an FP8 file (float8 e4m3 layer weights) in FP8.
model::WeightFormat t5WeightFormat(WeightDtype weightDtype, const io::T5Checkpoint& t5);

TextSources textSourcesOf(const EngineOptions& options, const io::FluxCheckpoint* checkpoint,
                          const std::string& modelName);

}  // namespace pardit::pipeline::detail
