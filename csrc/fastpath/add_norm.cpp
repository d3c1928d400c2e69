// fusedres._fastpath: add_norm's eager call, from Python straight into a C++ autograd node.
//
// Why: on tiny tensors, where kernel time is ~0, a call is host time. Through a Python
// torch.autograd.Function, add_layer_norm forward + backward took ~1.33x the host time of the
// aten ops it replaces, ~7 us of it torch's Python Function machinery, and a C++ autograd node
// reached through the generic operator call from Python was no faster (that call alone costs
// ~3 us more than the kernel). A Python binding of our own that creates the node in C++ and
// calls the kernels through the dispatcher, below Autograd, measured ~1.08x (README: host time).
//
// Why a module of its own: torch's C++ and Python APIs have no stable ABI, so this cannot live in
// fusedres._C (one build for every torch >= 2.10 and CPython >= 3.10). It is built against the
// torch and CPython of the build, and fusedres/_extension.py imports it only under that same
// torch; anywhere else, fusedres/ops/add_norm.py runs the same formula in Python
// (_AddNormFunction). The tests run both (tests/test_add_norm.py, `autograd_path`).
//
// The caller (fusedres/ops/add_norm.py: _run) has chosen a C++ backend (cpu or cuda), checked
// eps and that weight and bias are vectors, and found plain tensors, no functorch transform and
// no compilation; the operators check the rest, and a failure is re-diagnosed in Python.
#include "fastpath/module.h"

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fusedres {
namespace {

using at::ScalarType;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The operators of csrc/ops.cpp, called below Autograd: dispatch modes and subclasses below it
// (FakeTensorMode, op counters) still see them.
Outputs add_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, bool rms_norm, ScalarType h_dtype, bool store_h) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedres::add_norm_fwd", "")
                             .typed<Outputs(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                 double, bool, ScalarType, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h);
}

Outputs add_norm_bwd(const Tensor& dy, const OptTensor& dh, const Tensor& h, const OptTensor& residual,
    ScalarType h_dtype, const OptTensor& weight, const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
    bool rms_norm, std::optional<ScalarType> dresidual_dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedres::add_norm_bwd", "")
                             .typed<Outputs(const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                                 ScalarType, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, bool,
                                 std::optional<ScalarType>)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(dy, dh, h, residual, h_dtype, weight, bias, mean, rstd, rms_norm, dresidual_dtype);
}

// Whether the kernels read t in place: unit stride along the last dim and leading dims that
// collapse into rows of one stride (as fusedres/_checks.py: _rows_readable).
bool rows_readable(const Tensor& t) {
  const int64_t dim = t.dim();
  if (dim == 0 || (t.size(dim - 1) > 1 && t.stride(dim - 1) != 1)) {
    return false;
  }
  int64_t expected = -1;
  for (int64_t d = dim - 2; d >= 0; --d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size <= 1) {
      continue;
    }
    if (stride < 0 || (expected >= 0 && stride != expected)) {
      return false;
    }
    expected = stride * size;
  }
  return true;
}

// t as the kernels read it: itself, or a contiguous copy (incoming grads may be expanded or
// transposed views).
Tensor as_rows(const Tensor& t) {
  return t.is_contiguous() || rows_readable(t) ? t : t.contiguous();
}

OptTensor as_rows(const OptTensor& t) {
  return t.has_value() ? OptTensor(as_rows(*t)) : std::nullopt;
}

// The kernels read weight and bias as N contiguous elements.
OptTensor contiguous(const OptTensor& t) {
  return t.has_value() && !t->is_contiguous() ? OptTensor(t->contiguous()) : t;
}

