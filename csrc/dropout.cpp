// The checks and allocation the dropout mask operator's CPU and CUDA kernels share (its schema:
// fusedres/spec/dropout.py).
#include "dropout.h"

#include <limits>

namespace fusedres {

void check_dropout_mask_args(const Tensor& seed_offset, int64_t rows, int64_t cols, double p) {
  STD_TORCH_CHECK(seed_offset.dim() == 1 && seed_offset.size(0) == 2 && seed_offset.stride(0) == 1 &&
                      seed_offset.scalar_type() == ScalarType::Long,
      "fusedres: seed_offset must be a contiguous (2,) int64 tensor");
  STD_TORCH_CHECK(rows >= 0 && cols >= 0 && (cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols),
      "fusedres: dropout_mask needs rows >= 0 and cols >= 0 with rows * cols < 2^63, got ", rows, " and ", cols);
  STD_TORCH_CHECK(p >= 0.0 && p < 1.0, "fusedres: the dropout probability p must be in [0, 1), got ", p);
}

Tensor alloc_dropout_mask(const Tensor& seed_offset, int64_t rows, int64_t cols) {
  const int64_t sizes[2] = {rows, cols};
  const int64_t strides[2] = {cols > 1 ? cols : 1, 1};
  int32_t device_type = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(seed_offset.get(), &device_type));
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      2, sizes, strides, aoti_torch_dtype_bool(), device_type, seed_offset.get_device_index(), &out));
  return Tensor(out);
}

}  // namespace fusedres
