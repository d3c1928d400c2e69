// The check primitives of csrc/checks.h.
#include "checks.h"

#include <string>

namespace fusedres {

namespace {

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    s += (d > 0 ? ", " : "") + std::to_string(t.size(d));
  }
  return s + ")";
}

void check_float(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(
      is_supported_float(t.scalar_type()), "fusedres: ", name, " must be float32, float64, float16 or bfloat16");
}

// The rows of (..., n) tensor t: unit stride along n, leading dims that collapse into rows of
// one stride.
int64_t check_rows(const Tensor& t, const char* name, int64_t n) {
  const int64_t dim = t.dim();
  STD_TORCH_CHECK(dim >= 1 && t.size(dim - 1) == n, "fusedres: ", name, " must have shape (..., ", n, ")");
  check_float(t, name);
  int64_t rows = 1;
  for (int64_t d = 0; d < dim - 1; ++d) {
    rows *= t.size(d);
  }
  if (rows == 0) {
    return 0;  // nothing is addressed
  }
  STD_TORCH_CHECK(
      n <= 1 || t.stride(dim - 1) == 1, "fusedres: ", name, " must have unit stride along its last dimension");
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

}  // namespace

int64_t row_stride(const Tensor& t) {
  const int64_t dim = t.dim();
  for (int64_t d = dim - 2; d >= 0; --d) {
    if (t.size(d) > 1) {
      return t.stride(d);
    }
  }
  return t.size(dim - 1);  // a single row: any stride addresses it
}

RowsView check_anchor_rows(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() >= 1, "fusedres: ", name, " must have at least one dimension");
  RowsView shape{0, t.size(t.dim() - 1)};
  STD_TORCH_CHECK(shape.cols > 0, "fusedres: the normalized dimension of ", name, " must not be empty");
  shape.rows = check_rows(t, name, shape.cols);
  return shape;
}

void check_rows_like(const Tensor& t, const char* name, const Tensor& like, const char* like_name, RowsView shape) {
  bool same = t.dim() == like.dim();
  for (int64_t d = 0; same && d < t.dim(); ++d) {
    same = t.size(d) == like.size(d);
  }
  STD_TORCH_CHECK(
      same, "fusedres: ", name, " must have shape ", shape_str(like), " (", like_name, "'s), got ", shape_str(t));
  check_rows(t, name, shape.cols);
  STD_TORCH_CHECK(t.device() == like.device(), "fusedres: ", name, " must be on ", like_name, "'s device");
}

void check_elements(const Tensor& t, const char* name, const Tensor& anchor, int64_t count, bool stats) {
  STD_TORCH_CHECK(t.numel() == count && (count <= 1 || t.is_contiguous()), "fusedres: ", name, " must have ", count,
      " contiguous elements, got shape ", shape_str(t));
  if (stats) {
    STD_TORCH_CHECK(t.scalar_type() == stats_dtype(anchor.scalar_type()), "fusedres: ", name,
        " must have the statistics dtype (float32; float64 for float64 data)");
  } else {
    check_float(t, name);
  }
  STD_TORCH_CHECK(t.device() == anchor.device(), "fusedres: ", name, " must be on the same device as the data");
}

void check_seed_offset(const Tensor& t, const char* name, const Tensor& anchor) {
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == 2 && t.scalar_type() == ScalarType::Long && t.is_contiguous(),
      "fusedres: ", name, " must be a contiguous (2,) int64 tensor (seed, offset)");
  STD_TORCH_CHECK(t.device() == anchor.device(), "fusedres: ", name, " must be on the same device as the data");
}

bool disjoint(const Tensor& a, const Tensor& b) {
  if (a.device() != b.device()) {
    return true;
  }
  const char* a0 = static_cast<const char*>(a.const_data_ptr());
  const char* b0 = static_cast<const char*>(b.const_data_ptr());
  const int64_t a_bytes = a.numel() * static_cast<int64_t>(a.element_size());
  const int64_t b_bytes = b.numel() * static_cast<int64_t>(b.element_size());
  return a0 + a_bytes <= b0 || b0 + b_bytes <= a0;
}

void check_float_dtype(ScalarType dtype, const char* name) {
  STD_TORCH_CHECK(is_supported_float(dtype), "fusedres: ", name, " must be float32, float64, float16 or bfloat16");
}

}  // namespace fusedres