OptTensor defined_or_none(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

bool requires_grad(const OptTensor& t) {
  return t.has_value() && t->requires_grad();
}

// The formula of fusedres/ops/add_norm.py (_save, _backward_with).
struct AddNormFunction : public torch::autograd::Function<AddNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& residual,
      const OptTensor& weight, const OptTensor& bias, double eps, bool rms_norm, ScalarType h_dtype, bool store_h,
      bool prenorm) {
    auto [y, h, mean, rstd] = add_norm_fwd(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h);
    // Backward needs the tensor that was normalized: the stored h, or x (+ residual, added back
    // by the backward kernel) when h was not written.
    const Tensor none;
    const Tensor& w = weight.has_value() ? *weight : none;
    const Tensor& b = bias.has_value() ? *bias : none;
    if (store_h) {
      ctx->save_for_backward({h, none, w, b, mean, rstd});
    } else {
      ctx->save_for_backward({x, residual.has_value() ? *residual : none, w, b, mean, rstd});
    }
    // x's grad has x's dtype (dy's); residual's is a tensor of its own when its dtype differs.
    const ScalarType x_dtype = x.scalar_type();
    const bool own_dresidual = residual.has_value() && residual->scalar_type() != x_dtype;
    ctx->saved_data["meta"] = std::vector<int64_t>{rms_norm, static_cast<int64_t>(h_dtype),
        static_cast<int64_t>(x_dtype), own_dresidual ? static_cast<int64_t>(residual->scalar_type()) : -1,
        residual.has_value(), weight.has_value()};
    if (!prenorm) {
      return {y};
    }
    ctx->set_materialize_grads(false);  // a grad for y or h alone: no zeros of the other's size
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& h = saved[0];
    const auto meta = ctx->saved_data["meta"].toIntVector();
    const bool rms_norm = meta[0] != 0;
    const auto h_dtype = static_cast<ScalarType>(meta[1]);
    const auto x_dtype = static_cast<ScalarType>(meta[2]);
    // needs_input_grad counts the tensors that were given (x, then residual, weight, bias when not None).
    const size_t residual_edge = 1, weight_edge = residual_edge + meta[4], bias_edge = weight_edge + meta[5];
    const bool needs_x = ctx->needs_input_grad(0);
    const bool needs_residual = meta[4] && ctx->needs_input_grad(residual_edge);
    const bool needs_weight = meta[5] && ctx->needs_input_grad(weight_edge);
    const bool needs_bias = saved[3].defined() && ctx->needs_input_grad(bias_edge);

    const Tensor dy = grads[0].defined() ? as_rows(grads[0])
                                         : at::zeros(h.sizes(), h.options().dtype(x_dtype));  // only h was used
    const OptTensor dh = grads.size() > 1 && grads[1].defined() ? OptTensor(as_rows(grads[1])) : std::nullopt;
    std::optional<ScalarType> dresidual_dtype;
    if (needs_residual && meta[3] >= 0) {
      dresidual_dtype = static_cast<ScalarType>(meta[3]);
    }
    auto [dx, dresidual, dweight, dbias] = add_norm_bwd(dy, dh, h, defined_or_none(saved[1]), h_dtype,
        defined_or_none(saved[2]), needs_bias ? defined_or_none(saved[3]) : std::nullopt, saved[4], saved[5],
        rms_norm, dresidual_dtype);
    // x and residual get the same grad (dL/dh); one tensor serves both when dtypes agree. The
    // other inputs (eps, rms_norm, h_dtype, store_h, prenorm) get none.
    const Tensor none;
    return {needs_x ? dx : none, needs_residual ? (dresidual_dtype ? dresidual : dx) : none,
        needs_weight ? dweight : none, needs_bias ? dbias : none, none, none, none, none, none};
  }
};

// y, or (y, h) with prenorm: fusedres.ops.add_norm's contract (h's dtype and when h is written
// are decided as fusedres/ops/add_norm.py: _run decides them).
py::object add_norm(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, bool rms_norm, bool prenorm, bool residual_in_fp32) {
  ScalarType h_dtype = residual.has_value() ? residual->scalar_type() : x.scalar_type();
  if (residual_in_fp32) {
    h_dtype = c10::promoteTypes(h_dtype, at::kFloat);
  }
  const bool needs_grad = at::GradMode::is_enabled() &&
      (requires_grad(weight) || x.requires_grad() || requires_grad(residual) || requires_grad(bias));
  // h is written only when someone reads it: prenorm returns it; a backward reads it, except on
  // the CPU, whose backward adds the residual back instead.
  const bool store_h = prenorm || (needs_grad && residual.has_value() && !x.is_cpu());
  Tensor y, h;
  {
    // As aten's own Python bindings do: other Python threads run while the kernels do.
    py::gil_scoped_release no_gil;
    const Tensor rows = as_rows(x);
    const OptTensor residual_rows = as_rows(residual), w = contiguous(weight), b = contiguous(bias);
    if (needs_grad) {
      variable_list out = AddNormFunction::apply(rows, residual_rows, w, b, eps, rms_norm, h_dtype, store_h, prenorm);
      y = std::move(out[0]);
      if (prenorm) {
        h = std::move(out[1]);
      }
    } else {
      std::tie(y, h, std::ignore, std::ignore) =
          add_norm_fwd(rows, residual_rows, w, b, eps, rms_norm, h_dtype, store_h);
    }
  }
  return prenorm ? py::object(py::make_tuple(y, h)) : py::cast(y);
}

} // namespace

void register_add_norm(py::module_& m) {
  m.def("add_norm", &add_norm, "add_norm(x, residual, weight, bias, eps, rms_norm, prenorm, "
        "residual_in_fp32) -> y, or (y, h) with prenorm");
}

} // namespace fusedres

