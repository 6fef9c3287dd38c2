#pragma once
// `pardit plan`: every rank's memory plan of a job from the checkpoint headers alone (no MPI job, no
// weight data), with the same layout checks and workloads the engine uses when it runs.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pardit/config/config.h"
#include "pardit/dist/topology.h"
#include "pardit/memory/planner.h"
#include "pardit/model/flux_config.h"

namespace pardit::pipeline {

struct JobPlan {
  std::string model;
  model::FluxConfig config;
  uint64_t checkpointBytes = 0;
  c10::ScalarType dtype = c10::kBFloat16;
  int worldSize = 1;
  dist::ParallelDegrees degrees;
  int64_t imageTokens = 0;
  bool trueCfg = false;
  std::string stages;                  // PipeFusion stage split, or empty
  std::vector<memory::RankPlan> ranks;
  std::vector<int> stageOf;            // PipeFusion stage of each rank
  bool allFit = true;
};

// --world-size 0 takes the product of the degrees. auto budgets are refused (no device is queried).
JobPlan planJob(const config::EngineConfig& c);

}  // namespace pardit::pipeline
