#include "mpi_communicator.h"

#include <ATen/ATen.h>

#include <climits>

#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "profile_scope.h"

namespace pardit::dist {

namespace {
constexpr int kTag = 7301;

int byteCount(uint64_t bytes, const char* what) {
  PARDIT_CHECK(bytes <= static_cast<uint64_t>(INT_MAX), what, ": message of ", bytes,
               " bytes exceeds one MPI call's limit of 2 GiB");
  return static_cast<int>(bytes);
}

void checkCpu(const at::Tensor& t, const char* what) {
  PARDIT_CHECK(t.device().is_cpu(), what, ": the MPI backend takes CPU tensors, got ", t.device().str());
  PARDIT_CHECK(t.is_contiguous(), what, ": tensor must be contiguous");
}

class MpiWork final : public Work {
 public:
  MpiWork(at::Tensor keepAlive, Communicator* owner) : tensor_(std::move(keepAlive)), owner_(owner) {}
  ~MpiWork() override {
    if (request_ != MPI_REQUEST_NULL) {
      // Never throw from a destructor: complete the transfer quietly.
      MPI_Wait(&request_, MPI_STATUS_IGNORE);
    }
  }
  void wait() override {
    if (request_ == MPI_REQUEST_NULL) return;
    PARDIT_PROFILE_COMMUNICATION("wait");
    Timer t;
    const auto watched = owner_->watched("MPI_Wait (send/recv)");
    PARDIT_MPI_CHECK(MPI_Wait(&request_, MPI_STATUS_IGNORE));
    owner_->record(CollectiveKind::kSendRecv, 0, t.seconds(), 0);
  }
  MPI_Request* request() { return &request_; }

 private:
  at::Tensor tensor_;
  Communicator* owner_;
  MPI_Request request_ = MPI_REQUEST_NULL;
};
}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
  PARDIT_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  PARDIT_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owned_ && !finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCommunicator::allToAll(const at::Tensor& in, at::Tensor& out) {
  PARDIT_PROFILE_COMMUNICATION("all_to_all");
  checkCpu(in, "all_to_all");
  checkCpu(out, "all_to_all");
  PARDIT_CHECK(in.dim() >= 1 && in.size(0) == size_ && out.sizes() == in.sizes() && out.dtype() == in.dtype(),
               "all_to_all: dim 0 must equal the group size ", size_, " and out must match in");
  const uint64_t chunk = in.nbytes() / static_cast<uint64_t>(size_);
  Timer t;
  const auto watched = this->watched("MPI_Alltoall");
  PARDIT_MPI_CHECK(MPI_Alltoall(in.data_ptr(), byteCount(chunk, "all_to_all"), MPI_BYTE, out.data_ptr(),
                                byteCount(chunk, "all_to_all"), MPI_BYTE, comm_));
  record(CollectiveKind::kAllToAll, chunk * static_cast<uint64_t>(size_ - 1), t.seconds());
}

void MpiCommunicator::allGather(const at::Tensor& in, at::Tensor& out) {
  PARDIT_PROFILE_COMMUNICATION("all_gather");
  checkCpu(in, "all_gather");
  checkCpu(out, "all_gather");
  PARDIT_CHECK(out.nbytes() == in.nbytes() * static_cast<uint64_t>(size_) && out.dtype() == in.dtype(),
               "all_gather: output must hold ", size_, " copies of the input");
  Timer t;
  const int n = byteCount(in.nbytes(), "all_gather");
  const auto watched = this->watched("MPI_Allgather");
  PARDIT_MPI_CHECK(MPI_Allgather(in.data_ptr(), n, MPI_BYTE, out.data_ptr(), n, MPI_BYTE, comm_));
  record(CollectiveKind::kAllGather, in.nbytes() * static_cast<uint64_t>(size_ - 1), t.seconds());
}

void MpiCommunicator::broadcast(at::Tensor& tensor, int root) {
  PARDIT_PROFILE_COMMUNICATION("broadcast");
  checkCpu(tensor, "broadcast");
  Timer t;
  const auto watched = this->watched("MPI_Bcast");
  PARDIT_MPI_CHECK(MPI_Bcast(tensor.data_ptr(), byteCount(tensor.nbytes(), "broadcast"), MPI_BYTE, root, comm_));
  record(CollectiveKind::kBroadcast, rank_ == root ? tensor.nbytes() * static_cast<uint64_t>(size_ - 1) : 0,
         t.seconds());
}

void MpiCommunicator::allReduce(at::Tensor& tensor, ReduceOp op) {
  PARDIT_PROFILE_COMMUNICATION("all_reduce");
  checkCpu(tensor, "all_reduce");
  at::Tensor work = tensor;
  MPI_Datatype type;
  switch (tensor.scalar_type()) {
    case at::kFloat:
      type = MPI_FLOAT;
      break;
    case at::kDouble:
      type = MPI_DOUBLE;
      break;
    case at::kInt:
      type = MPI_INT32_T;
      break;
    case at::kLong:
      type = MPI_INT64_T;
      break;
    case at::kBFloat16:
    case at::kHalf:
      work = tensor.to(at::kFloat);
      type = MPI_FLOAT;
      break;
    default:
      PARDIT_THROW("all_reduce: unsupported dtype ", tensor.scalar_type());
  }
  const MPI_Op mop = op == ReduceOp::kSum ? MPI_SUM : op == ReduceOp::kMax ? MPI_MAX : MPI_MIN;
  PARDIT_CHECK(work.numel() <= INT_MAX, "all_reduce: too many elements for one MPI call");
  Timer t;
  const auto watched = this->watched("MPI_Allreduce");
  PARDIT_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, work.data_ptr(), static_cast<int>(work.numel()), type, mop, comm_));
  if (!work.is_same(tensor)) tensor.copy_(work);
  record(CollectiveKind::kAllReduce, tensor.nbytes() * 2 * static_cast<uint64_t>(size_ - 1) / size_, t.seconds());
}

