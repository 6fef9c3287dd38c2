// pardit forward / encode / generate: the engine does the run; these read the inputs the command line
// names and leave the printing of progress and summaries to the engine's rank-0 log. generate with
// --prompt-file serves the file as a queue (pipeline/queue.h).
#include <ATen/ATen.h>

#include "commands.h"
#include "pardit/core/format.h"
#include "pardit/core/log.h"
#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/inputs.h"
#include "pardit/pipeline/queue.h"

namespace pardit::app {

int runForward(const config::EngineConfig& c, dist::Runtime& rt) {
  pipeline::Engine engine(config::engineOptions(c), rt);
  model::FluxInputs inputs;
  rt.agree([&] { inputs = pipeline::readForwardInputs(c.inputs, engine.modelConfig()); });
  engine.forward(inputs, c.output);
  return 0;
}

int runEncode(const config::EngineConfig& c, dist::Runtime& rt) {
  pipeline::Engine engine(config::engineOptions(c), rt);
  engine.encode(config::encodeRequest(c));
  return 0;
}

int runQueue(const config::EngineConfig& c, dist::Runtime& rt) {
  pipeline::QueueOptions q;
  rt.agree([&] { q = config::queueOptions(c); });
  const pipeline::QueueReport r = pipeline::runQueue(config::engineOptions(c), rt, q, config::generateRequest(c));
  const std::string shard = c.shard.empty() ? std::string()
                                            : " (shard " + c.shard + ": " + std::to_string(r.shard) +
                                                  " of the file's " + std::to_string(r.total) + ")";
  logInfo0("queue: ", r.made, " images made, ", r.skipped, " already there", shard, ", ", r.remaining, " left, in ",
           formatSeconds(r.seconds),
           r.made > 0 ? " (" + formatNumber(r.imagesPerHour) + " images/hour)" : std::string(), "; manifest ",
           c.outputDir, "/manifest.jsonl");
  if (r.stopSignal != 0 && r.remaining > 0) {
    logWarn0("queue: stopped by signal ", r.stopSignal, " with ", r.remaining,
             " requests left; run the same command again to continue (exit status ", pipeline::kExitStopped, ")");
    return pipeline::kExitStopped;
  }
  return 0;
}

int runGenerate(const config::EngineConfig& c, dist::Runtime& rt) {
  if (!c.promptFile.empty()) return runQueue(c, rt);
  pipeline::Engine engine(config::engineOptions(c), rt);
  if (c.saveLatents.empty() && c.output.empty())
    logWarn0("no output requested: pass --output FILE.png (or --save-latents FILE) to keep the result");
  engine.generate(config::generateRequest(c));
  return 0;
}

}  // namespace pardit::app
