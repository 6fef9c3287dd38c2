// The library's view of a parsed command line: EngineOptions and the requests (config/config.h).
#include <tuple>

#include "config/config.h"
#include "pardit/pipeline/queue.h"

namespace pardit::config {

pipeline::EngineOptions engineOptions(const EngineConfig& c) {
  pipeline::EngineOptions o = c;  // the options the command line set
  o.provenance = toMap(c);
  return o;
}

namespace {
void promptsOf(const EngineConfig& c, pipeline::PromptInput& prompt, pipeline::PromptInput& negative) {
  if (!c.prompt.empty()) prompt.texts = {c.prompt};
  if (!c.prompt2.empty()) prompt.texts2 = {c.prompt2};
  prompt.embeddingsFile = c.promptEmbeds;
  if (!c.negativePrompt.empty()) negative.texts = {c.negativePrompt};
  negative.embeddingsFile = c.negativePromptEmbeds;
}
}  // namespace

pipeline::GenerateRequest generateRequest(const EngineConfig& c) {
  pipeline::GenerateRequest r;
  promptsOf(c, r.prompt, r.negativePrompt);
  r.height = c.height;
  r.width = c.width;
  r.steps = c.steps;
  r.guidanceScale = c.guidanceScale;
  r.trueCfgScale = c.trueCfgScale;
  r.seed = c.seed;
  r.schedule = c.schedule;
  r.saveLatents = c.saveLatents;
  r.output = c.output;
  r.decode = !c.output.empty();
  r.maxSequenceLength = c.maxSequenceLength;
  return r;
}

pipeline::EncodeRequest encodeRequest(const EngineConfig& c) {
  pipeline::EncodeRequest r;
  promptsOf(c, r.prompt, r.negativePrompt);
  r.prompt.textFile = c.promptFile;
  r.maxSequenceLength = c.maxSequenceLength;
  r.output = c.output;
  return r;
}

pipeline::QueueOptions queueOptions(const EngineConfig& c) {
  pipeline::QueueOptions q;
  q.promptFile = c.promptFile;
  q.outputDir = c.outputDir;
  q.outputName = c.outputName;
  std::tie(q.shardIndex, q.shardCount) = pipeline::parseShard(c.shard);
  q.overwrite = c.overwrite;
  q.batchSize = c.batchSize;
  return q;
}

}  // namespace pardit::config
