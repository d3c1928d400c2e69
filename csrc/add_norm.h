// Add & Norm: y = norm(h) * weight + bias with h = x + residual, LayerNorm or RMSNorm over the
// last dimension. Declarations shared by the CPU and CUDA backends; the schema is in ops.cpp.
#pragma once

#include "tensors.h"

#include <optional>
#include <tuple>

namespace fusedres {

// The (rows, N) matrix behind a (..., N) operand: the leading dimensions collapse into rows
// that are `stride` elements apart (N for a contiguous tensor). Kernels address element
// (r, c) as base + r * stride + c.
struct RowsView {
  int64_t rows = 0;
  int64_t cols = 0;
};

// The row stride of a (..., N) operand that passed the checks below.
int64_t row_stride(const Tensor& t);

// Memory-safety checks shared by every C++ backend: the shapes, strides and dtypes the kernels
// index with. The user-facing errors (ValueError / TypeError naming the argument) are raised
// before dispatch, by fusedres/_checks.py.
RowsView check_add_norm_fwd_args(
    const Tensor& x,
    const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps);

RowsView check_add_norm_bwd_args(
    const Tensor& dy,
    const std::optional<Tensor>& dh,
    const Tensor& h,
    const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    const Tensor& mean,
    const Tensor& rstd,
    bool rms_norm);

// (y, h, mean, rstd): y has x's shape, h too when stored (else (0,)), mean is (0,) for RMSNorm.
std::tuple<Tensor, Tensor, Tensor, Tensor> alloc_add_norm_fwd_outputs(
    const Tensor& x, RowsView shape, bool rms_norm, ScalarType h_dtype, bool store_h);

// (dx, dresidual): h's shape; dresidual is (0,) when not requested.
std::tuple<Tensor, Tensor> alloc_add_norm_bwd_row_outputs(
    const Tensor& dy, const Tensor& h, std::optional<ScalarType> dresidual_dtype);

// dweight / dbias: like's shape and dtype, or (0,) of dy's dtype when like is absent.
Tensor alloc_param_grad(const Tensor& dy, const std::optional<Tensor>& like);

} // namespace fusedres
