#pragma once
// MPI backend of Communicator (CPU tensors). Private to src/dist.
#include <mpi.h>

#include <memory>

#include "pardit/dist/communicator.h"

namespace pardit::dist {

#define PARDIT_MPI_CHECK(call)                                                \
  do {                                                                        \
    int rc_ = (call);                                                         \
    if (rc_ != MPI_SUCCESS) {                                                 \
      char msg_[MPI_MAX_ERROR_STRING];                                        \
      int len_ = 0;                                                           \
      MPI_Error_string(rc_, msg_, &len_);                                     \
      PARDIT_THROW("MPI call ", #call, " failed: ", std::string(msg_, len_)); \
    }                                                                         \
  } while (0)

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed in the destructor) unless `owned` is false.
  MpiCommunicator(MPI_Comm comm, bool owned);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  MPI_Comm handle() const { return comm_; }

  void allToAll(const at::Tensor& in, at::Tensor& out) override;
  void allGather(const at::Tensor& in, at::Tensor& out) override;
  void broadcast(at::Tensor& tensor, int root) override;
  void allReduce(at::Tensor& tensor, ReduceOp op) override;
  void send(const at::Tensor& tensor, int peer) override;
  void recv(at::Tensor& tensor, int peer) override;
  std::unique_ptr<Work> isend(const at::Tensor& tensor, int peer) override;
  std::unique_ptr<Work> irecv(at::Tensor& tensor, int peer) override;
  std::unique_ptr<Work> sendRecv(const at::Tensor& out, int to, at::Tensor& in, int from) override;
  void barrier() override;
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace pardit::dist
