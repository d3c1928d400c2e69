// Dtype dispatch and row addressing for the CPU kernels.
#pragma once

#include "add_norm.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>

namespace fusedres::cpu {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the C++ type of a supported float dtype. Kernels dispatch once per
// row, not per element, so every inner loop is a plain typed loop the compiler vectorizes.
template <typename F>
inline void visit_float(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(TypeTag<float>{});
    case ScalarType::Double:
      return f(TypeTag<double>{});
    case ScalarType::Half:
      return f(TypeTag<torch::headeronly::Half>{});
    case ScalarType::BFloat16:
      return f(TypeTag<torch::headeronly::BFloat16>{});
    default:
      STD_TORCH_CHECK(false, "fusedres: unsupported dtype");
  }
}

// Byte address of row `row` of a (rows, N) tensor with unit column stride.
inline const char* row_ptr(const Tensor& t, int64_t row) {
  return static_cast<const char*>(t.const_data_ptr()) +
      row * t.stride(0) * static_cast<int64_t>(t.element_size());
}

inline char* mutable_row_ptr(const Tensor& t, int64_t row) {
  return static_cast<char*>(t.mutable_data_ptr()) +
      row * t.stride(0) * static_cast<int64_t>(t.element_size());
}

} // namespace fusedres::cpu
