#include "pardit/dist/runtime.h"

#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "mpi_communicator.h"
#include "nccl_communicator.h"
#include "pardit/core/error.h"
#include "pardit/core/log.h"

namespace pardit::dist {

Runtime::Runtime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    PARDIT_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    ownsMpi_ = true;
  }
  // Errors come back as codes and become pardit::Error, never a silent abort inside MPI.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  PARDIT_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &worldRank_));
  PARDIT_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &worldSize_));
  MPI_Comm local;
  PARDIT_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, worldRank_, MPI_INFO_NULL, &local));
  PARDIT_MPI_CHECK(MPI_Comm_rank(local, &localRank_));
  PARDIT_MPI_CHECK(MPI_Comm_size(local, &localSize_));
  PARDIT_MPI_CHECK(MPI_Comm_free(&local));
  char name[256] = {0};
  ::gethostname(name, sizeof(name) - 1);
  host_ = name;
  world_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, /*owned=*/false);
  world_->watchWith(watchdog_, "the world");
  mpiWorld_ = true;
  setLogRank(worldRank_, worldSize_);
}

Runtime::Runtime(std::unique_ptr<Communicator> world, RankPlacement placement)
    : worldRank_(world->rank()),
      worldSize_(world->size()),
      localRank_(placement.localRank),
      localSize_(placement.localSize),
      host_(std::move(placement.host)),
      world_(std::move(world)) {
  world_->watchWith(watchdog_, "the world");
  setLogRank(worldRank_, worldSize_);
}

Runtime::~Runtime() {
  deviceWorld_.reset();
  returnDevice_.reset();
  returnCpu_.reset();
  deviceGroups_.clear();
  cpuGroups_.clear();
  world_.reset();
  watchdog_.reset();  // joins its thread unless a replica group's runtime still shares it
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (ownsMpi_ && !finalized) MPI_Finalize();
}

Communicator& Runtime::world() { return *world_; }

std::unique_ptr<Runtime> Runtime::replicaGroup(int groups) {
  PARDIT_CHECK(groups >= 1 && worldSize_ % groups == 0, "--data-parallel-degree ", groups, " does not divide the ",
               worldSize_, " ranks of the job");
  const int size = worldSize_ / groups;
  std::unique_ptr<Runtime> g(new Runtime());
  g->watchdog_ = watchdog_;  // one watchdog per process
  g->world_ = world_->split(worldRank_ / size, worldRank_);
  g->world_->watchWith(watchdog_, "replica group " + std::to_string(worldRank_ / size));
  g->worldRank_ = g->world_->rank();
  g->worldSize_ = g->world_->size();
  g->localRank_ = localRank_;
  g->localSize_ = localSize_;
  g->host_ = host_;
  g->mpiWorld_ = mpiWorld_;
  PARDIT_CHECK(g->worldSize_ == size, "internal: a replica group of ", g->worldSize_, " ranks, expected ", size);
  return g;
}

void Runtime::setTopology(const ParallelDegrees& degrees, const c10::Device& device) {
  Topology::validate(degrees, worldSize_);
  topology_ = Topology(degrees, worldRank_);
  device_ = device;
  deviceWorld_.reset();
  returnDevice_.reset();
  returnCpu_.reset();
  deviceGroups_.clear();
  cpuGroups_.clear();
  for (GroupKind kind :
       {GroupKind::kUlysses, GroupKind::kRing, GroupKind::kSequence, GroupKind::kPipeFusion, GroupKind::kCfg}) {
    auto cpu = world_->split(topology_.groupColor(kind), topology_.rankInGroup(kind));
    PARDIT_CHECK(cpu->size() == static_cast<int>(topology_.group(kind).size()), "internal: ", groupName(kind),
                 " group has ", cpu->size(), " ranks, expected ", topology_.group(kind).size());
    // CUDA tensors travel over NCCL under MPI; the in-process backend takes them as they are.
    cpu->watchWith(watchdog_, std::string("the ") + groupName(kind) + " group");
    if (device.is_cuda() && cpu->size() > 1 && mpiWorld_) {
      deviceGroups_[kind] = makeNcclCommunicator(*cpu, device.index());
      deviceGroups_[kind]->watchWith(watchdog_, std::string("the ") + groupName(kind) + " group (NCCL)");
    }
    cpuGroups_[kind] = std::move(cpu);
  }
  Communicator& pipeline = *cpuGroups_[GroupKind::kPipeFusion];
  if (pipeline.size() > 1) {
    returnCpu_ = pipeline.split(0, pipeline.rank());
    returnCpu_->watchWith(watchdog_, "the PipeFusion return");
    if (device.is_cuda() && mpiWorld_) {
      returnDevice_ = makeNcclCommunicator(*returnCpu_, device.index());
      returnDevice_->watchWith(watchdog_, "the PipeFusion return (NCCL)");
    }
  }
}

Communicator& Runtime::pipelineReturn() {
  if (returnDevice_) return *returnDevice_;
  if (returnCpu_) return *returnCpu_;
  return group(GroupKind::kPipeFusion);
}

