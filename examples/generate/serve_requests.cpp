// One engine, loaded once, serving three different requests: what `pardit generate --prompt-file` does
// for a queue, from C++.
//
//   serve_requests MODEL OUT_DIR
//   mpirun -n 2 serve_requests MODEL OUT_DIR   (the ranks split each image: Ulysses parallelism)
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "pardit/dist/runtime.h"
#include "pardit/pipeline/engine.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MODEL OUT_DIR\n", argv[0]);
    return 2;
  }
  pardit::dist::Runtime rt(&argc, &argv);
  try {
    pardit::pipeline::EngineOptions options;
    options.model = argv[1];
    options.ulyssesDegree = rt.worldSize();
    pardit::pipeline::Engine engine(options, rt);  // checks, topology, checkpoint headers: no weights yet

    struct Ask {
      const char* prompt;
      int64_t height, width;
      int steps;
      uint64_t seed;
    };
    const std::vector<Ask> asks = {{"a cat on the moon", 64, 64, 2, 1},
                                   {"a lighthouse at dusk", 64, 128, 3, 2},
                                   {"a bowl of fruit", 128, 64, 2, 3}};
    double loading = 0.0;
    for (size_t i = 0; i < asks.size(); ++i) {
      pardit::pipeline::GenerateRequest request;
      request.prompt.texts = {asks[i].prompt};
      request.height = asks[i].height;
      request.width = asks[i].width;
      request.steps = asks[i].steps;
      request.seed = asks[i].seed;
      request.maxSequenceLength = 16;
      request.output = std::string(argv[2]) + "/request-" + std::to_string(i) + ".png";
      const pardit::pipeline::GenerateResult result = engine.generate(request);
      loading += result.report.loadSeconds;
      if (rt.worldRank() == 0)
        std::printf("request %zu: %s (%lldx%lld, %d steps) -> %s, weights loaded in this request: %s\n", i,
                    asks[i].prompt, static_cast<long long>(asks[i].width), static_cast<long long>(asks[i].height),
                    asks[i].steps, result.imagePaths.at(0).c_str(), result.report.loadSeconds > 0 ? "yes" : "no");
    }
    if (rt.worldRank() == 0) std::printf("3 requests served, %.3f s of loading in all\n", loading);
    return 0;
  } catch (const pardit::dist::CollectiveFailure&) {
    return 1;  // every rank agreed on the failure; its message is already printed
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    pardit::dist::Runtime::abortJob(1);
    return 1;
  }
}
