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
// The caller (fusedres/ops/add_norm.py: _add_norm) has chosen a C++ backend (cpu or cuda),
// checked eps and that weight and bias are vectors, drawn the dropout RNG state, and found plain
// tensors, no functorch transform and no compilation; the operators check the rest, and a
// failure is re-diagnosed in Python. The operators' arguments and their order come from the spec
// (fusedres/spec/add_norm.py, through the generated fusedres/spec.h); `plan` is a copy of
// fusedres/ops/add_norm.py's (this module cannot call Python), tested against it for every
// combination of its inputs (tests/test_add_norm_plan.py).
#include "fastpath/module.h"

#include <fusedres/spec.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fusedres {
namespace {

using at::ScalarType;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using FwdArgs = AddNormFwdArgs<Tensor>;
using BwdArgs = AddNormBwdArgs<Tensor>;

// The operators, called below Autograd: dispatch modes and subclasses below it (FakeTensorMode,
// op counters) still see them.
AddNormFwdResult<Tensor> add_norm_fwd(const FwdArgs& a) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedres::add_norm_fwd", "").typed<AddNormFwdSignature<Tensor>>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_add_norm_fwd(op, a);
}

AddNormBwdResult<Tensor> add_norm_bwd(const BwdArgs& a) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedres::add_norm_bwd", "").typed<AddNormBwdSignature<Tensor>>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_add_norm_bwd(op, a);
}

// fusedres/ops/add_norm.py's Plan and plan(): what a call's arguments decide.
struct Plan {
  ScalarType h_dtype;
  bool store_h;  // the forward writes h
  bool saves_h;  // the backward reads the stored h; else it recomputes h from x (+ residual)
  bool saves_x;  // the backward reads x: to recompute h, or for dcolscale
  std::optional<ScalarType> dresidual_dtype;  // the residual's grad as a tensor of its own
  bool colscale_grad;
};

Plan plan(ScalarType x_dtype, std::optional<ScalarType> residual_dtype, bool residual_in_fp32, bool prenorm,
    bool needs_grad, bool recompute_h, bool transforms_x, bool colscale_grad) {
  Plan p{};
  p.h_dtype = residual_dtype.value_or(x_dtype);
  if (residual_in_fp32) {
    p.h_dtype = c10::promoteTypes(p.h_dtype, at::kFloat);
  }
  const bool h_is_x = !residual_dtype && !transforms_x;
  p.store_h = prenorm || (needs_grad && !(h_is_x || recompute_h));
  p.saves_h = p.store_h;
  p.colscale_grad = colscale_grad && needs_grad;
  p.saves_x = !p.store_h || p.colscale_grad;
  if (residual_dtype && (*residual_dtype != x_dtype || transforms_x)) {
    p.dresidual_dtype = residual_dtype;
  }
  return p;
}

// Whether the kernels read t in place: unit stride along the last dim and leading dims that
// collapse into rows of one stride (as fusedres/spec: _rows_readable).
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
Tensor as_rows(const Tensor& t) { return t.is_contiguous() || rows_readable(t) ? t : t.contiguous(); }

OptTensor as_rows(const OptTensor& t) { return t.has_value() ? OptTensor(as_rows(*t)) : std::nullopt; }

// The kernels read weight, bias and the scales as contiguous elements.
OptTensor contiguous(const OptTensor& t) {
  return t.has_value() && !t->is_contiguous() ? OptTensor(t->contiguous()) : t;
}

OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

const Tensor& or_undefined(const OptTensor& t) {
  static const Tensor undefined;
  return t.has_value() ? *t : undefined;
}

bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

// What the backward needs besides the saved tensors (fusedres/ops/add_norm.py: _Call), kept in
// the context as integers: named here, encoded in one place.
struct Call {
  Plan plan;
  double eps;
  bool rms_norm;
  double dropout_p;
  double weight_offset;
  ScalarType x_dtype;
  bool prenorm;
  bool has_residual;  // for needs_input_grad, which counts the tensors given
  bool has_weight;
  bool has_bias;
  bool has_colscale;

  static constexpr const char* kInts = "call";
  static constexpr const char* kDoubles = "call_f";

  void save(AutogradContext* ctx) const {
    ctx->saved_data[kInts] = std::vector<int64_t>{static_cast<int64_t>(plan.h_dtype), plan.store_h, plan.saves_h,
        plan.saves_x, plan.dresidual_dtype ? static_cast<int64_t>(*plan.dresidual_dtype) : -1, plan.colscale_grad,
        rms_norm, static_cast<int64_t>(x_dtype), prenorm, has_residual, has_weight, has_bias, has_colscale};
    ctx->saved_data[kDoubles] = std::vector<double>{eps, dropout_p, weight_offset};
  }