Communicator& Runtime::group(GroupKind kind) {
  auto it = deviceGroups_.find(kind);
  if (it != deviceGroups_.end()) return *it->second;
  return cpuGroup(kind);
}

Communicator& Runtime::deviceWorld() {
  if (!device_.is_cuda() || !mpiWorld_ || worldSize_ == 1) return world();
  if (!deviceWorld_) {
    deviceWorld_ = makeNcclCommunicator(*world_, device_.index());
    deviceWorld_->watchWith(watchdog_, "the world (NCCL)");
  }
  return *deviceWorld_;
}

Communicator& Runtime::cpuGroup(GroupKind kind) {
  auto it = cpuGroups_.find(kind);
  PARDIT_CHECK(it != cpuGroups_.end(), "the topology is not set up (", groupName(kind), " group)");
  return *it->second;
}

void Runtime::agree(const std::function<void()>& phase) {
  int failed = 0;
  std::string message, location;
  try {
    phase();
  } catch (const Error& e) {
    message = e.message();
    location = e.location();
    failed = 1;
  } catch (const std::exception& e) {
    message = e.what();
    failed = 1;
  }
  // The lowest failing rank, or worldSize_ when none failed. Only that rank prints, so an error every
  // rank ran into (a bad flag) is reported once.
  at::Tensor lowest = at::full({1}, failed ? worldRank_ : worldSize_, at::kInt);
  if (worldSize_ > 1) world_->allReduce(lowest, ReduceOp::kMin);
  const int first = lowest.item<int>();
  if (first == worldRank_) {
    logError(message);
    if (!location.empty()) logDebug("raised at ", location);
  }
  if (first < worldSize_) throw CollectiveFailure(first);
}

void Runtime::checkSame(const std::vector<std::pair<std::string, std::string>>& values, const std::string& what,
                        const std::string& hint) {
  if (worldSize_ == 1) return;
  // Rank 0's values, as "name\0value\0..." bytes, go to every rank; each compares with its own.
  std::string mine;
  for (const auto& [name, value] : values) mine += name + '\0' + value + '\0';
  at::Tensor size = at::full({1}, static_cast<int64_t>(mine.size()), at::kLong);
  world_->broadcast(size, 0);
  at::Tensor bytes = at::zeros({size.item<int64_t>()}, at::kByte);
  if (worldRank_ == 0) std::memcpy(bytes.data_ptr(), mine.data(), mine.size());
  world_->broadcast(bytes, 0);
  std::map<std::string, std::string> root;
  std::vector<std::string> rootOrder;
  const char* p = reinterpret_cast<const char*>(bytes.data_ptr());
  const char* end = p + bytes.numel();
  while (p < end) {
    std::string name(p);
    p += name.size() + 1;
    std::string value(p < end ? p : "");
    p += value.size() + 1;
    rootOrder.push_back(name);
    root[name] = value;
  }
  for (const auto& [name, value] : values) {
    auto it = root.find(name);
    PARDIT_CHECK(it != root.end(), what, " differ between ranks: rank ", worldRank_, " has ", name,
                 " and rank 0 does not; ", hint);
    PARDIT_CHECK(it->second == value, what, " differ between ranks: ", name, " is '", it->second, "' on rank 0 and '",
                 value, "' on rank ", worldRank_, "; ", hint);
  }
  for (const auto& name : rootOrder) {
    const bool here = std::any_of(values.begin(), values.end(), [&](const auto& v) { return v.first == name; });
    PARDIT_CHECK(here, what, " differ between ranks: rank 0 has ", name, " and rank ", worldRank_, " does not; ", hint);
  }
}

void Runtime::abortJob(int code) {
  int initialized = 0, finalized = 0, size = 1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) {
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
  }
}

std::map<std::string, CollectiveStats> Runtime::collectiveTotals() const {
  std::map<std::string, CollectiveStats> totals;
  auto add = [&](const Communicator& c) {
    for (size_t k = 0; k < static_cast<size_t>(CollectiveKind::kCount); ++k) {
      const auto& s = c.stats(static_cast<CollectiveKind>(k));
      auto& t = totals[collectiveName(static_cast<CollectiveKind>(k))];
      t.calls += s.calls;
      t.bytes += s.bytes;
      t.seconds += s.seconds;
    }
  };
  if (world_) add(*world_);
  for (const auto& [k, c] : cpuGroups_) add(*c);
  for (const auto& [k, c] : deviceGroups_) add(*c);
  for (const auto* c : {returnCpu_.get(), returnDevice_.get(), deviceWorld_.get()})
    if (c) add(*c);
  return totals;
}

c10::Device deviceForRank(DeviceKind device, int localRank) {
  const int gpus = at::hasCUDA() ? static_cast<int>(at::detail::getCUDAHooks().deviceCount()) : 0;
  if (device == DeviceKind::kCpu) return c10::Device(c10::kCPU);
  if (device == DeviceKind::kAuto && gpus == 0) return c10::Device(c10::kCPU);
  PARDIT_CHECK(gpus > 0, "--device cuda: no CUDA device is visible to this rank");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(localRank % gpus));
}

}  // namespace pardit::dist
