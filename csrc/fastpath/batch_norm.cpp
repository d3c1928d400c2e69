// fusedres._fastpath: batch_norm_add_relu's eager call, from Python straight into a C++ autograd node.
//
// Why: BatchNormAddReLU2d training forward + backward took 1.1-1.5x the eager ops' host time on
// tiny tensors (where kernel time is ~0), most of it torch's Python autograd.Function machinery
// and the Python around the four kernel calls. Here the node is created in C++ and the kernels
// are called through the dispatcher, below Autograd, as csrc/fastpath/add_norm.cpp does for Add &
// Norm (which says why this module is built per torch and CPython).
//
// The formula is fusedres/ops/batch_norm.py's (_forward, _backward_with) without a process
// group: synchronized BatchNorm keeps its Python path. rowscale (per sample, no grad) is passed to
// the three fused kernels and saved for the backward. The caller (fusedres/ops/batch_norm.py:
// batch_norm_add_relu) has checked the arguments, chosen a C++ backend (cpu or cuda) and found
// plain tensors, no functorch transform and no compilation.
#include "fastpath/batch_norm_ops.h"
#include "fastpath/module.h"

#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fusedres {
namespace {

using at::ScalarType;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor contiguous(const OptTensor& t) {
  return t.has_value() && !t->is_contiguous() ? OptTensor(t->contiguous()) : t;
}

OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

// fusedres/ops/batch_norm.py: _forward (no process group). The output and what the backward
// reads: (out, mean, var, count).
struct Forward {
  Tensor out;
  OptTensor mean, var;
  int64_t count;
};

Forward forward_pass(const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps, bool relu, bool training,
    const OptTensor& rowscale) {
  Forward f{Tensor(), running_mean, running_var, 1};
  if (training) {
    auto [mean, var] = bn_stats(input, running_mean, running_var, momentum);
    f.mean = mean;
    f.var = var;
    f.count = input.numel() / input.size(1);
    if (running_mean.has_value()) {  // the kernel updated them in place: autograd must see it
      torch::autograd::increment_version(*running_mean);
      torch::autograd::increment_version(*running_var);
    }
  }
  f.out = bn_fwd({.input = input,
      .residual = residual,
      .rowscale = rowscale,
      .weight = weight,
      .bias = bias,
      .mean = f.mean,
      .var = f.var,
      .eps = eps,
      .relu = relu,
      .training = training,
      .count = f.count});
  return f;
}

// fusedres/ops/batch_norm.py: _BatchNormFunction / _backward_with.
struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& residual,
      const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
      double momentum, double eps, bool relu, bool training, const OptTensor& rowscale) {
    Forward f =
        forward_pass(input, residual, weight, bias, running_mean, running_var, momentum, eps, relu, training, rowscale);
    const Tensor none;
    ctx->save_for_backward({input, f.out, weight.has_value() ? *weight : none, f.mean.has_value() ? *f.mean : none,
        f.var.has_value() ? *f.var : none, rowscale.has_value() ? *rowscale : none});
    // bias's grad has bias's dtype; -1: no bias.
    ctx->saved_data["meta"] = std::vector<int64_t>{relu, training, f.count, residual.has_value(), weight.has_value(),
        bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : -1};
    ctx->saved_data["eps"] = eps;
    return {f.out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& out = saved[1];
    const OptTensor weight = defined_or_none(saved[2]), mean = defined_or_none(saved[3]),
                    var = defined_or_none(saved[4]), rowscale = defined_or_none(saved[5]);
    const auto meta = ctx->saved_data["meta"].toIntVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool relu = meta[0] != 0, training = meta[1] != 0, has_residual = meta[3] != 0, has_weight = meta[4] != 0;
    const int64_t count = meta[2], bias_dtype = meta[5];
    // needs_input_grad counts the tensors that were given: input, then residual, weight, bias.
    const size_t residual_edge = 1, weight_edge = residual_edge + has_residual, bias_edge = weight_edge + has_weight;
    const bool needs_input = ctx->needs_input_grad(0);
    const bool needs_residual = has_residual && ctx->needs_input_grad(residual_edge);
    const bool needs_weight = has_weight && ctx->needs_input_grad(weight_edge);
    const bool needs_bias = bias_dtype >= 0 && ctx->needs_input_grad(bias_edge);

    const Tensor grad_out = like_input(grads[0], input);
    // With a ReLU, the residual's grad is the masked grad: written once by the reduce pass and
    // read back (instead of grad_out and out) by the input pass.
    const bool write_g = needs_residual && relu;
    Tensor sum_dy, sum_dy_xhat, g, grad_weight, grad_bias;
    if ((needs_input && training) || needs_weight || needs_bias || write_g) {
      std::tie(sum_dy, sum_dy_xhat, g) = bn_bwd_reduce({.grad_out = grad_out,
          .out = out,
          .input = input,
          .rowscale = rowscale,
          .mean = mean,
          .var = var,
          .eps = eps,
          .relu = relu,
          .write_grad_residual = write_g});
      if (needs_weight) {
        grad_weight =
            sum_dy_xhat.scalar_type() == weight->scalar_type() ? sum_dy_xhat : sum_dy_xhat.to(weight->scalar_type());
      }
      if (needs_bias) {
        const auto dtype = static_cast<ScalarType>(bias_dtype);
        grad_bias = sum_dy.scalar_type() == dtype ? sum_dy : sum_dy.to(dtype);
      }
    }
    Tensor grad_input;
    if (needs_input) {
      // With g written, it is the already-masked grad and out is not read again.
      const OptTensor masked_by = write_g ? std::nullopt : OptTensor(out);
      grad_input = bn_bwd_input({.grad = write_g ? g : grad_out,
          .out = masked_by,
          .input = input,
          .rowscale = rowscale,
          .mean = mean,
          .var = var,
          .eps = eps,
          .weight = weight,
          .sum_dy = defined_or_none(sum_dy),
          .sum_dy_xhat = defined_or_none(sum_dy_xhat),
          .count = count,
          .training = training,
          .relu = relu});
    }
    const Tensor none;
    const Tensor grad_residual = needs_residual ? (write_g ? g : grad_out) : none;
    // running_mean, running_var, momentum, eps, relu, training and rowscale get none.
    return {grad_input, grad_residual, grad_weight, grad_bias, none, none, none, none, none, none, none};
  }
};

