// Add & Norm: y = norm(h) * weight + bias with h = x + residual, LayerNorm or RMSNorm over the
// last dimension. Declarations shared by the CPU and CUDA backends; the schema is in ops.cpp.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <tuple>

namespace fusedres {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Inputs are (M, N) with unit stride along N and any row stride; the Python layer reshapes
// (..., N) tensors into that form without copying whenever the layout allows it.
struct RowsView {
  int64_t rows = 0;
  int64_t cols = 0;
};

// fp64 inputs keep fp64 statistics (so gradcheck sees exact maths); everything else uses fp32.
inline ScalarType stats_dtype(ScalarType x_dtype) {
  return x_dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

bool is_supported_float(ScalarType t);

// Memory-safety checks shared by every C++ backend: shapes, strides, dtypes and devices that
// the kernels index with. The user-facing ValueErrors are raised earlier, in Python.
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

// (y, h, mean, rstd); h is (0,) when not stored, mean is (0,) for RMSNorm.
std::tuple<Tensor, Tensor, Tensor, Tensor> alloc_add_norm_fwd_outputs(
    const Tensor& x, RowsView shape, bool rms_norm, ScalarType h_dtype, bool store_h);

// (dx, dresidual); dresidual is (0,) when not requested.
std::tuple<Tensor, Tensor> alloc_add_norm_bwd_row_outputs(
    const Tensor& dy, RowsView shape, std::optional<ScalarType> dresidual_dtype);

// Final dweight/dbias from fp32 (fp64) per-chunk partials of shape (chunks, N): a fixed-order
// sum over the chunk dimension, so two runs give bitwise-identical grads.
Tensor reduce_partials(const Tensor& partials, const std::optional<Tensor>& like);

} // namespace fusedres
