// pardit synth: writes a random-weight checkpoint (io::synthesizeCheckpoint) and prints where.
#include <ATen/ATen.h>

#include "commands.h"
#include "pardit/core/dtype.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/io/synth.h"
#include "pardit/pipeline/loading.h"

namespace pardit::app {

int runSynth(const config::EngineConfig& c) {
  io::SynthOptions o;
  o.config = model::FluxConfig::preset(c.preset);
  o.presetName = c.preset;
  if (c.depth >= 0) o.config.depth = c.depth;
  if (c.depthSingle >= 0) o.config.depthSingle = c.depthSingle;
  o.layout = c.layout == config::SynthLayout::kBfl ? io::CheckpointLayout::kBfl : io::CheckpointLayout::kDiffusers;
  o.outDir = c.out;
  o.seed = c.seed;
  const bool big = c.preset == "flux-dev" || c.preset == "flux-schnell" || c.preset == "medium";
  // auto: bf16 for the large presets (as the real checkpoints), fp32 for the test-sized ones.
  o.dtype = c.dtype == config::Dtype::kAuto ? (big ? c10::kBFloat16 : c10::kFloat)
                                            : pipeline::resolveDtype(c.dtype, c10::kCPU);
  o.zeros = c.fill == config::SynthFill::kZeros;
  o.shardSize = c.shardSize;
  o.textLen = c.textLen > 0 ? c.textLen
                            : (c.preset == "flux-dev"       ? 512
                               : c.preset == "flux-schnell" ? 256
                               : c.preset == "small"        ? 64
                                                            : 16);
  Timer timer;
  const io::SynthResult r = io::synthesizeCheckpoint(o);
  logInfo0("wrote ", c.preset, " (", o.config.describe(), ") in the ", config::enumName(c.layout), " layout as ",
           dtypeName(o.dtype), ": ", formatBytes(r.tensorBytes), " of tensors in ", r.files, " file(s), ",
           formatSeconds(timer.seconds()));
  logInfo0("model: ", r.modelPath);
  logInfo0("VAE: ", r.vaePath, " (", o.vae().describe(), ", ", formatBytes(r.vaeBytes), ")");
  logInfo0("text encoders: ", o.clip().describe(), "; ", o.t5().describe(), " (", formatBytes(r.textEncoderBytes), ")");
  logInfo0("prompt embeddings: ", r.promptEmbedsPath, " (negative: ", r.negativeEmbedsPath, ")");
  return 0;
}

}  // namespace pardit::app
