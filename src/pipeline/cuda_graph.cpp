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
    model::FluxInputs in;  // static inputs: the eager call's and the graph's
    at::Tensor out;        // the graph's output (in the pool)
    std::unique_ptr<at::cuda::CUDAGraph> graph;
    std::string failure;  // why its capture failed (then every later call says so)
  };
  TransformerFn fn;
  std::vector<Graph> graphs;
  std::optional<c10::Device> device;          // the one GPU of every call
  std::optional<c10::cuda::CUDAStream> side;  // where the eager calls run and the graphs are captured
  std::optional<c10::MempoolId_t> pool;       // shared by every graph here (they never run at once)
  CudaGraphStats stats;

  // Checks the inputs and returns their graph, new (without static inputs) if this signature is new.
  Graph& find(const model::FluxInputs& in) {
    PARDIT_CHECK(in.img.defined() && in.img.is_cuda(),
                 "--cuda-graphs: the transformer inputs must be on a CUDA "
                 "device, got ",
                 in.img.defined() ? in.img.device().str() : std::string("none"));
    for (const at::Tensor* t : fields(in))
      PARDIT_CHECK(!t->defined() || t->device() == in.img.device(),
                   "--cuda-graphs: every transformer input must be "
                   "on ",
                   in.img.device().str(), " (a graph cannot copy from elsewhere), got one on ", t->device().str());
    if (!device) {
      device = in.img.device();
      side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device->index());
    }
    PARDIT_CHECK(in.img.device() == *device, "--cuda-graphs: the transformer call moved from ", device->str(), " to ",
                 in.img.device().str());
    const auto signature = signatureOf(in);
    for (auto& g : graphs)
      if (g.signature == signature) return g;
    graphs.push_back(Graph{signature, {}, {}, nullptr, {}});
    return graphs.back();
  }

  void copyIn(Graph& g, const model::FluxInputs& in) {
    const auto dst = fields(g.in);
    const auto src = fields(in);
    for (size_t i = 0; i < dst.size(); ++i)
      if (src[i]->defined()) dst[i]->copy_(*src[i]);
  }

  // The first call of a signature: its static inputs made and filled, then the call run eagerly on them on
  // the side stream, exactly as it will be captured there: the lazy initializations (cuBLAS workspaces for
  // that stream, attention plans, kernels loaded) happen outside any capture.
  at::Tensor rehearse(Graph& g, const model::FluxInputs& in) {
    const auto dst = fields(g.in);
    const auto src = fields(in);
    for (size_t i = 0; i < dst.size(); ++i)
      if (src[i]->defined()) *dst[i] = at::empty(src[i]->sizes(), src[i]->options());
    copyIn(g, in);
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device->index());
    at::cuda::CUDAEvent inputsReady, outputReady;
    inputsReady.record(caller);
    inputsReady.block(*side);
    at::Tensor out;
    std::exception_ptr failure;
    {
      const c10::cuda::CUDAStreamGuard streamGuard(*side);
      try {
        out = fn(g.in);
      } catch (...) {
        failure = std::current_exception();
      }
    }
    // Whatever happened, the caller's stream goes on only after the side stream's work (the static inputs
    // and anything freed by the call are not reused under it).
    outputReady.record(*side);
    outputReady.block(caller);
    if (failure) std::rethrow_exception(failure);
    out.record_stream(caller);  // allocated on the side stream, used on the caller's from now on
    ++stats.eagerCalls;
    return out;
  }

  void capture(Graph& g) {
    // The eager call's activations sit idle in the caching allocator: released, so that the graph's pool
    // takes that memory instead of adding its own beside it.
    c10::cuda::device_synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
    if (!pool) pool = at::cuda::graph_pool_handle();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    const c10::cuda::CUDAStreamGuard streamGuard(*side);
    // Thread-local capture: other threads (the collective watchdog, a prefetcher) may call CUDA meanwhile.
    graph->capture_begin(*pool, cudaStreamCaptureModeThreadLocal);
    std::string failure;
    try {
      g.out = fn(g.in);
    } catch (const std::exception& e) {
      failure = e.what();
    }
    try {
      graph->capture_end();
    } catch (const std::exception& e) {
      // The capture was invalidated (a host synchronization inside the call, say): undo what capture_begin
      // set up and capture_end could not, so the allocator leaves capture mode and the pool's count holds.
      if (failure.empty()) failure = e.what();
      try {
        c10::cuda::CUDACachingAllocator::endAllocateToPool(device->index(), *pool);
        c10::cuda::CUDACachingAllocator::releasePool(device->index(), *pool);
      } catch (...) {  // nothing more to undo
      }
    }
    if (!failure.empty()) {
      g.out = at::Tensor();
      g.failure = failure;
      PARDIT_THROW(
          "--cuda-graphs: the transformer call could not be captured in a CUDA graph (run without "
          "--cuda-graphs): ",
          failure);
    }
    g.graph = std::move(graph);
    ++stats.captures;
  }

  at::Tensor call(const model::FluxInputs& in) {
    Graph& g = find(in);
    const c10::cuda::CUDAGuard deviceGuard(*device);
    PARDIT_CHECK(g.failure.empty(),
                 "--cuda-graphs: the transformer call could not be captured in a CUDA graph (run "
                 "without --cuda-graphs): ",
                 g.failure);
    if (!g.in.img.defined()) return rehearse(g, in);
    if (!g.graph) capture(g);
    copyIn(g, in);
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

at::Tensor CudaGraphTransformer::eager(const model::FluxInputs& in) const { return impl_->fn(in); }

CudaGraphStats CudaGraphTransformer::stats() const { return impl_->stats; }

void CudaGraphTransformer::release() { impl_->release(); }

std::pair<TransformerFn, std::shared_ptr<CudaGraphTransformer>> cudaGraphed(TransformerFn fn) {
  auto graphs = std::make_shared<CudaGraphTransformer>(std::move(fn));
  return {[graphs](const model::FluxInputs& in) { return (*graphs)(in); }, graphs};
}

}  // namespace pardit::pipeline
