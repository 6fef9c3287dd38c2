// The streamer under ThreadSanitizer: a model whose every block is streamed from the checkpoint file (the
// prefetch thread reads the next group while the compute thread runs the current one), dense and FP8, with
// a third thread reading the checkpoint's counters meanwhile; the read-ahead stopped by endOfRun(). Exits
// non-zero on a wrong result; ThreadSanitizer exits non-zero on a race.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdio>
#include <thread>

#include "pardit/io/checkpoint.h"
#include "pardit/memory/planner.h"
#include "pardit/memory/streamer.h"
#include "pardit/model/fp8.h"

using namespace pardit;

int main() {
  at::set_num_threads(1);  // LibTorch is not instrumented: no OpenMP regions to confuse the sanitizer
  const auto ck = io::FluxCheckpoint::open(std::string(PARDIT_FIXTURE_DIR) + "/flux_tiny_dev/diffusers");
  const model::FluxConfig& c = ck.config();
  at::manual_seed(5);
  const int64_t Li = 32, Lt = 8;
  model::FluxInputs in{at::randn({1, Li, c.inChannels}),
                       at::randn({1, Lt, c.contextInDim}),
                       at::randn({1, c.vecInDim}),
                       at::tensor({0.6f}),
                       at::tensor({3.5f}),
                       model::imagePositionIds(4, 8),
                       model::textPositionIds(Lt)};
  int failures = 0;
  for (const auto format : {model::WeightFormat::kDense, model::WeightFormat::kFp8}) {
    // A fresh checkpoint object for the streamed run: its counters and loaded-tensor set change while the
    // run streams (the reference below reads through `ck`).
    const auto streamed = io::FluxCheckpoint::open(std::string(PARDIT_FIXTURE_DIR) + "/flux_tiny_dev/diffusers");
    // The blocks' FP8 weights come quantized from the checkpoint, their scales right after.
    auto scales = std::make_shared<std::map<std::string, at::Tensor>>();
    auto scalesMutex = std::make_shared<std::mutex>();
    auto getter = [scales, scalesMutex, format](const io::FluxCheckpoint& ck) -> model::WeightGetter {
      return [&ck, scales, scalesMutex, format](const std::string& n) -> at::Tensor {
        if (format == model::WeightFormat::kFp8 && model::fluxFp8Eligible(n)) {
          model::Fp8Rows q = ck.loadFp8(n);
          std::lock_guard<std::mutex> lock(*scalesMutex);
          (*scales)[model::fp8ScaleName(n)] = q.scale;
          return q.values;
        }
        if (format == model::WeightFormat::kFp8 && n.size() > 13 &&
            n.compare(n.size() - 13, 13, ".weight_scale") == 0) {
          std::lock_guard<std::mutex> lock(*scalesMutex);
          return scales->at(n);
        }
        return ck.load(n, at::kFloat);
      };
    };
    const at::Tensor ref = model::FluxTransformer(c, std::make_shared<model::ResidentFluxWeights>(c, getter(ck)),
                                                  std::make_shared<model::LocalAttention>())
                               .forward(in);
    memory::RankWorkload w;
    w.config = c;
    w.dtype = at::kFloat;
    w.weightFormat = format;
    for (const auto& g : model::fluxWeightGroups(c)) w.groups.push_back(g.name);
    w.imageTokens = Li;
    w.textTokens = Lt;
    const auto plan = memory::planRank(w, 1ULL << 40, memory::Offload::kSequential);
    // Tensors stored as they are used are read as bytes by several threads; the others through the getter.
    memory::StreamingOptions options;
    options.hostCache = false;
    options.format = format;
    options.readThreads = 3;
    options.prefetchDepth = 2;
    options.stored = [&streamed](const std::string& n, c10::ScalarType t) {
      return streamed.has(n) ? streamed.storedRanges(n, t) : std::vector<io::StoredRange>{};
    };
    auto streaming = std::make_shared<memory::StreamingFluxWeights>(c, getter(streamed), plan, at::kCPU, options);
    model::FluxTransformer t(c, streaming, std::make_shared<model::LocalAttention>());
    std::atomic<bool> done{false};
    std::atomic<uint64_t> polls{0};
    std::thread reader([&] {  // the engine's summaries read these while a run streams
      while (!done.load()) {
        (void)streamed.bytesRead();
        (void)streamed.tensorsLoaded().size();
        polls.fetch_add(1);
      }
    });
    for (int pass = 0; pass < 3; ++pass) {
      const at::Tensor out = t.forward(in);
      if (!at::equal(out, ref)) {
        std::fprintf(stderr, "%s pass %d: the streamed output differs from the resident one\n",
                     model::weightFormatName(format).c_str(), pass);
        ++failures;
      }
    }
    streaming->endOfRun();
    done.store(true);
    reader.join();
    std::printf("%s: 3 streamed passes, %llu groups fetched, %llu counter reads alongside, %llu bytes read\n",
                model::weightFormatName(format).c_str(),
                static_cast<unsigned long long>(streaming->streamedGroupsFetched()),
                static_cast<unsigned long long>(polls.load()), static_cast<unsigned long long>(streamed.bytesRead()));
  }
  return failures == 0 ? 0 : 1;
}
