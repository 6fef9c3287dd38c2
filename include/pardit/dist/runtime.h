#pragma once
// The process runtime: MPI initialisation and finalisation, the world and the per-group communicators
// of the topology, the local rank (from a shared-memory split) and the device each rank uses.
// One Runtime per process, owned by main(); it is move-only and its destructor never throws.

#include <c10/core/Device.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "pardit/dist/communicator.h"
#include "pardit/dist/topology.h"

namespace pardit::dist {

// Thrown on every rank when a phase run through Runtime::agree() failed on some rank; the failing
// rank has already printed its message.
class CollectiveFailure : public std::runtime_error {
 public:
  explicit CollectiveFailure(int failedRank)
      : std::runtime_error("failed on rank " + std::to_string(failedRank)), failedRank_(failedRank) {}
  int failedRank() const { return failedRank_; }

 private:
  int failedRank_;
};

class Runtime {
 public:
  // Initialises MPI (MPI_THREAD_FUNNELED) unless already initialised.
  Runtime(int* argc, char*** argv);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int worldRank() const { return worldRank_; }
  int worldSize() const { return worldSize_; }
  int localRank() const { return localRank_; }
  int localSize() const { return localSize_; }
  std::string hostName() const { return host_; }

  // World communicator on the CPU (MPI).
  Communicator& world();

  // Builds the topology and its group communicators (MPI; NCCL too when `device` is CUDA).
  // Collective over the world.
  void setTopology(const ParallelDegrees& degrees, const c10::Device& device);
  const Topology& topology() const { return topology_; }
  // This rank's communicator of a group kind, for tensors on the runtime's device.
  Communicator& group(GroupKind kind);
  // A CPU (MPI) communicator of the group, for host-side coordination.
  Communicator& cpuGroup(GroupKind kind);

  // Runs `phase` on every rank; if it throws on any rank, the failing rank logs its message and every
  // rank throws CollectiveFailure, so all exit cleanly instead of hanging in the next collective.
  void agree(const std::function<void()>& phase);

  // Ends the job from any rank after an error: MPI_Abort when there are other ranks.
  [[noreturn]] static void abortJob(int code);

  // Sum of all communicators' counters per collective kind (this rank).
  std::map<std::string, CollectiveStats> collectiveTotals() const;

 private:
  struct Groups;
  int worldRank_ = 0, worldSize_ = 1, localRank_ = 0, localSize_ = 1;
  std::string host_;
  bool ownsMpi_ = false;
  std::unique_ptr<Communicator> world_;
  Topology topology_;
  std::map<GroupKind, std::unique_ptr<Communicator>> cpuGroups_;
  std::map<GroupKind, std::unique_ptr<Communicator>> deviceGroups_;
};

// Device of a rank: "cpu", or CUDA device localRank % visible devices for "cuda"/"auto" with GPUs.
c10::Device deviceForRank(const std::string& device, int localRank);

}  // namespace pardit::dist
