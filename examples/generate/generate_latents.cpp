// Generates latents from prompt embeddings with pardit's engine: what `pardit generate` does, from C++.
//
//   generate_latents MODEL PROMPT_EMBEDS.safetensors OUT.safetensors
//   mpirun -n 2 generate_latents ...          (the ranks split the image tokens: Ulysses parallelism)
#include <cstdio>
#include <exception>

#include "pardit/core/error.h"
#include "pardit/dist/runtime.h"
#include "pardit/pipeline/engine.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL PROMPT_EMBEDS.safetensors OUT.safetensors\n", argv[0]);
    return 2;
  }
  pardit::dist::Runtime rt(&argc, &argv);
  try {
    pardit::pipeline::EngineOptions options;
    options.model = argv[1];
    options.ulyssesDegree = rt.worldSize();
    pardit::pipeline::Engine engine(options, rt);

    pardit::pipeline::GenerateRequest request;
    request.prompt.embeddingsFile = argv[2];
    request.height = 128;
    request.width = 128;
    request.steps = 4;
    request.seed = 42;
    request.saveLatents = argv[3];
    const pardit::pipeline::GenerateResult result = engine.generate(request);
    if (rt.worldRank() == 0)
      std::printf("latents [%lld, %lld, %lld] in %.3f s on %d rank(s)\n",
                  static_cast<long long>(result.latents.size(0)), static_cast<long long>(result.latents.size(1)),
                  static_cast<long long>(result.latents.size(2)), result.report.runSeconds, rt.worldSize());
    return 0;
  } catch (const pardit::dist::CollectiveFailure&) {
    return 1;  // every rank agreed on the failure; its message is already printed
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    pardit::dist::Runtime::abortJob(1);
    return 1;
  }
}
