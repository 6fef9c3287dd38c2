// pardit bench: the model benchmark (Engine::benchmark) or the collective micro-benchmark, printed as
// log lines, one machine-readable BENCH line and an optional JSON report.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "pardit/core/dtype.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/sysinfo.h"
#include "pardit/dist/comm_bench.h"
#include "pardit/memory/planner.h"
#include "pardit/pipeline/benchmark.h"
#include "pardit/pipeline/engine.h"
#include "pardit/version.h"

namespace pardit::app {

namespace {

int runCommBench(const config::EngineConfig& c, dist::Runtime& rt) {
  c10::Device device = c10::kCPU;
  rt.agree([&] { device = dist::deviceForRank(c.device, rt.localRank()); });
  const auto samples = dist::benchmarkCollectives(rt, device, c.commMaxBytes);
  logInfo0("collectives over ", rt.worldSize(), " ranks (", rt.group(dist::GroupKind::kUlysses).backend(), ", ",
           device.str(), "); times are the slowest rank's");
  logInfo0("      bytes  op            time_us  algbw_GB/s  busbw_GB/s");
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  for (const auto& s : samples) {
    char line[160];
    std::snprintf(line, sizeof(line), "%11llu  %-12s %9.1f  %10.3f  %10.3f", static_cast<unsigned long long>(s.bytes),
                  s.op.c_str(), s.seconds * 1e6, s.algbw / 1e9, s.busbw / 1e9);
    logInfo0(line);
    results.push_back({{"bytes", s.bytes},
                       {"op", s.op},
                       {"time_s", s.seconds},
                       {"algbw_GBps", s.algbw / 1e9},
                       {"busbw_GBps", s.busbw / 1e9}});
  }
  nlohmann::ordered_json j;
  j["tool"] = "pardit bench --comm";
  j["commit"] = PARDIT_GIT_COMMIT;
  j["ranks"] = rt.worldSize();
  j["backend"] = rt.group(dist::GroupKind::kUlysses).backend();
  j["device"] = device.str();
  j["results"] = results;
  writeJsonReport(rt, c.output, j);
  return 0;
}

void printPipeFusion(const config::EngineConfig& c, dist::Runtime& rt, const pipeline::Engine& e,
                     const pipeline::BenchmarkResult& r) {
  const auto& d = rt.topology().degrees();
  logInfo0("bench ", r.modelName, " (", e.modelConfig().describe(), "), ", dtypeName(e.dtype()), ", ", rt.worldSize(),
           " rank(s) (", d.describe(), "), ", r.patches, " patches, ", r.warmupSteps, " warm-up step(s) + ", c.iters,
           " pipelined steps, ", r.threads, " thread(s) per rank");
  logInfo0("pipelined step: median ", formatSeconds(r.median),
           " (slowest rank); waiting for the previous stage: ", formatNumber(100 * r.bubbleShareMean),
           "% of the step on average, ", formatNumber(100 * r.bubbleShareMax), "% on the worst rank");
  if (rt.worldRank() == 0) {
    std::printf(
        "BENCH pardit-pipefusion model=%s dtype=%s ranks=%d pipefusion=%d patches=%d ulysses=%d ring=%d "
        "threads=%d image_tokens=%lld text_tokens=%lld step_median_s=%.6f bubble_share_mean=%.4f "
        "bubble_share_max=%.4f\n",
        r.modelName.c_str(), dtypeName(e.dtype()).c_str(), rt.worldSize(), d.pipefusion, r.patches, d.ulysses, d.ring,
        r.threads, static_cast<long long>(r.imageTokens), static_cast<long long>(c.textLen), r.median,
        r.bubbleShareMean, r.bubbleShareMax);
    std::fflush(stdout);
  }
}

// The operator profile of one forward: classes, then the operators that take 0.5% or more.
void printProfile(const pipeline::BenchmarkResult& r) {
  std::map<std::string, std::pair<double, int64_t>> classes;
  double total = 0;
  for (const auto& op : r.profile) {
    auto& c = classes[pipeline::OpProfile::classOf(op.name)];
    c.first += op.seconds;
    c.second += op.calls;
    total += op.seconds;
  }
  logInfo0("operator profile of one forward (", formatSeconds(r.profileSeconds), " with the profiler, ",
           formatSeconds(total), " in top-level operators):");
  std::vector<std::pair<std::string, std::pair<double, int64_t>>> sorted(classes.begin(), classes.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  for (const auto& [name, c] : sorted)
    logInfo0("  ", name, ": ", formatSeconds(c.first), " (", formatNumber(100 * c.first / total), "%, ", c.second,
             " calls)");
  for (const auto& op : r.profile)
    if (op.seconds >= 0.005 * total)
      logInfo0("    ", op.name, ": ", formatSeconds(op.seconds), " (", formatNumber(100 * op.seconds / total), "%), ",
               op.calls, " calls, ", pipeline::OpProfile::classOf(op.name));
}

void printForwards(const config::EngineConfig& c, dist::Runtime& rt, const pipeline::Engine& e,
                   const pipeline::BenchmarkResult& r) {
  const auto& d = rt.topology().degrees();
  const double rate = r.flops / r.median;
  logInfo0("bench ", r.modelName, " (", e.modelConfig().describe(), "), ", dtypeName(e.dtype()), " on ",
           e.device().str(), ", ", rt.worldSize(), " rank(s) (", d.describe(), "), ", r.threads,
           " thread(s) per rank, batch ", c.batch, ", ", r.imageTokens, " image + ", c.textLen, " text tokens");
  logInfo0("forward: median ", formatSeconds(r.median), ", min ", formatSeconds(r.best), ", mean ",
           formatSeconds(r.mean), " over ", r.samples.size(), " iterations",
           r.cudaGraphs ? " (CUDA graph replays)" : "");
  logInfo0("work: ", formatNumber(r.flops / 1e9), " GFLOP per forward -> ", formatNumber(rate / 1e9), " GFLOP/s",
           rt.worldSize() == 1 ? "" : " (all ranks)");
  logInfo0("communication: ", formatNumber(100.0 * r.commShare), "% of the step time (largest rank)");
  if (!r.attentionKernel.empty())
    logInfo0(
        "attention kernel: ", r.attentionKernel,
        c.attention == config::Attention::kAuto ? " (--attention auto's pick for these tensors)" : " (--attention)");
  if (c.unfused) logInfo0("fused passes: off (--unfused: ATen's compositions)");
  if (r.gemmRate > 0)
    logInfo0("device GEMM rate (", dtypeName(e.dtype()), ", ", pipeline::gemmRateSize(e.device()), "^3",
             e.device().is_cpu() ? ", " + std::to_string(r.threads) + " thread(s)" : std::string(),
             "): ", formatNumber(r.gemmRate / 1e9), " GFLOP/s per rank -> forward reaches ",
             formatNumber(100.0 * rate / (r.gemmRate * rt.worldSize())), "% of it");
  if (r.gemmSeconds > 0) {
    const double other = std::max(0.0, r.median - r.gemmSeconds - r.attentionSeconds);
    logInfo0("time split: GEMMs ", formatSeconds(r.gemmSeconds), " (", formatNumber(100 * r.gemmSeconds / r.median),
             "%), attention ", formatSeconds(r.attentionSeconds), " (",
             formatNumber(100 * r.attentionSeconds / r.median), "%), other ops ", formatSeconds(other), " (",
             formatNumber(100 * other / r.median), "%)");
  }
  if (!r.profile.empty()) printProfile(r);
  if (rt.worldRank() == 0) {
    std::printf(
        "BENCH pardit model=%s dtype=%s ranks=%d ulysses=%d ring=%d cfg=%d threads=%d batch=%lld "
        "image_tokens=%lld text_tokens=%lld median_s=%.6f min_s=%.6f gflops=%.3f comm_share=%.4f "
        "gemm_gflops=%.3f peak_device_bytes=%llu peak_rss_bytes=%llu attention=%s fused=%d\n",
        r.modelName.c_str(), dtypeName(e.dtype()).c_str(), rt.worldSize(), d.ulysses, d.ring, d.cfg, r.threads,
        static_cast<long long>(c.batch), static_cast<long long>(r.imageTokens), static_cast<long long>(c.textLen),
        r.median, r.best, rate / 1e9, r.commShare, r.gemmRate / 1e9,
        static_cast<unsigned long long>(
            memory::devicePeakBytes(e.device().is_cuda(), e.device().is_cuda() ? e.device().index() : 0)),
        static_cast<unsigned long long>(peakRssBytes()), r.attentionKernel.c_str(), c.unfused ? 0 : 1);
    std::fflush(stdout);
  }
}

void printDecode(const config::EngineConfig& c, dist::Runtime& rt, const pipeline::Engine& e,
                 const pipeline::BenchmarkResult& r) {
  logInfo0("bench VAE decode (", r.vae, ", ", formatBytes(r.decoderWeightBytes), " of weights), ", dtypeName(e.dtype()),
           " on ", e.device().str(), ", batch ", c.batch, " of ", c.width, "x", c.height, " px, ", rt.worldSize(),
           " rank(s) decoding ",
           r.decodeMode == "patches" ? "row slabs"
           : r.decodeMode == "whole" ? "the whole image"
                                     : "tiles (" + r.decodeMode.substr(6) + " px)",
           ", ", r.threads, " thread(s) per rank");
  logInfo0("decode: median ", formatSeconds(r.median), ", min ", formatSeconds(r.best), " over ", r.samples.size(),
           " decode(s)");
  logInfo0("activations per rank: planned ", formatBytes(r.decodePlannedBytes), ", measured ",
           formatBytes(r.decodeActivationBytesMax), " (largest rank's peak RSS growth during the first decode)");
  if (rt.worldRank() == 0) {
    std::printf(
        "BENCH pardit-decode vae=%s dtype=%s ranks=%d threads=%d batch=%lld height=%lld width=%lld "
        "median_s=%.6f activation_bytes_max=%llu activation_bytes_planned=%llu mode=%s\n",
        r.vae.c_str(), dtypeName(e.dtype()).c_str(), rt.worldSize(), r.threads, static_cast<long long>(c.batch),
        static_cast<long long>(c.height), static_cast<long long>(c.width), r.median,
        static_cast<unsigned long long>(r.decodeActivationBytesMax),
        static_cast<unsigned long long>(r.decodePlannedBytes), r.decodeMode.c_str());
    std::fflush(stdout);
  }
}

void printEncode(const config::EngineConfig& c, dist::Runtime& rt, const pipeline::Engine& e,
                 const pipeline::BenchmarkResult& r) {
  logInfo0("bench encode (", r.modelName, "), ", dtypeName(e.dtype()), " on ", e.device().str(), ", batch ", c.batch,
           ", T5 ", r.textLen, " tokens (", r.encodeT5Streamed ? "streamed" : "resident", "), ", r.threads,
           " thread(s); encoders loaded in ", formatSeconds(r.encodeLoadSeconds));
  logInfo0("encode: median ", formatSeconds(r.median), ", min ", formatSeconds(r.best), " over ", r.samples.size(),
           " encode(s)");
  if (rt.worldRank() == 0) {
    std::printf("BENCH pardit-encode model=%s dtype=%s threads=%d batch=%lld text_len=%lld median_s=%.6f\n",
                r.modelName.c_str(), dtypeName(e.dtype()).c_str(), r.threads, static_cast<long long>(c.batch),
                static_cast<long long>(r.textLen), r.median);
    std::fflush(stdout);
  }
}

nlohmann::ordered_json toJson(const config::EngineConfig& c, dist::Runtime& rt, const pipeline::Engine& e,
                              const pipeline::BenchmarkResult& r) {
  const auto& d = rt.topology().degrees();
  nlohmann::ordered_json j = {
      {"tool", "pardit"},
      {"version", PARDIT_VERSION},
      {"commit", PARDIT_GIT_COMMIT},
      {"model", r.modelName},
      {"config", e.modelConfig().describe()},
      {"dtype", dtypeName(e.dtype())},
      {"device", e.device().str()},
      {"ranks", rt.worldSize()},
      {"degrees", {{"cfg", d.cfg}, {"pipefusion", d.pipefusion}, {"ring", d.ring}, {"ulysses", d.ulysses}}},
      {"threads", r.threads},
      {"batch", c.batch},
      {"image_tokens", r.imageTokens},
      {"text_tokens", c.textLen},
      {"warmup", c.warmup},
      {"samples_s", r.samples},
      {"median_s", r.median},
      {"flops", r.flops},
      {"gflops", r.flops / r.median / 1e9}};
  if (c.benchEncode) {
    j["text_tokens"] = r.textLen;
    j["t5_streamed"] = r.encodeT5Streamed;
    j["load_s"] = r.encodeLoadSeconds;
    j.erase("image_tokens");
    j.erase("flops");
    j.erase("gflops");
    return j;
  }
  if (c.benchDecode) {
    j["vae"] = r.vae;
    j["decoder_weight_bytes"] = r.decoderWeightBytes;
    j["activation_bytes_max"] = r.decodeActivationBytesMax;
    j["activation_bytes_planned"] = r.decodePlannedBytes;
    j["decode_mode"] = r.decodeMode;
    return j;
  }
  if (d.pipefusion > 1) {
    j["patches"] = r.patches;
    j["warmup_steps"] = r.warmupSteps;
    j["step_s"] = r.pipelineStepSeconds;
    j["bubble_share_mean"] = r.bubbleShareMean;
    j["bubble_share_max"] = r.bubbleShareMax;
  } else {
    j["comm_share"] = r.commShare;
    j["cuda_graphs"] = r.cudaGraphs;
    j["attention"] = r.attentionKernel;
    j["fused_passes"] = !c.unfused;
    j["gemm_gflops"] = r.gemmRate / 1e9;
    if (r.gemmSeconds > 0)
      j["split_s"] = {{"gemm", r.gemmSeconds},
                      {"attention", r.attentionSeconds},
                      {"other", std::max(0.0, r.median - r.gemmSeconds - r.attentionSeconds)}};
  }
  return j;
}

}  // namespace

int runBench(const config::EngineConfig& c, dist::Runtime& rt) {
  if (c.benchComm) return runCommBench(c, rt);
  pipeline::Engine engine(config::engineOptions(c), rt);
  pipeline::BenchmarkRequest request;
  request.decode = c.benchDecode;
  request.encode = c.benchEncode;
  request.batch = c.batch;
  request.height = c.height;
  request.width = c.width;
  request.textLen = c.textLen;
  request.warmup = c.warmup;
  request.iters = c.iters;
  request.prompt = c.prompt;
  request.maxSequenceLength = c.maxSequenceLength;
  request.profile = c.benchProfile;
  const pipeline::BenchmarkResult r = engine.benchmark(request);
  if (c.benchEncode) {
    printEncode(c, rt, engine, r);
  } else if (c.benchDecode) {
    printDecode(c, rt, engine, r);
  } else if (rt.topology().degrees().pipefusion > 1) {
    printPipeFusion(c, rt, engine, r);
  } else {
    printForwards(c, rt, engine, r);
  }
  writeJsonReport(rt, c.output, toJson(c, rt, engine, r));
  return 0;
}

}  // namespace pardit::app
