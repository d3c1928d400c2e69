// Argument checks and output allocation shared by the CPU and CUDA Add & Norm kernels.
#include "add_norm.h"

#include <torch/headeronly/util/Exception.h>

namespace fusedres {

bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
      t == ScalarType::BFloat16;
}

namespace {

// A (rows, cols) matrix the kernels may index as base + r * stride(0) + c.
void check_rows(const Tensor& t, const char* name, const Tensor& x, RowsView shape) {
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == shape.rows && t.size(1) == shape.cols,
      "fusedres: ", name, " must have shape (", shape.rows, ", ", shape.cols, ")");
  STD_TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fusedres: ", name,
      " must have unit stride along its last dimension");
  STD_TORCH_CHECK(t.stride(0) >= 0, "fusedres: ", name, " must have a non-negative row stride");
  STD_TORCH_CHECK(is_supported_float(t.scalar_type()), "fusedres: ", name,
      " must be float32, float64, float16 or bfloat16");
  STD_TORCH_CHECK(t.device() == x.device(), "fusedres: ", name, " must be on the same device as x");
}

void check_vector(const std::optional<Tensor>& t, const char* name, const Tensor& x, int64_t n) {
  if (!t.has_value()) {
    return;
  }
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fusedres: ", name, " must have shape (", n, ")");
  STD_TORCH_CHECK(n <= 1 || t->stride(0) == 1, "fusedres: ", name, " must be contiguous");
  STD_TORCH_CHECK(is_supported_float(t->scalar_type()), "fusedres: ", name,
      " must be float32, float64, float16 or bfloat16");
  STD_TORCH_CHECK(t->device() == x.device(), "fusedres: ", name, " must be on the same device as x");
}

} // namespace

RowsView check_add_norm_fwd_args(
    const Tensor& x,
    const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps) {
  STD_TORCH_CHECK(x.dim() == 2, "fusedres: x must be 2-D (rows, N), got ", x.dim(), " dims");
  RowsView shape{x.size(0), x.size(1)};
  STD_TORCH_CHECK(shape.cols > 0, "fusedres: the normalized dimension of x must not be empty");
  STD_TORCH_CHECK(eps > 0, "fusedres: eps must be > 0, got ", eps);
  check_rows(x, "x", x, shape);
  if (residual.has_value()) {
    check_rows(*residual, "residual", x, shape);
  }
  check_vector(weight, "weight", x, shape.cols);
  check_vector(bias, "bias", x, shape.cols);
  STD_TORCH_CHECK(!bias.has_value() || !weight.has_value() ||
      bias->scalar_type() == weight->scalar_type(), "fusedres: bias must have weight's dtype");
  return shape;
}

RowsView check_add_norm_bwd_args(
    const Tensor& dy,
    const std::optional<Tensor>& dh,
    const Tensor& h,
    const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    const Tensor& mean,
    const Tensor& rstd,
    bool rms_norm) {
  STD_TORCH_CHECK(h.dim() == 2, "fusedres: h must be 2-D (rows, N)");
  RowsView shape{h.size(0), h.size(1)};
  STD_TORCH_CHECK(shape.cols > 0, "fusedres: the normalized dimension of h must not be empty");
  check_rows(h, "h", h, shape);
  check_rows(dy, "dy", h, shape);
  if (dh.has_value()) {
    check_rows(*dh, "dh", h, shape);
  }
  if (residual.has_value()) {
    check_rows(*residual, "residual", h, shape);
  }
  check_vector(weight, "weight", h, shape.cols);
  check_vector(bias, "bias", h, shape.cols);
  const ScalarType stats = stats_dtype(dy.scalar_type());
  STD_TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == shape.rows && rstd.scalar_type() == stats &&
      (shape.rows <= 1 || rstd.stride(0) == 1) && rstd.device() == h.device(),
      "fusedres: rstd must be a contiguous (", shape.rows, ",) tensor of the statistics dtype");
  if (!rms_norm) {
    STD_TORCH_CHECK(mean.dim() == 1 && mean.size(0) == shape.rows && mean.scalar_type() == stats &&
        (shape.rows <= 1 || mean.stride(0) == 1) && mean.device() == h.device(),
        "fusedres: mean must be a contiguous (", shape.rows, ",) tensor of the statistics dtype");
  }
  return shape;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> alloc_add_norm_fwd_outputs(
    const Tensor& x, RowsView shape, bool rms_norm, ScalarType h_dtype, bool store_h) {
  STD_TORCH_CHECK(is_supported_float(h_dtype),
      "fusedres: h_dtype must be float32, float64, float16 or bfloat16");
  Tensor y = torch::stable::new_empty(x, {shape.rows, shape.cols});
  Tensor h = store_h ? torch::stable::new_empty(x, {shape.rows, shape.cols}, h_dtype)
                     : torch::stable::new_empty(x, {0}, h_dtype);
  const ScalarType stats = stats_dtype(x.scalar_type());
  Tensor mean = torch::stable::new_empty(x, {rms_norm ? 0 : shape.rows}, stats);
  Tensor rstd = torch::stable::new_empty(x, {shape.rows}, stats);
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor> alloc_add_norm_bwd_row_outputs(
    const Tensor& dy, RowsView shape, std::optional<ScalarType> dresidual_dtype) {
  STD_TORCH_CHECK(!dresidual_dtype.has_value() || is_supported_float(*dresidual_dtype),
      "fusedres: dresidual_dtype must be float32, float64, float16 or bfloat16");
  Tensor dx = torch::stable::new_empty(dy, {shape.rows, shape.cols});
  Tensor dresidual = dresidual_dtype.has_value()
      ? torch::stable::new_empty(dy, {shape.rows, shape.cols}, *dresidual_dtype)
      : torch::stable::new_empty(dy, {0});
  return {dx, dresidual};
}

Tensor reduce_partials(const Tensor& partials, const std::optional<Tensor>& like) {
  if (!like.has_value()) {
    return torch::stable::new_empty(partials, {0});
  }
  std::vector<int64_t> dims{0};
  Tensor total = torch::stable::sum(partials, torch::headeronly::IntHeaderOnlyArrayRef(dims));
  return torch::stable::to(total, like->scalar_type());
}

} // namespace fusedres
