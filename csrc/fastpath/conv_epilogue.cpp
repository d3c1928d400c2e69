// fusedres._fastpath: the frozen-BN conv's eager call under autograd, from Python straight into a
// C++ autograd node: relu(conv(x, w') + b' + residual) with BN folded from fixed statistics, and
// its backward (fusedres/ops/conv_epilogue.py: _FrozenConvBN is the same formula in Python, which
// runs where this module does not load; its docstring writes the maths out).
//
// Why: through the Python autograd.Function the fold, the fused forward, the masked-grad pass and
// the convolution backward cost ~170 us of Python per call forward + backward on top of the ops
// (2-core EPYC, tiny tensors); fine-tuning a detection backbone makes one such call per conv.
// The backward reuses the BatchNorm backward kernel (csrc/fastpath/batch_norm_ops.h): one pass
// writes the grad masked by the ReLU and its per-channel sum, the folded bias's grad.
//
// The caller has checked that the conv is a plain zero-padded 2-D one, that x, the residual and
// the conv weight share a dtype, chosen a C++ backend (cpu or cuda), found plain tensors, no
// functorch transform and no compilation, and says whether oneDNN's fused operator runs the
// forward (CPU, with torch.ops.mkldnn's schemas probed) and whether in fp32 (bf16/fp16 where the
// CPU's oneDNN has no kernels for them).
#include "fastpath/batch_norm_ops.h"
#include "fastpath/module.h"

#include <torch/csrc/autograd/custom_function.h>

