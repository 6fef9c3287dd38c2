#include "pardit/dist/communicator.h"

#include <ATen/ATen.h>

namespace pardit::dist {

const char* collectiveName(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllToAll:
      return "all_to_all";
    case CollectiveKind::kAllGather:
      return "all_gather";
    case CollectiveKind::kBroadcast:
      return "broadcast";
    case CollectiveKind::kAllReduce:
      return "all_reduce";
    case CollectiveKind::kSendRecv:
      return "send_recv";
    case CollectiveKind::kBarrier:
      return "barrier";
    case CollectiveKind::kCount:
      break;
  }
  return "?";
}

at::Tensor allToAll(Communicator& comm, const at::Tensor& in) {
  at::Tensor src = in.contiguous();
  at::Tensor out = at::empty_like(src);
  comm.allToAll(src, out);
  return out;
}

at::Tensor allGather(Communicator& comm, const at::Tensor& in) {
  at::Tensor src = in.contiguous();
  std::vector<int64_t> shape{comm.size()};
  for (auto d : src.sizes()) shape.push_back(d);
  at::Tensor out = at::empty(shape, src.options());
  comm.allGather(src, out);
  return out;
}

}  // namespace pardit::dist
