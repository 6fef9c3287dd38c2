// pardit quantize: writes an FP8 copy of a checkpoint (io::quantizeCheckpoint) and prints where.
#include "pardit/io/quantize.h"
#include "commands.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"

namespace pardit::app {

int runQuantize(const config::EngineConfig& c) {
  Timer timer;
  const io::QuantizeResult r = io::quantizeCheckpoint(c.model, c.out);
  logInfo0("wrote ", r.weightsQuantized, " weights as float8 e4m3 with per-row scales: ", formatBytes(r.bytesIn),
           " of transformer tensors became ", formatBytes(r.bytesOut), " in ", formatSeconds(timer.seconds()));
  if (r.t5Quantized) logInfo0("T5's layer weights in FP8 too");
  if (!r.linked.empty()) logInfo0("linked ", r.linked.size(), " other file(s) of the model into ", c.out);
  logInfo0("model: ", r.modelPath);
  return 0;
}

}  // namespace pardit::app