void MpiCommunicator::send(const at::Tensor& tensor, int peer) {
  PARDIT_PROFILE_COMMUNICATION("send");
  checkCpu(tensor, "send");
  Timer t;
  const auto watched = this->watched("MPI_Send");
  PARDIT_MPI_CHECK(MPI_Send(tensor.data_ptr(), byteCount(tensor.nbytes(), "send"), MPI_BYTE, peer, kTag, comm_));
  record(CollectiveKind::kSendRecv, tensor.nbytes(), t.seconds());
}

void MpiCommunicator::recv(at::Tensor& tensor, int peer) {
  PARDIT_PROFILE_COMMUNICATION("recv");
  checkCpu(tensor, "recv");
  Timer t;
  MPI_Status status;
  const auto watched = this->watched("MPI_Recv");
  PARDIT_MPI_CHECK(
      MPI_Recv(tensor.data_ptr(), byteCount(tensor.nbytes(), "recv"), MPI_BYTE, peer, kTag, comm_, &status));
  int got = 0;
  MPI_Get_count(&status, MPI_BYTE, &got);
  PARDIT_CHECK(static_cast<uint64_t>(got) == tensor.nbytes(), "recv: expected ", tensor.nbytes(), " bytes from rank ",
               peer, ", got ", got);
  record(CollectiveKind::kSendRecv, 0, t.seconds());
}

std::unique_ptr<Work> MpiCommunicator::isend(const at::Tensor& tensor, int peer) {
  PARDIT_PROFILE_COMMUNICATION("isend");
  checkCpu(tensor, "isend");
  Timer t;
  auto w = std::make_unique<MpiWork>(tensor, this);
  PARDIT_MPI_CHECK(
      MPI_Isend(tensor.data_ptr(), byteCount(tensor.nbytes(), "isend"), MPI_BYTE, peer, kTag, comm_, w->request()));
  record(CollectiveKind::kSendRecv, tensor.nbytes(), t.seconds());
  return w;
}

std::unique_ptr<Work> MpiCommunicator::irecv(at::Tensor& tensor, int peer) {
  PARDIT_PROFILE_COMMUNICATION("irecv");
  checkCpu(tensor, "irecv");
  Timer t;
  auto w = std::make_unique<MpiWork>(tensor, this);
  PARDIT_MPI_CHECK(
      MPI_Irecv(tensor.data_ptr(), byteCount(tensor.nbytes(), "irecv"), MPI_BYTE, peer, kTag, comm_, w->request()));
  record(CollectiveKind::kSendRecv, 0, t.seconds());
  return w;
}

namespace {
class MpiPairWork final : public Work {
 public:
  MpiPairWork(std::unique_ptr<Work> a, std::unique_ptr<Work> b) : a_(std::move(a)), b_(std::move(b)) {}
  void wait() override {
    a_->wait();
    b_->wait();
  }

 private:
  std::unique_ptr<Work> a_, b_;
};
}  // namespace

std::unique_ptr<Work> MpiCommunicator::sendRecv(const at::Tensor& out, int to, at::Tensor& in, int from) {
  PARDIT_PROFILE_COMMUNICATION("send_recv");
  auto r = irecv(in, from);
  auto s = isend(out, to);
  return std::make_unique<MpiPairWork>(std::move(s), std::move(r));
}

void MpiCommunicator::barrier() {
  PARDIT_PROFILE_COMMUNICATION("barrier");
  Timer t;
  const auto watched = this->watched("MPI_Barrier");
  PARDIT_MPI_CHECK(MPI_Barrier(comm_));
  record(CollectiveKind::kBarrier, 0, t.seconds());
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  MPI_Comm comm;
  const auto watched = this->watched("MPI_Comm_split");
  PARDIT_MPI_CHECK(MPI_Comm_split(comm_, color, key, &comm));
  return std::make_unique<MpiCommunicator>(comm, /*owned=*/true);
}

}  // namespace pardit::dist
