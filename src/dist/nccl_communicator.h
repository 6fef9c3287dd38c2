#pragma once
// NCCL backend of Communicator (CUDA tensors). Private to src/dist; compiled when LibTorch has CUDA and
// NCCL's header is found.
#include <memory>

#include "pardit/dist/communicator.h"

namespace pardit::dist {

bool ncclAvailable();
// Creates an NCCL communicator over the ranks of `bootstrap` (an MPI communicator of the same group),
// for CUDA device `device`. Collective over the group.
std::unique_ptr<Communicator> makeNcclCommunicator(Communicator& bootstrap, int device);

}  // namespace pardit::dist
