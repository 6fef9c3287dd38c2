#include "pardit/pipeline/job_plan.h"

#include <algorithm>

#include "pardit/core/error.h"
#include "pardit/core/format.h"
#include "pardit/dist/runtime.h"
#include "pardit/io/checkpoint.h"
#include "pardit/io/text_encoder_checkpoint.h"
#include "pardit/io/vae_checkpoint.h"
#include "pardit/model/fp8.h"
#include "pardit/model/text_encoders.h"
#include "pardit/pipeline/latents.h"
#include "pardit/pipeline/loading.h"
#include "rank_setup.h"

namespace pardit::pipeline {

const char* DecodePlan::modeName() const {
  return mode == Mode::kTiles ? "tiles" : mode == Mode::kPatches ? "patches" : "whole";
}

std::string DecodePlan::describe() const {
  std::string what = mode == Mode::kWhole     ? "the whole image on every rank"
                     : mode == Mode::kPatches ? "patch-parallel (exact)"
                                              : "tiled, " + std::to_string(tile * factor) +
                                                    " px tiles (seams, as diffusers' "
                                                    "enable_tiling)";
  return what + ", " + formatBytes(activationBytes) + " of activations and " + formatBytes(weightBytes) +
         " of weights per rank, " + formatBytes(freeBytes) + " free beside the transformer";
}

DecodePlan planDecode(const model::VaeConfig& vae, const EngineOptions& c, int64_t batch, int64_t height, int64_t width,
                      int ranks, c10::ScalarType dtype, uint64_t freeBytes) {
  using Mode = DecodePlan::Mode;
  const int64_t f = vae.spatialFactor();
  const size_t es = c10::elementSize(dtype);
  PARDIT_CHECK(c.vaeTileSize % f == 0, "--vae-tile-size must be a multiple of ", f, " (the VAE's upsampling), got ",
               c.vaeTileSize);
  DecodePlan d;
  d.factor = f;
  for (const auto& t : model::vaeDecoderTensors(vae))
    d.weightBytes += es * static_cast<uint64_t>(c10::multiply_integers(t.shape));
  d.freeBytes = freeBytes > d.weightBytes ? freeBytes - d.weightBytes : 0;
  const bool split = height / f >= ranks;
  d.mode = split ? Mode::kPatches : Mode::kWhole;
  d.activationBytes = model::vaeDecodeActivationBytes(vae, batch, height, width, split ? ranks : 1, es);
  if (c.vaeTiling == VaeTiling::kOff || (c.vaeTiling == VaeTiling::kAuto && d.activationBytes <= d.freeBytes)) {
    d.fits = d.activationBytes <= d.freeBytes;
    return d;
  }
  // Tiles: --vae-tile-size, or the VAE's sample_size (diffusers' tile) halved until the decode fits, not
  // below 64 px.
  d.mode = Mode::kTiles;
  const int64_t start = c.vaeTileSize > 0 ? c.vaeTileSize / f : vae.defaultTileLatent();
  const int64_t smallest = c.vaeTileSize > 0 ? start : std::min<int64_t>(8, start);
  for (d.tile = start;; d.tile /= 2) {
    d.activationBytes = model::vaeTiledDecodeBytes(vae, batch, height, width, d.tile, es);
    if (d.activationBytes <= d.freeBytes || d.tile / 2 < smallest) break;
  }
  d.fits = d.activationBytes <= d.freeBytes;
  return d;
}

JobPlan planJob(const EngineOptions& c, const PlanShape& shape) {
  JobPlan p;
  p.degrees = c.degrees();
  p.dataParallel = c.dataParallelDegree;
  const int jobRanks = shape.worldSize > 0 ? shape.worldSize : c.worldSize();
  PARDIT_CHECK(jobRanks % p.dataParallel == 0, "--data-parallel-degree ", p.dataParallel,
               " does not divide --world-size ", jobRanks);
  p.worldSize = jobRanks / p.dataParallel;  // one replica group; the others are the same
  dist::Topology::validate(p.degrees, p.worldSize);
  // Plans are for GPU runs unless --device cpu says otherwise; an auto budget is what a rank of the job
  // would get on this machine.
  const bool cpu = c.device == dist::DeviceKind::kCpu;
  p.dtype = resolveDtype(c.dtype, cpu ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, 0));
  uint64_t budget = c.deviceMemoryBudget.bytes;
  if (c.deviceMemoryBudget.automatic) {
    const c10::Device here = dist::deviceForRank(c.device, 0);
    budget = detail::budgetOf(c, here, jobRanks);
    p.budgetSource = here.is_cuda() ? "auto: free memory of " + here.str() + " on this machine, minus 1 GiB headroom"
                                    : "auto: this machine's available host memory shared by " +
                                          std::to_string(jobRanks) + " rank(s), minus 1 GiB headroom";
  }
  const io::FluxCheckpoint ck = io::FluxCheckpoint::open(c.model);  // headers only
  p.model = c.model;
  p.config = ck.config();
  p.checkpointBytes = ck.totalBytes();
  p.weightFormat = resolveWeightFormat(c.weightDtype, &ck);
  const LatentGeometry geom{shape.height, shape.width, 16};
  geom.validate();
  p.imageTokens = geom.tokens();
  const auto pf = detail::checkLayout(c, p.degrees, p.config, geom.tokenRows(), geom.tokenCols(), /*patched=*/true);
  if (pf) p.stages = pf->partition.describe(p.config);
  p.trueCfg = shape.trueCfg;
  const int64_t batch = shape.batch * ((p.trueCfg && p.degrees.cfg == 1 && pf) ? 2 : 1);
  for (int r = 0; r < p.worldSize; ++r) {
    const dist::Topology topo(p.degrees, r);
    const auto w = detail::workloadOf(topo, p.config, pf, p.dtype, p.weightFormat, batch, geom.tokens(), shape.textLen);
    p.ranks.push_back(memory::planRank(w, budget, c.offload));
    if (p.ranks.back().fits)
      memory::chooseStreamSource(p.ranks.back(), c.streamFrom, !cpu, detail::hostBudgetOf(c, jobRanks));
    p.stageOf.push_back(topo.pipefusionRank());
    p.allFit &= p.ranks.back().fits;
  }
  // The decode, when there is a VAE: with the least memory any rank has beside its transformer weights.
  std::string vaePath = c.vae.empty() ? io::VaeCheckpoint::findBeside(ck) : c.vae;
  if (!vaePath.empty()) {
    uint64_t free = UINT64_MAX;
    for (const auto& r : p.ranks) {
      const uint64_t held = r.residentBytes + r.streamBufferBytes;
      free = std::min(free, r.budget > held ? r.budget - held : 0);
    }
    p.decode = planDecode(io::VaeCheckpoint::open(vaePath).config(), c, shape.batch, shape.height, shape.width,
                          p.worldSize, p.dtype, free);
  }
  // The text encoders, when there are any to find.
  detail::TextSources sources;
  try {
    sources = detail::textSourcesOf(c, &ck, c.model);
  } catch (const Error&) {
    return p;  // no encoders: prompts come as embeddings
  }
  const auto clip = io::ClipTextCheckpoint::open(sources.clip);
  const auto t5 = io::T5Checkpoint::open(sources.t5);
  p.t5Format = detail::t5WeightFormat(c.weightDtype, t5);
  p.clipBytes = model::storedBytes(model::clipTextTensors(clip.config), p.dtype);
  p.t5Bytes = model::storedBytes(model::t5EncoderTensors(t5.config, p.t5Format), p.dtype);
  std::vector<uint64_t> spare;
  for (const auto& r : p.ranks) spare.push_back(r.budget > r.total() ? r.budget - r.total() : 0);
  p.textEncoderRank = c.textEncoderRank >= 0
                          ? c.textEncoderRank
                          : static_cast<int>(std::max_element(spare.begin(), spare.end()) - spare.begin());
  PARDIT_CHECK(p.textEncoderRank<p.worldSize, "--text-encoder-rank ", p.textEncoderRank, " is not a rank of the ",
                                 p.dataParallel> 1
                   ? "replica group"
                   : "job");
  // The encoders run before the transformer loads: the rank's whole budget is free for them.
  p.t5Streamed = p.t5Bytes + p.clipBytes > p.ranks[static_cast<size_t>(p.textEncoderRank)].budget;
  return p;
}

}  // namespace pardit::pipeline
