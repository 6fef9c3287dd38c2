#pragma once
// A transformer call captured in a CUDA graph and replayed (--cuda-graphs). A denoise step calls the
// transformer with tensors of the same shapes every time, and every allocation of the call comes from
// PyTorch's caching allocator, so the whole call (a few thousand kernel launches for FLUX.1) can be
// recorded once and replayed with one launch:
//   * the first call with a given input signature (shapes, dtypes, devices) copies its inputs into the
//     graph's static input tensors and runs eagerly on them, on the stream the graph will be captured on:
//     a rehearsal of the capture, so the lazy initializations (cuBLAS workspaces for that stream,
//     attention plans, kernels loaded) happen outside any capture;
//   * the second is captured there into a private memory pool (shared by every graph of this object)
//     after the caching allocator's idle blocks are released, so the graph's activations take the memory
//     the eager call used instead of adding to it. A capture that fails (something in the call that a
//     graph cannot hold) is undone in the allocator and reported, then and on every later call;
//   * from then on the inputs are copied into the graph's static input tensors and the graph is replayed
//     on the caller's stream; the output is copied out (the next replay overwrites the graph's own).
// Replays run the same kernels on the same data as the eager call: the results are bit-identical. Memory:
// the graphs share one pool, about one call's activations; the rehearsal of a second input shape (true CFG
// with prompts of two lengths) runs beside it, so for that one call the activations are held twice.
// Every input must be on the one GPU of the call. Only a call without host synchronizations or communication
// inside can be captured: one GPU's whole transformer with resident weights (the engine refuses --cuda-graphs with
// Ulysses/Ring, PipeFusion or streamed weights). Built without CUDA, constructing one throws.
#include <ATen/core/Tensor.h>

#include <memory>

#include "pardit/pipeline/denoise.h"

namespace pardit::pipeline {

struct CudaGraphStats {
  int eagerCalls = 0;  // the first call of each input signature
  int captures = 0;    // graphs recorded (one per signature)
  int replays = 0;     // calls answered by a replay (the capturing call included)
};

class CudaGraphTransformer {
 public:
  explicit CudaGraphTransformer(TransformerFn fn);
  ~CudaGraphTransformer();
  CudaGraphTransformer(const CudaGraphTransformer&) = delete;
  CudaGraphTransformer& operator=(const CudaGraphTransformer&) = delete;

  // The transformer's output for `in` (CUDA tensors), eagerly or by a replay.
  at::Tensor operator()(const model::FluxInputs& in);
  // The wrapped call itself, eagerly on the caller's stream (an operator profile of a replay would see one
  // launch).
  at::Tensor eager(const model::FluxInputs& in) const;
  CudaGraphStats stats() const;
  // Frees the graphs and their memory pool (after the denoise loop, before the VAE decode needs the memory);
  // a later call starts over with an eager call.
  void release();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Whether this build can capture CUDA graphs (LibTorch with CUDA).
bool cudaGraphsBuilt();

// `fn` replayed from CUDA graphs, and the object that holds them (for its statistics and release()).
std::pair<TransformerFn, std::shared_ptr<CudaGraphTransformer>> cudaGraphed(TransformerFn fn);

}  // namespace pardit::pipeline
