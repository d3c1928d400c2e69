// Tensor helpers shared by every C++ op: dtypes, and output allocation straight through the
// stable C shim.
//
// Allocation is on the hot path of every call. torch::stable::new_empty goes through the boxed
// dispatcher (aten::new_empty with its optional arguments boxed and unboxed: ~1.5 us each on a
// 2-core EPYC, and an op allocates up to four outputs); aoti_torch_empty_strided calls
// at::empty_strided directly.
#pragma once

#include "cpu/output_pool.h"

#include <fusedres/spec.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <initializer_list>

namespace fusedres {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// fp64 inputs keep fp64 statistics (so gradcheck sees exact maths); everything else uses fp32.
inline ScalarType stats_dtype(ScalarType x_dtype) {
  return x_dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// The spec's code of a supported float dtype (kernels that switch on a dtype at run time).
inline DtypeCode dtype_code(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
      return kF64;
    case ScalarType::Half:
      return kF16;
    case ScalarType::BFloat16:
      return kBF16;
    default:
      return kF32;
  }
}

inline int32_t shim_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
      return aoti_torch_dtype_float64();
    case ScalarType::Half:
      return aoti_torch_dtype_float16();
    case ScalarType::BFloat16:
      return aoti_torch_dtype_bfloat16();
    case ScalarType::Float:
      return aoti_torch_dtype_float32();
    case ScalarType::Bool:
      return aoti_torch_dtype_bool();
    default:
      STD_TORCH_CHECK(false, "fusedres: unsupported dtype");
  }
  return 0;
}

// An uninitialized tensor of the given sizes and strides, dtype, on `like`'s device.
// Large CPU outputs come from fusedres's pool of freed blocks (csrc/cpu/output_pool.h).
inline Tensor empty_strided_on(
    const Tensor& like, const int64_t* sizes, const int64_t* strides, int64_t ndim, ScalarType dtype) {
  int32_t device_type = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  if (device_type == aoti_torch_device_type_cpu()) {
    if (auto pooled = cpu::pooled_empty_strided(sizes, strides, ndim, dtype)) {
      return *pooled;
    }
  }
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(
      aoti_torch_empty_strided(ndim, sizes, strides, shim_dtype(dtype), device_type, like.get_device_index(), &out));
  return Tensor(out);
}

// A contiguous tensor of the given sizes (at most 8 dims).
inline Tensor empty_on(const Tensor& like, const int64_t* sizes, int64_t ndim, ScalarType dtype) {
  STD_TORCH_CHECK(ndim <= 8, "fusedres: at most 8 dimensions are supported");
  int64_t strides[8];
  int64_t step = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = step;
    step *= sizes[d] > 1 ? sizes[d] : 1;
  }
  return empty_strided_on(like, sizes, strides, ndim, dtype);
}

inline Tensor empty_on(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return empty_on(like, sizes.begin(), static_cast<int64_t>(sizes.size()), dtype);
}

// A contiguous tensor with t's sizes.
inline Tensor empty_shaped_like(const Tensor& t, ScalarType dtype) {
  const auto sizes = t.sizes();
  return empty_on(t, sizes.data(), static_cast<int64_t>(sizes.size()), dtype);
}

// A tensor with t's sizes and strides (t dense: NCHW or channels_last stay as they are).
inline Tensor empty_strided_like(const Tensor& t, ScalarType dtype) {
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  return empty_strided_on(t, sizes.data(), strides.data(), static_cast<int64_t>(sizes.size()), dtype);
}

}  // namespace fusedres
