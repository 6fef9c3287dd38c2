#include "pardit/pipeline/cuda_graph.h"

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "pardit/core/error.h"

#if defined(PARDIT_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pardit::pipeline {

namespace {

// The input tensors of a call, in a fixed order (undefined ones included).
std::vector<const at::Tensor*> fields(const model::FluxInputs& in) {
  return {&in.img, &in.txt, &in.pooled, &in.timestep, &in.guidance, &in.imgIds, &in.txtIds};
}
std::vector<at::Tensor*> fields(model::FluxInputs& in) {
  return {&in.img, &in.txt, &in.pooled, &in.timestep, &in.guidance, &in.imgIds, &in.txtIds};
}

// What a graph is specific to: each input's presence, dtype, device and shape.
std::vector<int64_t> signatureOf(const model::FluxInputs& in) {
  std::vector<int64_t> key;
  for (const at::Tensor* t : fields(in)) {
    if (!t->defined()) {
      key.push_back(-1);
      continue;
    }
    key.push_back(static_cast<int64_t>(t->scalar_type()));
    key.push_back(static_cast<int64_t>(t->device().type()) * 1000 + t->device().index());
    key.push_back(t->dim());
    for (int64_t s : t->sizes()) key.push_back(s);
  }
  return key;
}

}  // namespace

#if defined(PARDIT_WITH_CUDA)

struct CudaGraphTransformer::Impl {
  struct Graph {
    std::vector<int64_t> signature;
    bool warmedUp = false;           // its eager call ran
    model::FluxInputs in;            // static inputs, read by the graph
    at::Tensor out;                  // the graph's output (in its pool)
    std::unique_ptr<at::cuda::CUDAGraph> graph;
  };
  TransformerFn fn;
  std::vector<Graph> graphs;
  std::optional<c10::cuda::CUDAStream> captureStream;
  std::optional<c10::MempoolId_t> pool;  // shared by every graph here (they never run at once)
  CudaGraphStats stats;

  Graph& find(const std::vector<int64_t>& signature) {
    for (auto& g : graphs)
      if (g.signature == signature) return g;
    graphs.push_back(Graph{signature, false, {}, {}, nullptr});
    return graphs.back();
  }

  c10::cuda::CUDAStream stream(const c10::Device& device) {
    if (!captureStream) captureStream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
    return *captureStream;
  }

  // The eager call, on the capture stream: its cuBLAS workspace and other per-stream state exist before any
  // capture (made during one, they would come from the graph's pool and outlive it).
  at::Tensor eager(const model::FluxInputs& in) {
    const c10::cuda::CUDAGuard deviceGuard(in.img.device());
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream();
    const c10::cuda::CUDAStream side = stream(in.img.device());
    at::cuda::CUDAEvent inputsReady, outputReady;
    inputsReady.record(caller);
    inputsReady.block(side);
    at::Tensor out;
    {
      const c10::cuda::CUDAStreamGuard streamGuard(side);
      out = fn(in);
    }
    outputReady.record(side);
    outputReady.block(caller);
    out.record_stream(caller);  // allocated on the side stream, used on the caller's from now on
    return out;
  }

  void capture(Graph& g, const model::FluxInputs& in) {
    const c10::Device device = in.img.device();
    const c10::cuda::CUDAGuard deviceGuard(device);
    const auto dst = fields(g.in);
    const auto src = fields(in);
    for (size_t i = 0; i < dst.size(); ++i)
      if (src[i]->defined()) *dst[i] = at::empty(src[i]->sizes(), src[i]->options());
    // The eager call's activations sit idle in the caching allocator: released, so that the graph's pool
    // takes that memory instead of adding its own beside it.
    c10::cuda::device_synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    {
      const c10::cuda::CUDAStreamGuard streamGuard(stream(device));
      // Thread-local capture: other threads (the collective watchdog, a prefetcher) may call CUDA meanwhile.
      graph->capture_begin(pool ? *pool : c10::MempoolId_t{0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        g.out = fn(g.in);
      } catch (const std::exception& e) {
        try {
          graph->capture_end();
        } catch (...) {  // the capture is invalid already; its error is the one above
        }
        PARDIT_THROW("--cuda-graphs: the transformer call could not be captured in a CUDA graph (run without "
                    "--cuda-graphs): ", e.what());
      }
      graph->capture_end();
    }
    if (!pool) pool = graph->pool();
    g.graph = std::move(graph);
    ++stats.captures;
  }

  at::Tensor call(const model::FluxInputs& in) {
    PARDIT_CHECK(in.img.defined() && in.img.is_cuda(), "--cuda-graphs: the transformer inputs must be on a CUDA "
                 "device, got ", in.img.defined() ? in.img.device().str() : std::string("none"));
    Graph& g = find(signatureOf(in));
    if (!g.warmedUp) {
      g.warmedUp = true;
      ++stats.eagerCalls;
      return eager(in);
    }
    if (!g.graph) capture(g, in);
    const auto dst = fields(g.in);
    const auto src = fields(in);
    for (size_t i = 0; i < dst.size(); ++i)
      if (src[i]->defined()) dst[i]->copy_(*src[i]);
    g.graph->replay();
    ++stats.replays;
    return g.out.clone();
  }

  void release() {
    const bool any = !graphs.empty();
    graphs.clear();  // the graphs, their static tensors and outputs: the pool is freed with its last graph
    pool.reset();
    if (any) c10::cuda::CUDACachingAllocator::emptyCache();
  }
};

bool cudaGraphsBuilt() { return true; }

#else

struct CudaGraphTransformer::Impl {
  TransformerFn fn;
  CudaGraphStats stats;
  at::Tensor call(const model::FluxInputs&) { PARDIT_THROW("--cuda-graphs: this build has no CUDA"); }
  void release() {}
};

bool cudaGraphsBuilt() { return false; }

#endif

CudaGraphTransformer::CudaGraphTransformer(TransformerFn fn) : impl_(std::make_unique<Impl>()) {
  PARDIT_CHECK(cudaGraphsBuilt(), "--cuda-graphs needs a build with CUDA (LibTorch with CUDA); this one has none");
  PARDIT_CHECK(fn != nullptr, "CudaGraphTransformer needs a transformer call");
  impl_->fn = std::move(fn);
}

CudaGraphTransformer::~CudaGraphTransformer() = default;

at::Tensor CudaGraphTransformer::operator()(const model::FluxInputs& in) { return impl_->call(in); }

CudaGraphStats CudaGraphTransformer::stats() const { return impl_->stats; }

void CudaGraphTransformer::release() { impl_->release(); }

std::pair<TransformerFn, std::shared_ptr<CudaGraphTransformer>> cudaGraphed(TransformerFn fn) {
  auto graphs = std::make_shared<CudaGraphTransformer>(std::move(fn));
  return {[graphs](const model::FluxInputs& in) { return (*graphs)(in); }, graphs};
}

}  // namespace pardit::pipeline
