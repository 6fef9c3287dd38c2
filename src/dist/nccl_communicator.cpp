#include "nccl_communicator.h"

#include "pardit/core/error.h"
#include "profile_scope.h"

#if defined(PARDIT_WITH_NCCL)

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <nccl.h>
#include <cstring>

#include "pardit/core/log.h"
#include "pardit/core/timer.h"
#include "pardit/dist/watchdog.h"

#define PARDIT_NCCL_CHECK(call)                                                                    \
  do {                                                                                             \
    ncclResult_t r_ = (call);                                                                      \
    if (r_ != ncclSuccess) PARDIT_THROW("NCCL call ", #call, " failed: ", ncclGetErrorString(r_)); \
  } while (0)

namespace pardit::dist {

namespace {

ncclDataType_t ncclType(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ncclFloat32;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kDouble:
      return ncclFloat64;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
    case at::kChar:
      return ncclInt8;  // signed: max/min compare as int8
    case at::kByte:
    case at::kBool:
      return ncclUint8;
    default:
      PARDIT_THROW("NCCL: unsupported dtype ", t);
  }
}

void checkCuda(const at::Tensor& t, const char* what) {
  PARDIT_CHECK(t.device().is_cuda(), what, ": the NCCL backend takes CUDA tensors, got ", t.device().str());
  PARDIT_CHECK(t.is_contiguous(), what, ": tensor must be contiguous");
}

class NcclWork final : public Work {
 public:
  // Keeps the tensors alive until the transfer is ordered before the current stream's later work.
  NcclWork(std::vector<at::Tensor> keepAlive, at::cuda::CUDAEvent&& done)
      : tensors_(std::move(keepAlive)), done_(std::move(done)) {}
  void wait() override {
    PARDIT_PROFILE_COMMUNICATION("wait");
    done_.block(c10::cuda::getCurrentCUDAStream(tensors_.front().device().index()));
  }

 private:
  std::vector<at::Tensor> tensors_;
  at::cuda::CUDAEvent done_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Communicator& bootstrap, int device)
      : device_(device),
        rank_(bootstrap.rank()),
        size_(bootstrap.size()),
        p2pStream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device)) {
    // Rank 0 of the group creates the unique id; the MPI group carries it to the others.
    ncclUniqueId id;
    at::Tensor buf = at::zeros({static_cast<int64_t>(sizeof(id))}, at::kByte);
    if (rank_ == 0) {
      PARDIT_NCCL_CHECK(ncclGetUniqueId(&id));
      std::memcpy(buf.data_ptr(), &id, sizeof(id));
    }
    bootstrap.broadcast(buf, 0);
    std::memcpy(&id, buf.data_ptr(), sizeof(id));
    c10::cuda::CUDAGuard guard(device_);
    PARDIT_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
  }

  // Adopts an existing NCCL communicator (from ncclCommSplit).
  NcclCommunicator(ncclComm_t comm, int device)
      : device_(device), p2pStream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device)), comm_(comm) {
    PARDIT_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    PARDIT_NCCL_CHECK(ncclCommCount(comm_, &size_));
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  ~NcclCommunicator() override {
    unwatch();  // before the handle goes: the watchdog's thread may call the hooks
    if (comm_ != nullptr) {
      const ncclResult_t r = ncclCommDestroy(comm_);
      if (r != ncclSuccess) logWarn("ncclCommDestroy failed: ", ncclGetErrorString(r));
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void allToAll(const at::Tensor& in, at::Tensor& out) override {
    PARDIT_PROFILE_COMMUNICATION("all_to_all");
    checkCuda(in, "all_to_all");
    checkCuda(out, "all_to_all");
    PARDIT_CHECK(in.size(0) == size_ && out.sizes() == in.sizes(), "all_to_all: dim 0 must equal the group size");
    PARDIT_CHECK(out.scalar_type() == in.scalar_type(), "all_to_all: output dtype ", out.scalar_type(),
                 " differs from the input's ", in.scalar_type());
    const size_t count = static_cast<size_t>(in.numel() / size_);
    const size_t chunkBytes = count * in.element_size();
    auto stream = current(in);
    Timer t;
    PARDIT_NCCL_CHECK(ncclGroupStart());
    for (int peer = 0; peer < size_; ++peer) {
      PARDIT_NCCL_CHECK(ncclSend(static_cast<const char*>(in.data_ptr()) + peer * chunkBytes, count,
                                 ncclType(in.scalar_type()), peer, comm_, stream));
      PARDIT_NCCL_CHECK(ncclRecv(static_cast<char*>(out.data_ptr()) + peer * chunkBytes, count,
                                 ncclType(in.scalar_type()), peer, comm_, stream));
    }
    PARDIT_NCCL_CHECK(ncclGroupEnd());
    record(CollectiveKind::kAllToAll, chunkBytes * (size_ - 1), t.seconds());
  }

  void allGather(const at::Tensor& in, at::Tensor& out) override {
    PARDIT_PROFILE_COMMUNICATION("all_gather");
    checkCuda(in, "all_gather");
    checkCuda(out, "all_gather");
    PARDIT_CHECK(out.numel() == in.numel() * size_, "all_gather: output must hold ", size_, " copies of the input");
    PARDIT_CHECK(out.scalar_type() == in.scalar_type(), "all_gather: output dtype ", out.scalar_type(),
                 " differs from the input's ", in.scalar_type());
    Timer t;
    PARDIT_NCCL_CHECK(
        ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), ncclType(in.scalar_type()), comm_, current(in)));
    record(CollectiveKind::kAllGather, in.nbytes() * (size_ - 1), t.seconds());
  }

  void broadcast(at::Tensor& tensor, int root) override {
    PARDIT_PROFILE_COMMUNICATION("broadcast");
    checkCuda(tensor, "broadcast");
    Timer t;
    PARDIT_NCCL_CHECK(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                                    ncclType(tensor.scalar_type()), root, comm_, current(tensor)));
    record(CollectiveKind::kBroadcast, rank_ == root ? tensor.nbytes() * (size_ - 1) : 0, t.seconds());
  }

  void allReduce(at::Tensor& tensor, ReduceOp op) override {
    PARDIT_PROFILE_COMMUNICATION("all_reduce");
    checkCuda(tensor, "all_reduce");
    const ncclRedOp_t nop = op == ReduceOp::kSum ? ncclSum : op == ReduceOp::kMax ? ncclMax : ncclMin;
    Timer t;
    PARDIT_NCCL_CHECK(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                                    ncclType(tensor.scalar_type()), nop, comm_, current(tensor)));
    record(CollectiveKind::kAllReduce, tensor.nbytes() * 2 * (size_ - 1) / size_, t.seconds());
  }

  void send(const at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("send");
    checkCuda(tensor, "send");
    Timer t;
    PARDIT_NCCL_CHECK(
        ncclSend(tensor.data_ptr(), tensor.numel(), ncclType(tensor.scalar_type()), peer, comm_, current(tensor)));
    record(CollectiveKind::kSendRecv, tensor.nbytes(), t.seconds());
  }

  void recv(at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("recv");
    checkCuda(tensor, "recv");
    Timer t;
    PARDIT_NCCL_CHECK(
        ncclRecv(tensor.data_ptr(), tensor.numel(), ncclType(tensor.scalar_type()), peer, comm_, current(tensor)));
    record(CollectiveKind::kSendRecv, 0, t.seconds());
  }

  std::unique_ptr<Work> isend(const at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("isend");
    checkCuda(tensor, "isend");
    return p2p(tensor, peer, true);
  }

  std::unique_ptr<Work> irecv(at::Tensor& tensor, int peer) override {
    PARDIT_PROFILE_COMMUNICATION("irecv");
    checkCuda(tensor, "irecv");
    return p2p(tensor, peer, false);
  }

  std::unique_ptr<Work> sendRecv(const at::Tensor& out, int to, at::Tensor& in, int from) override {
    PARDIT_PROFILE_COMMUNICATION("send_recv");
    checkCuda(out, "send_recv");
    checkCuda(in, "send_recv");
    auto cur = c10::cuda::getCurrentCUDAStream(out.device().index());
    at::cuda::CUDAEvent ready;
    ready.record(cur);
    ready.block(p2pStream_);
    Timer t;
    PARDIT_NCCL_CHECK(ncclGroupStart());
    PARDIT_NCCL_CHECK(
        ncclSend(out.data_ptr(), out.numel(), ncclType(out.scalar_type()), to, comm_, p2pStream_.stream()));
    PARDIT_NCCL_CHECK(
        ncclRecv(in.data_ptr(), in.numel(), ncclType(in.scalar_type()), from, comm_, p2pStream_.stream()));
    PARDIT_NCCL_CHECK(ncclGroupEnd());
    record(CollectiveKind::kSendRecv, out.nbytes(), t.seconds());
    at::cuda::CUDAEvent done;
    done.record(p2pStream_);
    return std::make_unique<NcclWork>(std::vector<at::Tensor>{out, in}, std::move(done));
  }

  void barrier() override {
    PARDIT_PROFILE_COMMUNICATION("barrier");
    at::Tensor one = at::ones({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_));
    allReduce(one, ReduceOp::kSum);
    c10::cuda::getCurrentCUDAStream(device_).synchronize();
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    ncclComm_t comm = nullptr;
    c10::cuda::CUDAGuard guard(device_);
    PARDIT_NCCL_CHECK(ncclCommSplit(comm_, color, key, &comm, nullptr));
    return std::make_unique<NcclCommunicator>(comm, device_);
  }

 private:
  // The watchdog polls NCCL's asynchronous errors while an operation is watched (a failed peer ends the job
  // at once), names NCCL's last error in a timeout's message, and aborts the communicator before the job ends
  // (its kernels waiting for a lost peer return), as c10d's watchdog does with blocking communicators.
  Watchdog::Hooks watchHooks() override {
    const ncclComm_t comm = comm_;
    Watchdog::Hooks hooks;
    hooks.lastError = [comm]() -> std::string {
      const char* text = ncclGetLastError(comm);
      return text ? std::string(text) : std::string();
    };
    hooks.asyncError = [comm]() -> std::string {
      ncclResult_t state = ncclSuccess;
      if (ncclCommGetAsyncError(comm, &state) != ncclSuccess) return "";
      if (state == ncclSuccess || state == ncclInProgress) return "";
      const char* last = ncclGetLastError(comm);
      return std::string("NCCL reports ") + ncclGetErrorString(state) +
             (last && *last ? std::string(" (") + last + ")" : "");
    };
    hooks.abort = [comm] { (void)ncclCommAbort(comm); };
    return hooks;
  }
  cudaStream_t current(const at::Tensor& t) const {
    return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  }

  std::unique_ptr<Work> p2p(const at::Tensor& tensor, int peer, bool isSend) {
    // The transfer runs on the p2p stream after the work already queued on the current stream.
    auto cur = c10::cuda::getCurrentCUDAStream(tensor.device().index());
    at::cuda::CUDAEvent ready;
    ready.record(cur);
    ready.block(p2pStream_);
    Timer t;
    if (isSend) {
      PARDIT_NCCL_CHECK(ncclSend(tensor.data_ptr(), tensor.numel(), ncclType(tensor.scalar_type()), peer, comm_,
                                 p2pStream_.stream()));
    } else {
      PARDIT_NCCL_CHECK(ncclRecv(tensor.data_ptr(), tensor.numel(), ncclType(tensor.scalar_type()), peer, comm_,
                                 p2pStream_.stream()));
    }
    record(CollectiveKind::kSendRecv, isSend ? tensor.nbytes() : 0, t.seconds());
    at::cuda::CUDAEvent done;
    done.record(p2pStream_);
    return std::make_unique<NcclWork>(std::vector<at::Tensor>{tensor}, std::move(done));
  }

  int device_;
  int rank_ = 0, size_ = 1;
  c10::cuda::CUDAStream p2pStream_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace

bool ncclAvailable() { return true; }

std::unique_ptr<Communicator> makeNcclCommunicator(Communicator& bootstrap, int device) {
  return std::make_unique<NcclCommunicator>(bootstrap, device);
}

}  // namespace pardit::dist

#else  // !PARDIT_WITH_NCCL

namespace pardit::dist {
bool ncclAvailable() { return false; }
std::unique_ptr<Communicator> makeNcclCommunicator(Communicator&, int) {
  PARDIT_THROW("this pardit build has no NCCL backend (LibTorch without CUDA, or nccl.h not found)");
}
}  // namespace pardit::dist

#endif