namespace fusedres {
namespace {

using at::ScalarType;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Ints = std::vector<int64_t>;

// mkldnn::_convolution_pointwise (unary: bias + ReLU post-ops) or its .binary overload (add, then
// ReLU), called boxed: torch has no C++ header for these operators.
Tensor onednn_conv(const Tensor& x, const Tensor& w, const Tensor& b, const OptTensor& residual, const Ints& padding,
    const Ints& stride, const Ints& dilation, int64_t groups, bool relu) {
  static const auto unary = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  static const auto binary = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
  const c10::List<std::optional<at::Scalar>> no_scalars;
  torch::jit::Stack stack;
  if (!residual.has_value()) {
    stack = {
        x, w, b, padding, stride, dilation, groups, std::string(relu ? "relu" : "none"), no_scalars, std::string()};
    unary.callBoxed(stack);
  } else {
    const c10::IValue unary_attr = relu ? c10::IValue(std::string("relu")) : c10::IValue();
    const c10::IValue algorithm = relu ? c10::IValue(std::string()) : c10::IValue();
    stack = {x, *residual, w, b, padding, stride, dilation, groups, std::string("add"), at::Scalar(1.0), unary_attr,
        no_scalars, algorithm};
    binary.callBoxed(stack);
  }
  return stack[0].toTensor();
}

// t in `dtype`, dense in `fmt` (oneDNN and the BatchNorm kernels read it in place).
Tensor dense_as(const Tensor& t, ScalarType dtype, at::MemoryFormat fmt) {
  Tensor out = t.scalar_type() == dtype ? t : t.to(dtype);
  return out.is_contiguous(fmt) ? out : out.contiguous(fmt);
}

struct FrozenConvBNFunction : public torch::autograd::Function<FrozenConvBNFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& residual,
      const Tensor& conv_weight, const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
      const Tensor& mean, const Tensor& var, double eps, const Ints& padding, const Ints& stride, const Ints& dilation,
      int64_t groups, bool relu, bool onednn, bool compute_in_fp32) {
    // The fold (fusedres/ops/conv_epilogue.py: fold), in fp32 (fp64 for an fp64 conv weight).
    const ScalarType acc = c10::promoteTypes(conv_weight.scalar_type(), at::kFloat);
    const ScalarType compute = compute_in_fp32 ? at::kFloat : x.scalar_type();
    const Tensor invstd = at::rsqrt(var.to(acc) + eps);
    const Tensor scale = bn_weight.has_value() ? invstd * bn_weight->to(acc) : invstd;
    const Tensor w = (conv_weight.to(acc) * scale.reshape({-1, 1, 1, 1})).to(compute);
    const Tensor shift = conv_bias.has_value() ? conv_bias->to(acc) - mean.to(acc) : -mean.to(acc);
    const Tensor b = (bn_bias.has_value() ? at::addcmul(bn_bias->to(acc), shift, scale) : shift * scale).to(compute);

    const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
    const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const Tensor xc = dense_as(x, compute, fmt);
    const OptTensor rc = residual.has_value() ? OptTensor(dense_as(*residual, compute, fmt)) : std::nullopt;
    Tensor out;
    if (onednn) {
      out = onednn_conv(xc, w, b, rc, padding, stride, dilation, groups, relu);
    } else {
      const Tensor y = at::convolution(xc, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
      const OptTensor r = rc.has_value() ? OptTensor(like_input(*rc, y)) : std::nullopt;
      // bias + add + ReLU: mean/var absent, xhat is the conv's output
      out = bn_fwd({.input = y,
          .residual = r,
          .rowscale = std::nullopt,
          .weight = std::nullopt,
          .bias = b,
          .mean = std::nullopt,
          .var = std::nullopt,
          .eps = 1.0,
          .relu = relu,
          .training = false,
          .count = 1});
    }
    if (out.scalar_type() != x.scalar_type()) {
      out = out.to(x.scalar_type());
    }
    const Tensor none;
    ctx->save_for_backward({x, out, w, conv_weight, conv_bias.has_value() ? *conv_bias : none, scale, invstd, mean});
    ctx->saved_data["conv"] = c10::List<int64_t>({padding[0], padding[1], stride[0], stride[1], dilation[0],
        dilation[1], groups, relu, compute_in_fp32, residual.has_value(), bn_weight.has_value(), bn_bias.has_value(),
        bn_weight.has_value() ? static_cast<int64_t>(bn_weight->scalar_type()) : -1,
        bn_bias.has_value() ? static_cast<int64_t>(bn_bias->scalar_type()) : -1});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &out = saved[1], &w = saved[2], &conv_weight = saved[3], &conv_bias = saved[4],
                 &scale = saved[5], &invstd = saved[6], &mean = saved[7];
    const auto m = ctx->saved_data["conv"].toIntVector();
    const Ints padding{m[0], m[1]}, stride{m[2], m[3]}, dilation{m[4], m[5]};
    const int64_t groups = m[6];
    const bool relu = m[7] != 0, compute_in_fp32 = m[8] != 0, has_residual = m[9] != 0, has_gamma = m[10] != 0,
               has_beta = m[11] != 0;
    // needs_input_grad counts the tensors that were given: x, residual, conv weight and bias,
    // BN's weight and bias.
    size_t edge = 1;
    const bool needs_residual = has_residual && ctx->needs_input_grad(edge++);
    const bool needs_cw = ctx->needs_input_grad(edge++);
    const bool needs_cb = conv_bias.defined() && ctx->needs_input_grad(edge++);
    const bool needs_gamma = has_gamma && ctx->needs_input_grad(edge++);
    const bool needs_beta = has_beta && ctx->needs_input_grad(edge++);
    const bool needs_x = ctx->needs_input_grad(0);

    // g = grad where the ReLU passed it; db = its per-channel sum (the folded bias's grad).
    Tensor g, db;
    if (relu) {
      // mean/var None: the kernel's xhat is its `input` argument, here `out` (read for the mask anyway).
      std::tie(db, std::ignore, g) = bn_bwd_reduce({.grad_out = like_input(grads[0], out),
          .out = out,
          .input = out,
          .rowscale = std::nullopt,
          .mean = std::nullopt,
          .var = std::nullopt,
          .eps = 1.0,
          .relu = true,
          .write_grad_residual = true});
    } else {
      g = grads[0];
      db = g.sum({0, 2, 3}, false, out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    }
    const bool needs_dw = needs_cw || needs_gamma;
    Tensor dx, dw;
    if (needs_x || needs_dw) {
      const ScalarType compute = compute_in_fp32 ? at::kFloat : x.scalar_type();
      std::tie(dx, dw, std::ignore) = at::convolution_backward(g.to(compute), x.to(compute), w, std::nullopt, stride,
          padding, dilation, false, {0, 0}, groups, {needs_x, needs_dw, false});
      if (needs_x && dx.scalar_type() != x.scalar_type()) {
        dx = dx.to(x.scalar_type());
      }
    }
    const ScalarType acc = scale.scalar_type();
    Tensor d_cw, d_cb, d_gamma, d_beta;
    if (needs_dw) {
      dw = dw.to(acc);
      if (needs_cw) {
        d_cw = (dw * scale.reshape({-1, 1, 1, 1})).to(conv_weight.scalar_type());
      }
      if (needs_gamma) {
        const Tensor shift = conv_bias.defined() ? conv_bias.to(acc) - mean.to(acc) : -mean.to(acc);
        d_gamma =
            (invstd * ((dw * conv_weight.to(acc)).sum({1, 2, 3}) + shift * db)).to(static_cast<ScalarType>(m[12]));
      }
    }
    if (needs_cb) {
      d_cb = (db * scale).to(conv_bias.scalar_type());
    }
    if (needs_beta) {
      d_beta = db.to(static_cast<ScalarType>(m[13]));
    }
    const Tensor none;
    // mean, var and the non-tensor arguments get none.
    return {needs_x ? dx : none, needs_residual ? g : none, d_cw, d_cb, d_gamma, d_beta, none, none, none, none, none,
        none, none, none, none, none};
  }
};

Tensor frozen_conv_bn(const Tensor& x, const OptTensor& residual, const Tensor& conv_weight, const OptTensor& conv_bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const Tensor& mean, const Tensor& var, double eps,
    const Ints& padding, const Ints& stride, const Ints& dilation, int64_t groups, bool relu, bool onednn,
    bool compute_in_fp32) {
  // As aten's own Python bindings do: other Python threads run while the kernels do.
  py::gil_scoped_release no_gil;
  return FrozenConvBNFunction::apply(x, residual, conv_weight, conv_bias, bn_weight, bn_bias, mean, var, eps, padding,
      stride, dilation, groups, relu, onednn, compute_in_fp32)[0];
}

}  // namespace

void register_conv_epilogue(py::module_& m) {
  m.def("frozen_conv_bn", &frozen_conv_bn,
      "frozen_conv_bn(x, residual, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, "
      "padding, stride, dilation, groups, relu, onednn, compute_in_fp32) -> out, with grads");
}

}  // namespace fusedres
