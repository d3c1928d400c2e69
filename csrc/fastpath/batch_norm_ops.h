// The BatchNorm operators of csrc/ops.cpp as fusedres._fastpath calls them, and the layout rules
// its callers share (csrc/fastpath/batch_norm.cpp, csrc/fastpath/conv_epilogue.cpp).
#pragma once

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace fusedres {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using TensorPair = std::tuple<Tensor, Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

// The operators of csrc/ops.cpp, called below Autograd: dispatch modes and subclasses below it
// (FakeTensorMode, op counters) still see them.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline TensorPair bn_stats(const Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
    double momentum) {
  static const auto op = find_op<TensorPair(const Tensor&, const OptTensor&, const OptTensor&, double)>(
      "fusedres::batch_norm_stats");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, running_mean, running_var, momentum);
}

inline Tensor bn_fwd(const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& mean, const OptTensor& var, double eps, bool relu, bool training, int64_t count) {
  static const auto op = find_op<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, double, bool, bool, int64_t)>("fusedres::batch_norm_add_relu_fwd");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, residual, weight, bias, mean, var, eps, relu, training, count);
}

inline TensorTriple bn_bwd_reduce(const Tensor& grad_out, const Tensor& out, const Tensor& input, const OptTensor& mean,
    const OptTensor& var, double eps, bool relu, bool write_grad_residual) {
  static const auto op = find_op<TensorTriple(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      const OptTensor&, double, bool, bool)>("fusedres::batch_norm_add_relu_bwd_reduce");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_out, out, input, mean, var, eps, relu, write_grad_residual);
}

inline Tensor bn_bwd_input(const Tensor& grad, const OptTensor& out, const Tensor& input, const OptTensor& mean,
    const OptTensor& var, double eps, const OptTensor& weight, const OptTensor& sum_dy,
    const OptTensor& sum_dy_xhat, int64_t count, bool training, bool relu) {
  static const auto op = find_op<Tensor(const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
      const OptTensor&, double, const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool, bool)>(
      "fusedres::batch_norm_add_relu_bwd_input");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad, out, input, mean, var, eps, weight, sum_dy, sum_dy_xhat, count, training, relu);
}

// Whether the kernels read t in place: dense in NCHW or channels_last order (as
// fusedres/_checks.py: channels_dense, csrc/batch_norm.cpp: check_bn_activation).
inline bool channels_dense(const Tensor& t) {
  if (t.is_contiguous()) {
    return true;
  }
  const int64_t dim = t.dim();
  if (dim < 2) {
    return false;
  }
  int64_t step = t.size(1);
  for (int64_t d = dim - 1; d > 1; --d) {
    if (t.size(d) > 1 && t.stride(d) != step) {
      return false;
    }
    step *= t.size(d);
  }
  return (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) == step);
}

// t (input's shape) with input's dtype and strides (fusedres/_checks.py: like_input).
inline Tensor like_input(const Tensor& t, const Tensor& input) {
  if (t.scalar_type() == input.scalar_type() && (t.strides() == input.strides() || t.numel() <= 1)) {
    return t;
  }
  return at::empty_like(input).copy_(t);
}

} // namespace fusedres