  static Call load(AutogradContext* ctx) {
    const auto i = ctx->saved_data[kInts].toIntVector();
    const auto f = ctx->saved_data[kDoubles].toDoubleVector();
    Call c{};
    c.plan = Plan{static_cast<ScalarType>(i[0]), i[1] != 0, i[2] != 0, i[3] != 0,
        i[4] >= 0 ? std::optional<ScalarType>(static_cast<ScalarType>(i[4])) : std::nullopt, i[5] != 0};
    c.rms_norm = i[6] != 0;
    c.x_dtype = static_cast<ScalarType>(i[7]);
    c.prenorm = i[8] != 0;
    c.has_residual = i[9] != 0;
    c.has_weight = i[10] != 0;
    c.has_bias = i[11] != 0;
    c.has_colscale = i[12] != 0;
    c.eps = f[0];
    c.dropout_p = f[1];
    c.weight_offset = f[2];
    return c;
  }
};

// The formula of fusedres/ops/add_norm.py (_save, _backward_with). The differentiable inputs come
// first: x, residual, weight, bias, colscale.
struct AddNormFunction : public torch::autograd::Function<AddNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& residual,
      const OptTensor& weight, const OptTensor& bias, const OptTensor& colscale, const OptTensor& rowscale,
      const OptTensor& seed_offset, const Call& call, bool store_mask) {
    const Plan& p = call.plan;
    auto [y, h, mean, rstd, mask] = add_norm_fwd({.x = x,
        .residual = residual,
        .weight = weight,
        .bias = bias,
        .eps = call.eps,
        .rms_norm = call.rms_norm,
        .h_dtype = p.h_dtype,
        .store_h = p.store_h,
        .dropout_p = call.dropout_p,
        .seed_offset = seed_offset,
        .rowscale = rowscale,
        .colscale = colscale,
        .weight_offset = call.weight_offset,
        .store_mask = store_mask});
    const Tensor none;
    ctx->save_for_backward({p.saves_h ? h : none, p.saves_x ? x : none, p.saves_h ? none : or_undefined(residual),
        or_undefined(weight), or_undefined(bias), call.rms_norm ? none : mean, rstd, or_undefined(seed_offset),
        or_undefined(rowscale), or_undefined(colscale)});
    call.save(ctx);
    ctx->set_materialize_grads(false);  // a grad for y or h alone: no zeros of the other's size
    variable_list out{y};
    if (call.prenorm) {
      out.push_back(h);
    }
    if (store_mask) {
      ctx->mark_non_differentiable({mask});
      out.push_back(mask);
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Call call = Call::load(ctx);
    const Plan& p = call.plan;
    const OptTensor h = defined_or_none(saved[0]), x = defined_or_none(saved[1]);
    // needs_input_grad counts the tensors that were given: x, then the optional ones present.
    size_t edge = 1;
    auto needs = [&](bool present) { return present && ctx->needs_input_grad(edge++); };
    const bool needs_x = ctx->needs_input_grad(0);
    const bool needs_residual = needs(call.has_residual);
    const bool needs_weight = needs(call.has_weight);
    const bool needs_bias = needs(call.has_bias);
    const bool needs_colscale = needs(call.has_colscale);

    const Tensor& like = h ? *h : *x;
    const Tensor dy = grads[0].defined() ? as_rows(grads[0])
                                         : at::zeros(like.sizes(), like.options().dtype(call.x_dtype));  // only h used
    const OptTensor dh = call.prenorm && grads[1].defined() ? OptTensor(as_rows(grads[1])) : std::nullopt;
    const std::optional<ScalarType> dresidual_dtype = needs_residual ? p.dresidual_dtype : std::nullopt;
    const OptTensor residual = defined_or_none(saved[2]), weight = defined_or_none(saved[3]);
    const OptTensor bias = needs_bias ? defined_or_none(saved[4]) : std::nullopt, mean = defined_or_none(saved[5]);
    const OptTensor seed_offset = defined_or_none(saved[7]), rowscale = defined_or_none(saved[8]),
                    colscale = defined_or_none(saved[9]);
    auto [dx, dresidual, dweight, dbias, dcolscale] = add_norm_bwd({.dy = dy,
        .dh = dh,
        .h = h,
        .x = x,
        .residual = residual,
        .h_dtype = p.h_dtype,
        .weight = weight,
        .bias = bias,
        .mean = mean,
        .rstd = saved[6],
        .rms_norm = call.rms_norm,
        .dresidual_dtype = dresidual_dtype,
        .dropout_p = call.dropout_p,
        .seed_offset = seed_offset,
        .rowscale = rowscale,
        .colscale = colscale,
        .weight_offset = call.weight_offset,
        .colscale_grad = p.colscale_grad && needs_colscale});
    // x and residual get the same grad (dL/dh) unless x's branch is transformed or the dtypes
    // differ. The other inputs get none.
    const Tensor none;
    return {needs_x ? dx : none, needs_residual ? (dresidual_dtype ? dresidual : dx) : none,
        needs_weight ? dweight : none, needs_bias ? dbias : none, needs_colscale ? dcolscale : none, none, none, none,
        none};
  }
};

