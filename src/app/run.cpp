// pardit forward / pardit generate: the engine does the run; these read the inputs the command line
// names and leave the printing of progress and summaries to the engine's rank-0 log.
#include <ATen/ATen.h>

#include "commands.h"
#include "pardit/core/log.h"
#include "pardit/pipeline/engine.h"
#include "pardit/pipeline/inputs.h"

namespace pardit::app {

int runForward(const config::EngineConfig& c, dist::Runtime& rt) {
  pipeline::Engine engine(c, rt);
  model::FluxInputs inputs;
  rt.agree([&] { inputs = pipeline::readForwardInputs(c.inputs, engine.modelConfig()); });
  engine.forward(inputs, c.output);
  return 0;
}

int runEncode(const config::EngineConfig& c, dist::Runtime& rt) {
  pipeline::Engine engine(c, rt);
  engine.encode(pipeline::EncodeRequest::fromConfig(c));
  return 0;
}

int runGenerate(const config::EngineConfig& c, dist::Runtime& rt) {
  pipeline::Engine engine(c, rt);
  if (c.saveLatents.empty() && c.output.empty())
    logWarn0("no output requested: pass --output FILE.png (or --save-latents FILE) to keep the result");
  engine.generate(pipeline::GenerateRequest::fromConfig(c));
  return 0;
}

}  // namespace pardit::app
