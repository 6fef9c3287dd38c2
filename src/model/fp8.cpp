#include "pardit/model/fp8.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <atomic>

#include "pardit/core/error.h"
#include "pardit/core/log.h"
#include "pardit/core/parallel.h"

#if defined(PARDIT_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#endif

namespace pardit::model {

bool isFp8(const at::Tensor& t) { return t.defined() && t.scalar_type() == at::kFloat8_e4m3fn; }

std::string fp8ScaleName(const std::string& weightName) {
  const std::string suffix = ".weight";
  PARDIT_CHECK(weightName.size() > suffix.size() &&
                   weightName.compare(weightName.size() - suffix.size(), suffix.size(), suffix) == 0,
               "FP8 weights are '<layer>.weight' tensors, not '", weightName, "'");
  return weightName + "_scale";
}

uint64_t storedBytes(const std::vector<TensorSpec>& tensors, c10::ScalarType dtype) {
  uint64_t n = 0;
  for (const auto& t : tensors) {
    uint64_t e = 1;
    for (auto d : t.shape) e *= static_cast<uint64_t>(d);
    const uint64_t size = t.storage == TensorStorage::kFp8       ? 1
                          : t.storage == TensorStorage::kFloat32 ? 4
                                                                 : c10::elementSize(dtype);
    n += e * size;
  }
  return n;
}

std::vector<TensorSpec> withFp8(const std::vector<TensorSpec>& tensors, bool (*eligible)(const std::string&)) {
  std::vector<TensorSpec> out;
  for (auto t : tensors) {
    const bool q = eligible(t.name);
    if (q) t.storage = TensorStorage::kFp8;
    out.push_back(t);
    if (q) out.push_back({fp8ScaleName(t.name), {t.shape.at(0)}, TensorStorage::kFloat32});
  }
  return out;
}

Fp8Rows quantizeFp8Rows(const at::Tensor& weight) {
  PARDIT_CHECK(weight.dim() == 2, "FP8 quantization is per row of a 2-D weight, got shape ", weight.sizes());
  // Rows are independent: a large weight goes in blocks of rows, so the float32 temporaries stay small (on a
  // GPU, within the memory the planner leaves beside the weights).
  constexpr int64_t kBlockElements = int64_t{1} << 24;
  const int64_t rows = weight.size(0),
                block = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, weight.size(1)));
  std::vector<at::Tensor> values, scales;
  int64_t r = 0;
  do {
    const int64_t n = std::min(block, rows - r);
    const at::Tensor w = weight.narrow(0, r, n).to(at::kFloat);
    at::Tensor amax = w.abs().amax(1);  // [n]
    PARDIT_CHECK(at::isfinite(amax).all().item<bool>(), "cannot quantize a weight with NaN or infinite values to FP8");
    // A true division on every device: divided by a plain number, CUDA multiplies by its reciprocal instead
    // (other bits than the CPU's); by a tensor on the same device it divides.
    at::Tensor scale = at::where(amax > 0, amax / at::scalar_tensor(kFp8E4m3Max, amax.options()), at::ones_like(amax));
    // |w / scale| <= 448 up to the division's rounding: clamp so that no value rounds beyond e4m3fn's range.
    values.push_back((w / scale.unsqueeze(1)).clamp(-kFp8E4m3Max, kFp8E4m3Max).to(at::kFloat8_e4m3fn));
    scales.push_back(scale);
    r += n;
  } while (r < rows);
  if (values.size() == 1) return {values[0], scales[0].contiguous()};
  return {at::cat(values, 0), at::cat(scales, 0)};
}

namespace {

// e4m3fn code -> float, for all 256 codes (exact: every e4m3fn value is a float).
const std::array<float, 256>& e4m3Table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i)
      t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table;
}

// values * scale row by row on the CPU: a table lookup per element, the product in float32, rounded once to
// T (as ATen's .to(float) * scale then .to(T) rounds, so the result is the same bit for bit, without ATen's
// element-wise float8 conversion, which costs about 5 ns per element on one core).
template <typename T>
void dequantizeRowsCpu(const at::Tensor& values, const at::Tensor& scale, at::Tensor& out) {
  const auto& table = e4m3Table();
  const int64_t cols = values.size(1);
  const auto* q = reinterpret_cast<const uint8_t*>(values.data_ptr());
  const float* s = scale.data_ptr<float>();
  T* o = out.data_ptr<T>();
  parallelFor(values.size(0), 65536 / std::max<int64_t>(cols, 1), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float sr = s[r];
      const uint8_t* qr = q + r * cols;
      T* orow = o + r * cols;
      for (int64_t c = 0; c < cols; ++c) orow[c] = static_cast<T>(table[qr[c]] * sr);
    }
  });
}

}  // namespace

