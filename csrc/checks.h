// Memory-safety checks of the C++ operators' arguments. Each operator's checks are generated from
// its spec (fusedres/spec: the argument kinds; build/generated/fusedres/spec_checks.h, included
// below) out of the primitives declared here, so every C++ backend checks the same things, and
// Python raises the same conditions as named errors (fusedres/spec/python.py).
#pragma once

#include "tensors.h"

#include <fusedres/spec.h>

#include <limits>

namespace fusedres {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// The (rows, N) matrix behind a (..., N) operand: the leading dimensions collapse into rows
// that are `row_stride` elements apart (N for a contiguous tensor). Kernels address element
// (r, c) as base + r * stride + c.
struct RowsView {
  int64_t rows = 0;
  int64_t cols = 0;
};

// The row stride of a (..., N) operand that passed the checks below.
int64_t row_stride(const Tensor& t);

// A (..., N) float tensor with N > 0 that the row kernels read in place: unit stride along N,
// leading dims that collapse into rows of one stride. Returns its (rows, N).
RowsView check_anchor_rows(const Tensor& t, const char* name);
// The same, with like's shape and device.
void check_rows_like(const Tensor& t, const char* name, const Tensor& like, const char* like_name, RowsView shape);
// `count` contiguous float elements (of the statistics dtype when `stats`) on anchor's device.
void check_elements(const Tensor& t, const char* name, const Tensor& anchor, int64_t count, bool stats);
// The dropout RNG state: a contiguous (2,) int64 tensor on anchor's device.
void check_seed_offset(const Tensor& t, const char* name, const Tensor& anchor);
void check_float_dtype(ScalarType dtype, const char* name);
// Whether two tensors' memory does not overlap (contiguous ones: their byte ranges).
bool disjoint(const Tensor& a, const Tensor& b);

}  // namespace fusedres

#include <fusedres/spec_checks.h>
