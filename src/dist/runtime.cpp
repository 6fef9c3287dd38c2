#include "pardit/dist/runtime.h"

#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

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
  MPI_Comm_rank(local, &localRank_);
  MPI_Comm_size(local, &localSize_);
  MPI_Comm_free(&local);
  char name[256] = {0};
  ::gethostname(name, sizeof(name) - 1);
  host_ = name;
  world_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, /*owned=*/false);
  setLogRank(worldRank_, worldSize_);
}

Runtime::~Runtime() {
  deviceGroups_.clear();
  cpuGroups_.clear();
  world_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (ownsMpi_ && !finalized) MPI_Finalize();
}

Communicator& Runtime::world() { return *world_; }

void Runtime::setTopology(const ParallelDegrees& degrees, const c10::Device& device) {
  Topology::validate(degrees, worldSize_);
  topology_ = Topology(degrees, worldRank_);
  deviceGroups_.clear();
  cpuGroups_.clear();
  for (GroupKind kind : {GroupKind::kUlysses, GroupKind::kRing, GroupKind::kSequence, GroupKind::kPipeFusion,
                         GroupKind::kCfg}) {
    MPI_Comm comm;
    PARDIT_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, topology_.groupColor(kind), topology_.rankInGroup(kind), &comm));
    auto cpu = std::make_unique<MpiCommunicator>(comm, /*owned=*/true);
    PARDIT_CHECK(cpu->size() == static_cast<int>(topology_.group(kind).size()), "internal: ", groupName(kind),
                 " group has ", cpu->size(), " ranks, expected ", topology_.group(kind).size());
    if (device.is_cuda() && cpu->size() > 1) deviceGroups_[kind] = makeNcclCommunicator(*cpu, device.index());
    cpuGroups_[kind] = std::move(cpu);
  }
}

Communicator& Runtime::group(GroupKind kind) {
  auto it = deviceGroups_.find(kind);
  if (it != deviceGroups_.end()) return *it->second;
  return cpuGroup(kind);
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
  int mine = failed ? worldRank_ : worldSize_;
  int first = mine;
  if (worldSize_ > 1) PARDIT_MPI_CHECK(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  if (first == worldRank_) {
    logError(message);
    if (!location.empty()) logDebug("raised at ", location);
  }
  if (first < worldSize_) throw CollectiveFailure(first);
}

void Runtime::abortJob(int code) {
  int initialized = 0, finalized = 0, size = 1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) {
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
    MPI_Finalize();
  }
  std::exit(code);
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
  return totals;
}

c10::Device deviceForRank(const std::string& device, int localRank) {
  const int gpus = at::hasCUDA() ? static_cast<int>(at::detail::getCUDAHooks().deviceCount()) : 0;
  if (device == "cpu") return c10::Device(c10::kCPU);
  if (device == "auto" && gpus == 0) return c10::Device(c10::kCPU);
  PARDIT_CHECK(device == "auto" || device == "cuda", "--device must be auto, cpu or cuda, got '", device, "'");
  PARDIT_CHECK(gpus > 0, "--device cuda: no CUDA device is visible to this rank");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(localRank % gpus));
}

}  // namespace pardit::dist
