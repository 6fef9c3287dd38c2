#include "pardit/pipeline/op_profile.h"

#include <ATen/record_function.h>
#if defined(PARDIT_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#endif

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "pardit/core/error.h"

namespace pardit::pipeline {

namespace {

struct Totals {
  std::mutex mutex;
  std::map<std::string, OpProfile::Op> ops;
  std::thread::id owner;
  bool active = false;
  bool cuda = false;  // time by events on the current stream of this CUDA device
  c10::DeviceIndex device = -1;
};
Totals& totals() {
  static Totals t;
  return t;
}
thread_local int depth = 0;

struct Started : at::ObserverContext {
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
#if defined(PARDIT_WITH_CUDA)
  std::optional<at::cuda::CUDAEvent> deviceStart;
#endif
};

std::unique_ptr<at::ObserverContext> onStart(const at::RecordFunction& /*fn*/) {
  if (std::this_thread::get_id() != totals().owner) return nullptr;  // intra-op worker threads
  if (depth++ != 0) return nullptr;
  auto started = std::make_unique<Started>();
#if defined(PARDIT_WITH_CUDA)
  if (totals().cuda)
    started->deviceStart.emplace(cudaEventDefault).record(c10::cuda::getCurrentCUDAStream(totals().device));
#endif
  return started;
}

double secondsSince(Started& started) {
#if defined(PARDIT_WITH_CUDA)
  if (started.deviceStart) {
    at::cuda::CUDAEvent end(cudaEventDefault);
    end.record(c10::cuda::getCurrentCUDAStream(totals().device));
    end.synchronize();
    return static_cast<double>(started.deviceStart->elapsed_time(end)) * 1e-3;
  }
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - started.start).count();
}

void onEnd(const at::RecordFunction& fn, at::ObserverContext* ctx) {
  if (std::this_thread::get_id() != totals().owner) return;
  --depth;
  if (!ctx) return;
  const double s = secondsSince(*static_cast<Started*>(ctx));
  Totals& t = totals();
  std::lock_guard<std::mutex> lock(t.mutex);
  OpProfile::Op& op = t.ops[fn.name()];
  op.name = fn.name();
  ++op.calls;
  op.seconds += s;
}

}  // namespace

OpProfile::OpProfile(const c10::Device& device) {
  Totals& t = totals();
  {
    std::lock_guard<std::mutex> lock(t.mutex);
    PARDIT_CHECK(!t.active, "one OpProfile at a time");
    t.active = true;
    t.ops.clear();
    t.owner = std::this_thread::get_id();
    t.cuda = device.is_cuda();
    t.device = device.index();
  }
  depth = 0;
  handle_ = at::addThreadLocalCallback(
      at::RecordFunctionCallback(onStart, onEnd).scopes({at::RecordScope::FUNCTION}).needsInputs(false));
}

OpProfile::~OpProfile() {
  at::removeCallback(handle_);
  std::lock_guard<std::mutex> lock(totals().mutex);
  totals().active = false;
}

std::vector<OpProfile::Op> OpProfile::ops() const {
  std::vector<Op> out;
  {
    std::lock_guard<std::mutex> lock(totals().mutex);
    for (const auto& [name, op] : totals().ops) out.push_back(op);
  }
  std::sort(out.begin(), out.end(), [](const Op& a, const Op& b) { return a.seconds > b.seconds; });
  return out;
}

std::string OpProfile::classOf(const std::string& name) {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> kClasses = {
      {"GEMM",
       {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"}},
      {"attention",
       {"aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention",
        "aten::_efficient_attention"}},
      {"norms/RoPE/modulation",
       {"aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm", "aten::_fused_rms_norm", "pardit::rope",
        "pardit::rms_norm_rope", "pardit::scale_add"}},
      {"communication",
       {"pardit::all_to_all", "pardit::all_gather", "pardit::broadcast", "pardit::all_reduce", "pardit::send",
        "pardit::recv", "pardit::isend", "pardit::irecv", "pardit::barrier", "pardit::wait"}},
      {"copy/layout",
       {"aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::stack", "aten::to", "aten::_to_copy",
        "aten::reshape", "aten::flatten", "aten::empty", "aten::constant_pad_nd"}},
      {"elementwise",
       {"aten::mul", "aten::add", "aten::sub", "aten::neg", "aten::gelu", "aten::silu", "aten::rsub", "aten::div",
        "aten::exp", "aten::cos", "aten::sin", "aten::clamp", "aten::where"}},
  };
  for (const auto& [cls, prefixes] : kClasses)
    for (const auto& p : prefixes)
      if (name.rfind(p, 0) == 0) return cls;
  return "other";
}

}  // namespace pardit::pipeline
