#pragma once
// `pardit plan`: every rank's memory plan of a job from the checkpoint headers alone (no MPI job, no
// weight data), with the same layout checks and workloads the engine uses when it runs.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "pardit/dist/topology.h"
#include "pardit/memory/planner.h"
#include "pardit/model/flux_config.h"
#include "pardit/model/vae.h"
#include "pardit/pipeline/options.h"

namespace pardit::pipeline {

// The decode stage of a job: how the VAE decodes its images within every rank's memory.
struct DecodePlan {
  enum class Mode {
    kWhole,    // every rank decodes the whole image (fewer latent rows than ranks)
    kPatches,  // the ranks decode row slabs of each image together: exactly the one-rank decode
    kTiles,    // overlapping tiles dealt over the ranks, blended as diffusers' tiled decode (seams)
  } mode = Mode::kPatches;
  int64_t tile = 0;              // latent pixels per tile side (kTiles)
  int64_t factor = 8;            // pixels per latent pixel
  uint64_t activationBytes = 0;  // planned per rank (kTiles: one tile's, and the decoded tiles kept)
  uint64_t weightBytes = 0;      // the decoder's, in the compute dtype
  uint64_t freeBytes = 0;        // the budget left beside the transformer's weights
  bool fits = true;
  const char* modeName() const;  // "whole", "patches", "tiles"
  std::string describe() const;  // "patch-parallel (exact), 1.1 GiB of activations ..."
};

// EngineOptions's --vae-tiling / --vae-tile-size for a batch of height x width images on `ranks`
// ranks. auto: the patch-parallel decode when it fits freeBytes (the least any rank has), else tiles:
// the VAE's sample_size (diffusers' tile) halved until one fits; it does not fit when not even 64 px
// tiles do. on: tiles (--vae-tile-size, or as auto chooses them). off: never tiles.
DecodePlan planDecode(const model::VaeConfig& vae, const EngineOptions& c, int64_t batch, int64_t height, int64_t width,
                      int ranks, c10::ScalarType dtype, uint64_t freeBytes);

// The requests a plan is made for (the largest of a queue).
struct PlanShape {
  int worldSize = 0;  // ranks of the job; 0: the product of the degrees (data-parallel included)
  int64_t height = 1024, width = 1024;
  int64_t textLen = 512;
  int64_t batch = 1;
  bool trueCfg = false;
};

struct JobPlan {
  std::string model;
  model::FluxConfig config;
  uint64_t checkpointBytes = 0;
  c10::ScalarType dtype = c10::kBFloat16;
  model::WeightFormat weightFormat = model::WeightFormat::kDense;  // of the transformer's weights
  int worldSize = 1;     // ranks of one replica group (every rank's plan below is one of the group)
  int dataParallel = 1;  // replica groups, each the same plan; each encodes its own prompts
  dist::ParallelDegrees degrees;
  int64_t imageTokens = 0;
  bool trueCfg = false;
  std::string stages;  // PipeFusion stage split, or empty
  std::vector<memory::RankPlan> ranks;
  std::vector<int> stageOf;  // PipeFusion stage of each rank
  bool allFit = true;
  std::string budgetSource;  // how an auto budget was found, or empty
  // The text encoders, when the model has them (or --text-encoder/-2 name them): the rank planned to run
  // them (the one with the most memory to spare after its plan, or --text-encoder-rank), their weights
  // in the compute dtype, and whether T5 streams block by block there.
  int textEncoderRank = -1;
  uint64_t clipBytes = 0, t5Bytes = 0;
  model::WeightFormat t5Format = model::WeightFormat::kDense;
  bool t5Streamed = false;
  std::optional<DecodePlan> decode;  // when a VAE is found (--vae, or beside the model)
};

// An auto budget is what a rank would get on this machine (the free memory of its first GPU, or its
// available host memory shared by the job's ranks).
JobPlan planJob(const EngineOptions& c, const PlanShape& shape);

}  // namespace pardit::pipeline
