#include "pardit/core/parallel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <algorithm>

namespace pardit {

void parallelFor(int64_t n, int64_t grain, c10::function_ref<void(int64_t, int64_t)> f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (n <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  // A TensorIterator over n bytes, run by LibTorch's for_each (which splits it with LibTorch's own
  // at::parallel_for): only the addresses matter, a chunk's first byte's offset is its first index.
  at::Tensor range = at::empty({n}, at::TensorOptions().dtype(at::kByte));
  const char* base = static_cast<const char*>(range.const_data_ptr());
  at::TensorIterator iter =
      at::TensorIteratorConfig().add_output(range).resize_outputs(false).check_all_same_dtype(false).build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        for (int64_t j = 0; j < size1; ++j) {
          const int64_t begin = (data[0] - base) + j * strides[1];
          f(begin, begin + size0);
        }
      },
      grain);
}

}  // namespace pardit
