// Add & Norm's checks and outputs, shared by the CPU and CUDA kernels.
#include "add_norm.h"

namespace fusedres {

namespace {

template <class Args>
AddNormFeatures features_of(const Args& a) {
  AddNormFeatures f;
  f.dropout_p = a.dropout_p;
  if (a.seed_offset) {
    f.seed_offset = static_cast<const int64_t*>(a.seed_offset->const_data_ptr());
  }
  if (a.rowscale) {
    f.rowscale = a.rowscale->const_data_ptr();
    f.rowscale_dtype = dtype_code(a.rowscale->scalar_type());
  }
  if (a.colscale) {
    f.colscale = a.colscale->const_data_ptr();
    f.colscale_dtype = dtype_code(a.colscale->scalar_type());
  }
  f.weight_offset = a.weight_offset;
  return f;
}

// An output of `like`'s shape when `written`, else (0,): of `dtype` either way.
Tensor shaped_or_empty(const Tensor& like, bool written, ScalarType dtype) {
  return written ? empty_shaped_like(like, dtype) : empty_on(like, {0}, dtype);
}

Tensor param_grad(const Tensor& dy, const std::optional<Tensor>& param, bool written) {
  return written && param ? empty_shaped_like(*param, param->scalar_type()) : empty_on(dy, {0}, dy.scalar_type());
}

}  // namespace

AddNormParams check_add_norm(const AddNormFwd& a) { return {check_add_norm_fwd(a), features_of(a)}; }

AddNormParams check_add_norm(const AddNormBwd& a) { return {check_add_norm_bwd(a), features_of(a)}; }

AddNormFwdResult<Tensor> alloc_add_norm_outputs(const AddNormFwd& a, RowsView shape) {
  const ScalarType stats = stats_dtype(a.x.scalar_type());
  return {empty_shaped_like(a.x, a.x.scalar_type()), shaped_or_empty(a.x, a.store_h, a.h_dtype),
      empty_on(a.x, {a.rms_norm ? 0 : shape.rows}, stats), empty_on(a.x, {shape.rows}, stats),
      shaped_or_empty(a.x, a.store_mask, ScalarType::Bool)};
}

AddNormBwdResult<Tensor> alloc_add_norm_outputs(const AddNormBwd& a) {
  const ScalarType dy_dtype = a.dy.scalar_type();
  return {empty_shaped_like(a.dy, dy_dtype),
      shaped_or_empty(a.dy, a.dresidual_dtype.has_value(), a.dresidual_dtype.value_or(dy_dtype)),
      param_grad(a.dy, a.weight, true), param_grad(a.dy, a.bias, true), param_grad(a.dy, a.colscale, a.colscale_grad)};
}

}  // namespace fusedres
