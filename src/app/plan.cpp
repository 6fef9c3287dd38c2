// pardit plan: prints every rank's memory plan (pipeline::planJob) as a table or JSON.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "pardit/core/dtype.h"
#include "pardit/core/format.h"
#include "pardit/pipeline/job_plan.h"

namespace pardit::app {

namespace {

nlohmann::ordered_json toJson(const config::EngineConfig& c, const pipeline::JobPlan& p) {
  nlohmann::ordered_json out;
  out["model"] = p.model;
  out["config"] = p.config.describe();
  out["checkpoint_bytes"] = p.checkpointBytes;
  out["dtype"] = dtypeName(p.dtype);
  out["weights"] = model::weightFormatName(p.weightFormat);
  out["world_size"] = p.worldSize * p.dataParallel;
  out["data_parallel"] = {{"groups", p.dataParallel},
                          {"ranks_per_group", p.worldSize},
                          {"text_encoding", "per group: each group's encoder rank encodes the prompts it is dealt"}};
  out["degrees"] = {{"cfg", p.degrees.cfg},
                    {"pipefusion", p.degrees.pipefusion},
                    {"ring", p.degrees.ring},
                    {"ulysses", p.degrees.ulysses}};
  out["image"] = {{"height", c.height}, {"width", c.width}, {"tokens", p.imageTokens}, {"text_tokens", c.textLen}};
  out["offload"] = config::enumName(c.offload);
  if (!p.stages.empty()) out["stages"] = p.stages;
  nlohmann::ordered_json ranks = nlohmann::ordered_json::array();
  for (size_t r = 0; r < p.ranks.size(); ++r) {
    const auto& plan = p.ranks[r];
    const size_t streamed = plan.streamedGroups();
    nlohmann::ordered_json j = {{"rank", r},
                                {"stage", p.stageOf[r]},
                                {"groups", plan.groups.size()},
                                {"streamed_groups", streamed},
                                {"resident_bytes", plan.residentBytes},
                                {"streamed_bytes", plan.streamedBytes},
                                {"stream_buffer_bytes", plan.streamBufferBytes},
                                {"activation_bytes", plan.activationBytes},
                                {"kv_buffer_bytes", plan.kvBytes},
                                {"comm_buffer_bytes", plan.commBytes},
                                {"total_bytes", plan.total()},
                                {"budget_bytes", plan.budget},
                                {"fits", plan.fits}};
    if (plan.anyStreamed() && plan.fits) {
      j["stream_from"] = plan.streamFromHost ? "host" : "file";
      j["prefetch_depth"] = plan.prefetchDepth;
      j["host_stream_bytes"] = plan.hostBytes;
    }
    if (!plan.fits) j["problem"] = plan.problem;
    ranks.push_back(j);
  }
  out["ranks"] = ranks;
  if (!p.budgetSource.empty()) out["budget_source"] = p.budgetSource;
  if (p.textEncoderRank >= 0)
    out["text_encoders"] = {{"rank", p.textEncoderRank},
                            {"clip_bytes", p.clipBytes},
                            {"t5_bytes", p.t5Bytes},
                            {"t5_weights", model::weightFormatName(p.t5Format)},
                            {"t5_streamed", p.t5Streamed}};
  if (p.decode) {
    const auto& d = *p.decode;
    out["decode"] = {
        {"mode", d.modeName()},          {"tile_px", d.tile * d.factor}, {"activation_bytes", d.activationBytes},
        {"weight_bytes", d.weightBytes}, {"free_bytes", d.freeBytes},    {"fits", d.fits}};
  }
  return out;
}

void printTable(const config::EngineConfig& c, const pipeline::JobPlan& p) {
  std::printf("model %s: %s, %s of weights in the checkpoint; computed in %s%s\n", p.model.c_str(),
              p.config.describe().c_str(), formatBytes(p.checkpointBytes).c_str(), dtypeName(p.dtype).c_str(),
              p.weightFormat == model::WeightFormat::kFp8 ? " with FP8 block weights (e4m3, per-row scales)" : "");
  if (p.dataParallel > 1)
    std::printf(
        "%d ranks: %d data-parallel replica groups of %d ranks, each with the plan below (its own shard "
        "of the weights) and its own text encoder rank; requests are dealt to the groups\n",
        p.worldSize * p.dataParallel, p.dataParallel, p.worldSize);
  std::printf("%d rank(s)%s: %s; %lldx%lld px (%lld image + %lld text tokens), batch %lld%s; offload %s\n", p.worldSize,
              p.dataParallel > 1 ? " per group" : "", p.degrees.describe().c_str(), static_cast<long long>(c.width),
              static_cast<long long>(c.height), static_cast<long long>(p.imageTokens),
              static_cast<long long>(c.textLen), static_cast<long long>(c.batch), p.trueCfg ? ", true CFG" : "",
              config::enumName(c.offload).c_str());
  if (!p.stages.empty()) std::printf("stages: %s\n", p.stages.c_str());
  if (!p.budgetSource.empty()) std::printf("budget %s\n", p.budgetSource.c_str());
  std::printf("%4s %5s %8s %11s %11s %11s %11s %11s %11s %11s %11s  %s\n", "rank", "stage", "streamed", "resident",
              "streamed", "stream_buf", "activations", "kv_buffers", "comm_buf", "total", "budget", "fits");
  for (size_t r = 0; r < p.ranks.size(); ++r) {
    const auto& plan = p.ranks[r];
    size_t streamed = 0;
    for (const auto& x : plan.groups) streamed += x.streamed;
    std::printf("%4zu %5d %4zu/%-3zu %11s %11s %11s %11s %11s %11s %11s %11s  %s\n", r, p.stageOf[r], streamed,
                plan.groups.size(), formatBytes(plan.residentBytes).c_str(), formatBytes(plan.streamedBytes).c_str(),
                formatBytes(plan.streamBufferBytes).c_str(), formatBytes(plan.activationBytes).c_str(),
                formatBytes(plan.kvBytes).c_str(), formatBytes(plan.commBytes).c_str(),
                formatBytes(plan.total()).c_str(), formatBytes(plan.budget).c_str(), plan.fits ? "yes" : "NO");
  }
  for (size_t r = 0; r < p.ranks.size(); ++r) {
    const auto& plan = p.ranks[r];
    if (!plan.fits)
      std::printf("rank %zu: %s\n", r, plan.problem.c_str());
    else if (plan.anyStreamed())
      std::printf("rank %zu: streams from %s, %d group(s) ahead, %s of host memory for it\n", r,
                  plan.streamFromHost ? "a host copy (--stream-from host)" : "the file (--stream-from file)",
                  plan.prefetchDepth, formatBytes(plan.hostBytes).c_str());
  }
  if (p.textEncoderRank >= 0)
    std::printf("text encoders on %srank %d, before the transformer loads: CLIP %s, T5 %s%s (%s)\n",
                p.dataParallel > 1 ? "each group's " : "", p.textEncoderRank, formatBytes(p.clipBytes).c_str(),
                formatBytes(p.t5Bytes).c_str(), p.t5Format == model::WeightFormat::kFp8 ? " in FP8" : "",
                p.t5Streamed ? "streamed block by block: they do not fit the rank's budget together" : "resident");
  if (p.decode) std::printf("decode: %s%s\n", p.decode->describe().c_str(), p.decode->fits ? "" : " (DOES NOT FIT)");
}

}  // namespace

int runPlan(const config::EngineConfig& c) {
  pipeline::PlanShape shape;
  shape.worldSize = c.worldSize;
  shape.height = c.height;
  shape.width = c.width;
  shape.textLen = c.textLen;
  shape.batch = c.batch;
  shape.trueCfg = c.trueCfgScale > 1.0;
  const pipeline::JobPlan p = pipeline::planJob(config::engineOptions(c), shape);
  if (c.json) {
    std::cout << toJson(c, p).dump(2) << std::endl;
  } else {
    printTable(c, p);
  }
  return p.allFit ? 0 : 1;
}

}  // namespace pardit::app