at::Tensor dequantizeFp8Rows(const at::Tensor& values, const at::Tensor& scale, c10::ScalarType dtype) {
  PARDIT_CHECK(isFp8(values) && values.dim() == 2 && scale.dim() == 1 && scale.size(0) == values.size(0), "FP8 weight ",
               values.sizes(), " with scale ", scale.sizes(), ": expected [out, in] float8_e4m3fn and [out]");
  if (values.is_cpu() && values.is_contiguous() &&
      (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf)) {
    const at::Tensor s = scale.to(at::kFloat).contiguous();
    at::Tensor out = at::empty(values.sizes(), values.options().dtype(dtype));
    if (dtype == at::kFloat) dequantizeRowsCpu<float>(values, s, out);
    if (dtype == at::kBFloat16) dequantizeRowsCpu<c10::BFloat16>(values, s, out);
    if (dtype == at::kHalf) dequantizeRowsCpu<c10::Half>(values, s, out);
    return out;
  }
  return (values.to(at::kFloat) * scale.to(at::kFloat).unsqueeze(1)).to(dtype);
}

namespace {
std::atomic<bool> scaledMmFailed{false};  // a device where _scaled_mm refused: dequantize from then on
}

bool fp8TensorCoresUsable(const at::Tensor& x, const at::Tensor& values) {
#if defined(PARDIT_WITH_CUDA)
  if (!x.is_cuda() || x.scalar_type() != at::kBFloat16 || scaledMmFailed.load()) return false;
  // _scaled_mm wants K and N multiples of 16.
  if (values.size(0) % 16 != 0 || values.size(1) % 16 != 0) return false;
  const auto* prop = at::cuda::getDeviceProperties(x.device().index());
  return prop->major * 10 + prop->minor >= 89;
#else
  (void)x;
  (void)values;
  return false;
#endif
}

at::Tensor fp8Linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scale, const at::Tensor& bias) {
#if defined(PARDIT_WITH_CUDA)
  if (fp8TensorCoresUsable(x, values)) {
    const int64_t K = values.size(1), N = values.size(0);
    at::Tensor x2 = x.reshape({-1, K});  // [M, K]
    const int64_t M = x2.size(0);
    // Rows padded to a multiple of 16 (the modulation GEMMs have one row per image): zero rows cost nothing.
    if (M % 16 != 0) x2 = at::constant_pad_nd(x2, {0, 0, 0, 16 - M % 16});
    // Per-token activation scales (see the header): max|x[t, :]| / 448, kept away from 0.
    const at::Tensor xs = (x2.abs().amax(1, /*keepdim=*/true).to(at::kFloat) / kFp8E4m3Max).clamp_min(1e-12);  // [M, 1]
    const at::Tensor xq = (x2.to(at::kFloat) / xs).clamp(-kFp8E4m3Max, kFp8E4m3Max).to(at::kFloat8_e4m3fn).contiguous();
    try {
      // values is [N, K] row-major, so values.t() is the column-major [K, N] operand _scaled_mm wants.
      at::Tensor y = at::_scaled_mm(xq, values.t(), xs.contiguous(), scale.to(at::kFloat).reshape({1, N}).contiguous(),
                                    std::nullopt, std::nullopt, at::kBFloat16);
      if (y.size(0) != M) y = y.narrow(0, 0, M);
      if (bias.defined()) y = y + bias.to(y.scalar_type());
      std::vector<int64_t> shape = x.sizes().vec();
      shape.back() = N;
      return y.reshape(shape);
    } catch (const c10::Error& e) {
      scaledMmFailed.store(true);
      logWarn("FP8 GEMM (at::_scaled_mm, row-wise scales) failed on ", x.device().str(),
              "; using dequantized bf16 GEMMs from now on: ", e.what_without_backtrace());
    }
  }
#endif
  return at::linear(x, dequantizeFp8Rows(values, scale, x.scalar_type()), bias);
}

}  // namespace pardit::model
