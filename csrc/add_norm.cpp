// Memory-safety checks and output allocation shared by the CPU and CUDA Add & Norm kernels.
#include "add_norm.h"

#include <string>

namespace fusedres {

namespace {

// Validates t as rows of N elements (unit stride along N, leading dims that collapse into one
// row stride) and returns the number of rows.
int64_t check_rows(const Tensor& t, const char* name, int64_t n) {
  const int64_t dim = t.dim();
  STD_TORCH_CHECK(dim >= 1 && t.size(dim - 1) == n, "fusedres: ", name, " must have shape (..., ", n, ")");
  STD_TORCH_CHECK(is_supported_float(t.scalar_type()), "fusedres: ", name,
      " must be float32, float64, float16 or bfloat16");
  int64_t rows = 1;
  for (int64_t d = 0; d < dim - 1; ++d) {
    rows *= t.size(d);
  }
  if (rows == 0) {
    return 0;  // nothing is addressed
  }
  STD_TORCH_CHECK(n <= 1 || t.stride(dim - 1) == 1, "fusedres: ", name,
      " must have unit stride along its last dimension");
  int64_t expected = -1;  // the stride the next outer dimension of size > 1 must have
  for (int64_t d = dim - 2; d >= 0; --d) {
    const int64_t size = t.size(d);
    if (size <= 1) {
      continue;
    }
    const int64_t stride = t.stride(d);
    STD_TORCH_CHECK(stride >= 0 && (expected < 0 || stride == expected), "fusedres: ", name,
        "'s leading dimensions must collapse into rows of one stride (make it contiguous)");
    expected = stride * size;
  }
  return rows;
}

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    s += (d > 0 ? ", " : "") + std::to_string(t.size(d));
  }
  return s + ")";
}

void check_rows_like(const Tensor& t, const char* name, const Tensor& like, const char* like_name, RowsView shape) {
  bool same = t.dim() == like.dim();
  for (int64_t d = 0; same && d < t.dim(); ++d) {
    same = t.size(d) == like.size(d);
  }
  STD_TORCH_CHECK(same, "fusedres: ", name, " must have shape ", shape_str(like), " (", like_name, "'s), got ",
      shape_str(t));
  check_rows(t, name, shape.cols);
  STD_TORCH_CHECK(t.device() == like.device(), "fusedres: ", name, " must be on ", like_name, "'s device");
}

void check_vector(const std::optional<Tensor>& t, const char* name, const Tensor& x, int64_t n) {
  if (!t.has_value()) {
    return;
  }
  STD_TORCH_CHECK(t->numel() == n && (n <= 1 || t->is_contiguous()), "fusedres: ", name, " must have shape (", n,
      ",) (or ", n, " contiguous elements)");
  STD_TORCH_CHECK(is_supported_float(t->scalar_type()), "fusedres: ", name,
      " must be float32, float64, float16 or bfloat16");
  STD_TORCH_CHECK(t->device() == x.device(), "fusedres: ", name, " must be on the same device as x");
}

void check_stats(const Tensor& t, const char* name, const Tensor& like, RowsView shape, ScalarType stats) {
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == shape.rows && t.scalar_type() == stats &&
      (shape.rows <= 1 || t.stride(0) == 1) && t.device() == like.device(),
      "fusedres: ", name, " must be a contiguous (", shape.rows, ",) tensor of the statistics dtype");
}

} // namespace

int64_t row_stride(const Tensor& t) {
  const int64_t dim = t.dim();
  for (int64_t d = dim - 2; d >= 0; --d) {
    if (t.size(d) > 1) {
      return t.stride(d);
    }
  }
  return t.size(dim - 1);  // a single row: any stride addresses it
}

RowsView check_add_norm_fwd_args(
    const Tensor& x,
    const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps) {
  STD_TORCH_CHECK(x.dim() >= 1, "fusedres: x must have at least one dimension");
  RowsView shape{0, x.size(x.dim() - 1)};
  STD_TORCH_CHECK(shape.cols > 0, "fusedres: the normalized dimension of x must not be empty");
  STD_TORCH_CHECK(eps > 0, "fusedres: eps must be > 0, got ", eps);
  shape.rows = check_rows(x, "x", shape.cols);
  if (residual.has_value()) {
    check_rows_like(*residual, "residual", x, "x", shape);
  }
  check_vector(weight, "weight", x, shape.cols);
  check_vector(bias, "bias", x, shape.cols);
  STD_TORCH_CHECK(!bias.has_value() || !weight.has_value() || bias->scalar_type() == weight->scalar_type(),
      "fusedres: bias must have weight's dtype");
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
  STD_TORCH_CHECK(h.dim() >= 1, "fusedres: h must have at least one dimension");
  RowsView shape{0, h.size(h.dim() - 1)};
  STD_TORCH_CHECK(shape.cols > 0, "fusedres: the normalized dimension of h must not be empty");
  shape.rows = check_rows(h, "h", shape.cols);
  check_rows_like(dy, "dy", h, "h", shape);
  if (dh.has_value()) {
    check_rows_like(*dh, "dh", h, "h", shape);
  }
  if (residual.has_value()) {
    check_rows_like(*residual, "residual", h, "h", shape);
  }
  check_vector(weight, "weight", h, shape.cols);
  check_vector(bias, "bias", h, shape.cols);
  const ScalarType stats = stats_dtype(dy.scalar_type());
  check_stats(rstd, "rstd", h, shape, stats);
  if (!rms_norm) {
    check_stats(mean, "mean", h, shape, stats);
  }
  return shape;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> alloc_add_norm_fwd_outputs(
    const Tensor& x, RowsView shape, bool rms_norm, ScalarType h_dtype, bool store_h) {
  STD_TORCH_CHECK(is_supported_float(h_dtype), "fusedres: h_dtype must be float32, float64, float16 or bfloat16");
  const ScalarType stats = stats_dtype(x.scalar_type());
  Tensor y = empty_shaped_like(x, x.scalar_type());
  Tensor h = store_h ? empty_shaped_like(x, h_dtype) : empty_on(x, {0}, h_dtype);
  Tensor mean = empty_on(x, {rms_norm ? 0 : shape.rows}, stats);
  Tensor rstd = empty_on(x, {shape.rows}, stats);
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor> alloc_add_norm_bwd_row_outputs(
    const Tensor& dy, const Tensor& h, std::optional<ScalarType> dresidual_dtype) {
  STD_TORCH_CHECK(!dresidual_dtype.has_value() || is_supported_float(*dresidual_dtype),
      "fusedres: dresidual_dtype must be float32, float64, float16 or bfloat16");
  Tensor dx = empty_shaped_like(h, dy.scalar_type());
  Tensor dresidual =
      dresidual_dtype.has_value() ? empty_shaped_like(h, *dresidual_dtype) : empty_on(dy, {0}, dy.scalar_type());
  return {dx, dresidual};
}

Tensor alloc_param_grad(const Tensor& dy, const std::optional<Tensor>& like) {
  return like.has_value() ? empty_shaped_like(*like, like->scalar_type()) : empty_on(dy, {0}, dy.scalar_type());
}

} // namespace fusedres