// fusedres.batch_norm_add_relu on checked arguments: the output.
Tensor batch_norm_add_relu(const Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
    double eps, bool relu, const OptTensor& rowscale) {
  const bool needs_grad = at::GradMode::is_enabled() && (requires_grad(weight) || input.requires_grad() ||
                                                            requires_grad(residual) || requires_grad(bias));
  // As aten's own Python bindings do: other Python threads run while the kernels do.
  py::gil_scoped_release no_gil;
  const Tensor x = channels_dense(input) ? input : input.contiguous();
  const OptTensor r = residual.has_value() ? OptTensor(like_input(*residual, x)) : std::nullopt;
  const OptTensor w = contiguous(weight), b = contiguous(bias), rs = contiguous(rowscale);
  if (needs_grad) {
    // rowscale last: needs_input_grad's edges (the tensors given) keep their order before it.
    return BatchNormFunction::apply(x, r, w, b, running_mean, running_var, momentum, eps, relu, training, rs)[0];
  }
  return forward_pass(x, r, w, b, running_mean, running_var, momentum, eps, relu, training, rs).out;
}

}  // namespace

void register_batch_norm(py::module_& m) {
  m.def("batch_norm_add_relu", &batch_norm_add_relu,
      "batch_norm_add_relu(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, "
      "relu, rowscale) -> out");
}

}  // namespace fusedres