// y; (y, h) with prenorm; the mask appended with return_mask: fusedres.ops.add_norm's contract.
py::object add_norm(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, bool rms_norm, bool prenorm, bool residual_in_fp32, double dropout_p, const OptTensor& rowscale,
    const OptTensor& colscale, double weight_offset, bool return_mask, const OptTensor& seed_offset) {
  const bool needs_grad =
      at::GradMode::is_enabled() && (requires_grad(weight) || x.requires_grad() || requires_grad(residual) ||
                                        requires_grad(bias) || requires_grad(colscale));
  const bool transforms_x = dropout_p > 0.0 || rowscale.has_value() || colscale.has_value();
  const std::optional<ScalarType> residual_dtype =
      residual ? std::optional<ScalarType>(residual->scalar_type()) : std::nullopt;
  const Plan p = plan(x.scalar_type(), residual_dtype, residual_in_fp32, prenorm, needs_grad, x.is_cpu(), transforms_x,
      requires_grad(colscale));
  Tensor y, h, mask;
  {
    // As aten's own Python bindings do: other Python threads run while the kernels do.
    py::gil_scoped_release no_gil;
    const Tensor rows = as_rows(x);
    const OptTensor residual_rows = as_rows(residual), w = contiguous(weight), b = contiguous(bias),
                    rs = contiguous(rowscale), cs = contiguous(colscale);
    if (needs_grad) {
      const Call call{p, eps, rms_norm, dropout_p, weight_offset, x.scalar_type(), prenorm, residual.has_value(),
          weight.has_value(), bias.has_value(), colscale.has_value()};
      variable_list out = AddNormFunction::apply(rows, residual_rows, w, b, cs, rs, seed_offset, call, return_mask);
      y = std::move(out[0]);
      if (prenorm) {
        h = std::move(out[1]);
      }
      if (return_mask) {
        mask = std::move(out.back());
      }
    } else {
      std::tie(y, h, std::ignore, std::ignore, mask) = add_norm_fwd({.x = rows,
          .residual = residual_rows,
          .weight = w,
          .bias = b,
          .eps = eps,
          .rms_norm = rms_norm,
          .h_dtype = p.h_dtype,
          .store_h = p.store_h,
          .dropout_p = dropout_p,
          .seed_offset = seed_offset,
          .rowscale = rs,
          .colscale = cs,
          .weight_offset = weight_offset,
          .store_mask = return_mask});
    }
  }
  if (!prenorm && !return_mask) {
    return py::cast(y);
  }
  py::list out;
  out.append(y);
  if (prenorm) {
    out.append(h);
  }
  if (return_mask) {
    out.append(mask);
  }
  return py::tuple(out);
}

// plan() for the tests (tests/test_add_norm_plan.py compares it with fusedres/ops/add_norm.py's):
// (h_dtype, store_h, saves_h, saves_x, dresidual_dtype or None, colscale_grad).
py::tuple add_norm_plan(ScalarType x_dtype, std::optional<ScalarType> residual_dtype, bool residual_in_fp32,
    bool prenorm, bool needs_grad, bool recompute_h, bool transforms_x, bool colscale_grad) {
  const Plan p =
      plan(x_dtype, residual_dtype, residual_in_fp32, prenorm, needs_grad, recompute_h, transforms_x, colscale_grad);
  return py::make_tuple(p.h_dtype, p.store_h, p.saves_h, p.saves_x,
      p.dresidual_dtype ? py::cast(*p.dresidual_dtype) : py::none(), p.colscale_grad);
}

}  // namespace

void register_add_norm(py::module_& m) {
  m.def("add_norm", &add_norm,
      "add_norm(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, dropout_p, rowscale, "
      "colscale, weight_offset, return_mask, seed_offset) -> y, or (y, [h], [mask])",
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms_norm"),
      py::arg("prenorm"), py::arg("residual_in_fp32"), py::arg("dropout_p") = 0.0, py::arg("rowscale") = py::none(),
      py::arg("colscale") = py::none(), py::arg("weight_offset") = 0.0, py::arg("return_mask") = false,
      py::arg("seed_offset") = py::none());
  m.def("add_norm_plan", &add_norm_plan);
}

}  // namespace fusedres
