// The BatchNorm operators as fusedres._fastpath calls them, and the layout rules
// its callers share (csrc/fastpath/batch_norm.cpp, csrc/fastpath/conv_epilogue.cpp).
#pragma once

#include <fusedres/spec.h>
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace fusedres {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using TensorPair = std::tuple<Tensor, Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

// The operators (fusedres/spec/batch_norm.py; their C++ signatures and typed calls come from the
// generated fusedres/spec.h), called below Autograd: dispatch modes and subclasses below it
// (FakeTensorMode, op counters) still see them.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline TensorPair bn_stats(
    const Tensor& input, const OptTensor& running_mean, const OptTensor& running_var, double momentum) {
  static const auto op = find_op<BatchNormStatsSignature<Tensor>>("fusedres::batch_norm_stats");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_batch_norm_stats(op, BatchNormStatsArgs<Tensor>{input, running_mean, running_var, momentum});
}

inline Tensor bn_fwd(const BatchNormAddReluFwdArgs<Tensor>& a) {
  static const auto op = find_op<BatchNormAddReluFwdSignature<Tensor>>("fusedres::batch_norm_add_relu_fwd");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_batch_norm_add_relu_fwd(op, a);
}

inline TensorTriple bn_bwd_reduce(const BatchNormAddReluBwdReduceArgs<Tensor>& a) {
  static const auto op =
      find_op<BatchNormAddReluBwdReduceSignature<Tensor>>("fusedres::batch_norm_add_relu_bwd_reduce");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_batch_norm_add_relu_bwd_reduce(op, a);
}

inline Tensor bn_bwd_input(const BatchNormAddReluBwdInputArgs<Tensor>& a) {
  static const auto op = find_op<BatchNormAddReluBwdInputSignature<Tensor>>("fusedres::batch_norm_add_relu_bwd_input");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_batch_norm_add_relu_bwd_input(op, a);
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

}  // namespace fusedres
