#pragma once
// The runtime of one rank: the world communicator, the per-group communicators of the topology, the
// local rank and the device each rank uses. Under MPI there is one Runtime per process, owned by main()
// (it initialises and finalises MPI); in-process jobs (dist/in_process.h) have one per rank thread.
// Non-copyable; its destructor never throws.

#include <c10/core/Device.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pardit/dist/communicator.h"
#include "pardit/dist/topology.h"
#include "pardit/dist/watchdog.h"

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

// Where a rank runs: its rank among the ranks of its node, their count, and the node's name.
struct RankPlacement {
  int localRank = 0;
  int localSize = 1;
  std::string host;
};

class Runtime {
 public:
  // Initialises MPI (MPI_THREAD_FUNNELED) unless already initialised; the world is MPI_COMM_WORLD.
  Runtime(int* argc, char*** argv);
  // A runtime over any world communicator (e.g. one rank of an in-process world).
  Runtime(std::unique_ptr<Communicator> world, RankPlacement placement);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int worldRank() const { return worldRank_; }
  int worldSize() const { return worldSize_; }
  int localRank() const { return localRank_; }
  int localSize() const { return localSize_; }
  std::string hostName() const { return host_; }

  // World communicator for CPU tensors (MPI, or the in-process backend).
  Communicator& world();

  // Data parallelism: the world cut into `groups` replica groups of worldSize()/groups consecutive ranks
  // (rank order puts the data-parallel index outermost). Returns a runtime over this rank's group, whose
  // world is the group (MPI when this one's is, so CUDA groups get NCCL); it keeps this runtime's node
  // placement (devices are picked by local rank on the node) and log rank tag. Collective over the world.
  std::unique_ptr<Runtime> replicaGroup(int groups);

  // Builds the topology and its group communicators (split from the world; NCCL too when `device` is
  // CUDA and the world is MPI). Collective over the world.
  void setTopology(const ParallelDegrees& degrees, const c10::Device& device);
  const Topology& topology() const { return topology_; }
  // This rank's communicator of a group kind, for tensors on the runtime's device.
  Communicator& group(GroupKind kind);
  // A CPU (MPI) communicator of the group, for host-side coordination.
  Communicator& cpuGroup(GroupKind kind);
  // The PipeFusion group again, as a communicator of its own, for the latents the last stage sends back
  // to the first: on NCCL a communicator's point-to-point operations run one after the other on the GPU
  // and a send waits for its receive, so sharing one with the forward activations makes a cycle (stage 0
  // sends patches on while the last stage waits to hand back an earlier one). The group's communicator
  // itself when PipeFusion has one stage.
  Communicator& pipelineReturn();
  // All ranks, for tensors on the topology's device: under MPI with CUDA an NCCL communicator over the
  // world, made on first use (so collective over the world: every rank calls it at the same point), else
  // world().
  Communicator& deviceWorld();

  // Runs `phase` on every rank; if it throws on any rank, the failing rank logs its message and every
  // rank throws CollectiveFailure, so all exit cleanly instead of hanging in the next collective.
  void agree(const std::function<void()>& phase);

  // Fails every rank when the ranks hold different values: `values` are (name, value) pairs in the same
  // order on every rank; the error names the first that differs, with rank 0's and this rank's values.
  // Collective over the world; run it inside agree().
  void checkSame(const std::vector<std::pair<std::string, std::string>>& values, const std::string& what,
                 const std::string& hint = "every rank must run the same command");

  // After an error on one rank of an MPI job: MPI_Abort, so that the other ranks do not wait for it.
  // Returns (leaving the exit to the caller) when the job has a single rank or MPI is not running.
  static void abortJob(int code);

  // The collective watchdog of this process (dist/watchdog.h): every communicator of this runtime is one of
  // its channels. Shared with the runtimes of replicaGroup(); off until a timeout is set.
  Watchdog& watchdog() { return *watchdog_; }

  // Sum of all communicators' counters per collective kind (this rank).
  std::map<std::string, CollectiveStats> collectiveTotals() const;

 private:
  struct Groups;
  int worldRank_ = 0, worldSize_ = 1, localRank_ = 0, localSize_ = 1;
  std::string host_;
  bool ownsMpi_ = false;
  Runtime() = default;
  // Declared before the communicators: destroyed after every one of them left it.
  std::shared_ptr<Watchdog> watchdog_ = std::make_shared<Watchdog>();
  bool mpiWorld_ = false;  // the world is MPI_COMM_WORLD (CUDA groups then get NCCL communicators)
  std::unique_ptr<Communicator> world_;
  Topology topology_;
  std::map<GroupKind, std::unique_ptr<Communicator>> cpuGroups_;
  std::map<GroupKind, std::unique_ptr<Communicator>> deviceGroups_;
  std::unique_ptr<Communicator> returnCpu_, returnDevice_;  // pipelineReturn()
  c10::Device device_ = c10::Device(c10::kCPU);
  std::unique_ptr<Communicator> deviceWorld_;
};

// Device of a rank: the CPU, or CUDA device localRank % visible devices for cuda (and auto with GPUs).
// --device: auto (CUDA when there is a GPU), cpu or cuda.
enum class DeviceKind { kAuto, kCpu, kCuda };

c10::Device deviceForRank(DeviceKind device, int localRank);

}  // namespace pardit::dist
