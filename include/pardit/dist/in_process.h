#pragma once
// N ranks as threads of one process, behind the same Communicator interface (and byte counters) as the
// MPI and NCCL backends. Tests use it to run the parallel code (topology, Ulysses, Ring, CFG,
// PipeFusion, the whole engine) without mpiexec; a C++ program can use it to simulate a job.
//
// Semantics: collectives are rendezvous of every rank of the group (the last rank to arrive computes
// every output, so no rank returns before all outputs are written). Point-to-point, by default, is
// buffered (the tensor is copied), so isend/send complete at once and receives take messages in the order
// they were sent between a pair of ranks. PointToPoint::kRendezvous models NCCL on GPUs instead: a rank's
// point-to-point operations on one communicator complete one after the other in the order they were
// issued, a send only together with its matching receive (nothing is buffered), and a sendRecv is one
// grouped operation whose send and receive progress together; an exchange that can never complete is
// reported (an error naming the rank and its pending operation) instead of hanging. If any rank of an
// in-process world fails, every rank blocked in, or later entering, a collective of that world throws
// instead of waiting forever.

#include <functional>
#include <memory>
#include <vector>

#include "pardit/dist/communicator.h"

namespace pardit::dist {

class Runtime;

// The world communicators of `size` in-process ranks; element r belongs to rank r (hand it to the
// thread that plays rank r).
enum class PointToPoint { kBuffered, kRendezvous };

std::vector<std::unique_ptr<Communicator>> makeInProcessWorld(int size, PointToPoint p2p = PointToPoint::kBuffered);

// Runs `body` on `size` threads, each with its own Runtime over one in-process world, and returns
// when all are done. The first exception thrown by any rank is rethrown here (the other ranks are
// released from their collectives and their errors dropped).
void runInProcess(int size, const std::function<void(Runtime&)>& body, PointToPoint p2p = PointToPoint::kBuffered);

// How long a rendezvous point-to-point wait may make no progress before it is reported as a deadlock
// (default 60 s; tests of the report shorten it).
void setInProcessDeadlockSeconds(double seconds);

}  // namespace pardit::dist
