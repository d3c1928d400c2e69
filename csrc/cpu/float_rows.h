// Dtype dispatch and row addressing for the CPU kernels.
#pragma once

#include "add_norm.h"

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <optional>
#include <vector>

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

// torch's parallel_for, run inline when the range is one task: through the stable ABI even a
// call that runs inline costs a few thousand instructions, as much as a small layer's kernel.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end - begin <= grain) {
    if (end > begin) {
      f(begin, end);
    }
    return;
  }
  torch::stable::parallel_for(begin, end, grain, f);
}

// Byte address of row `row` of a (rows, N) tensor with unit column stride.
inline const char* row_ptr(const Tensor& t, int64_t row) {
  return static_cast<const char*>(t.const_data_ptr()) + row * t.stride(0) * static_cast<int64_t>(t.element_size());
}

inline char* mutable_row_ptr(const Tensor& t, int64_t row) {
  return static_cast<char*>(t.mutable_data_ptr()) + row * t.stride(0) * static_cast<int64_t>(t.element_size());
}

// A small (parameter-sized) tensor as accumulators; `fill` stands in for every element when absent.
template <typename acc_t>
std::vector<acc_t> to_acc_vector(const std::optional<Tensor>& t, int64_t n, acc_t fill) {
  std::vector<acc_t> out(n, fill);
  if (t.has_value()) {
    visit_float(t->scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* src = static_cast<const T*>(t->const_data_ptr());
      for (int64_t i = 0; i < n; ++i) {
        out[i] = static_cast<acc_t>(src[i]);
      }
    });
  }
  return out;
}

// Writes n accumulators into a tensor of any supported float dtype.
template <typename acc_t>
void store_acc_vector(const acc_t* src, int64_t n, Tensor& t) {
  visit_float(t.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(t.mutable_data_ptr());
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<T>(src[i]);
    }
  });
}

}  // namespace fusedres::cpu
