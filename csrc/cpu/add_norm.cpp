// Add & Norm on the CPU: torch's thread pool over rows, vectorized row kernels
// (add_norm_kernel.h) compiled for the baseline ISA and for AVX2+FMA, chosen at run time.
#include "add_norm.h"
#include "cpu/float_rows.h"
#include "cpu/huge_pages.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fusedres::cpu {

// One (rows, N) operand: byte address of row 0, byte stride between rows, dtype.
struct RowArg {
  char* base = nullptr;
  int64_t stride = 0;
  ScalarType dtype = ScalarType::Float;

  RowArg() = default;
  explicit RowArg(const Tensor& t)
      : base(static_cast<char*>(t.data_ptr())),
        stride(t.stride(0) * static_cast<int64_t>(t.element_size())),
        dtype(t.scalar_type()) {}
  char* row(int64_t r) const { return base + r * stride; }
  explicit operator bool() const { return base != nullptr; }
};

struct AddNormFwdRows {
  RowArg x, residual, h, y;
  ScalarType h_dtype;
  void* mean;
  void* rstd;
  int64_t n;
  double eps;
  bool rms_norm;
};

struct AddNormBwdRows {
  RowArg dy, dh, h, residual, dx, dresidual;  // residual: h is x, recompute x + residual
  ScalarType h_dtype;
  const void* mean;
  const void* rstd;
  int64_t n;
  bool rms_norm;
};

} // namespace fusedres::cpu

#define FUSEDRES_CPU_KERNELS "cpu/add_norm_kernel.h"
#include "cpu/isa_dispatch.h"

namespace fusedres::cpu {
namespace {

// Rows per parallel task: enough elements that the pool's per-task overhead is noise.
int64_t grain_rows(int64_t n) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
}

// The backward splits rows into a fixed number of chunks that depends only on (M, N), never on
// the thread count, and sums the per-chunk dweight/dbias partials in a fixed order afterwards:
// the grads are bitwise reproducible on any machine with the same ISA.
int64_t num_chunks(int64_t m, int64_t n) {
  const int64_t by_work = (m * n + 32767) / 32768;
  return std::max<int64_t>(1, std::min<int64_t>({m, by_work, 128}));
}

template <typename acc_t>
void run_fwd(const AddNormFwdRows& args, const std::optional<Tensor>& weight,
             const std::optional<Tensor>& bias, int64_t m) {
  const int64_t n = args.n;
  const auto w = to_acc_vector<acc_t>(weight, n, acc_t(1));
  const auto b = to_acc_vector<acc_t>(bias, n, acc_t(0));
  torch::stable::parallel_for(0, m, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(n);
    FUSEDRES_ISA_CALL(add_norm_fwd_rows<acc_t>(args, w.data(), b.data(), buf.data(), begin, end));
  });
}

template <typename acc_t>
void run_bwd(const AddNormBwdRows& args, const std::optional<Tensor>& weight, acc_t* dw_partials,
             acc_t* db_partials, int64_t m, int64_t chunks) {
  const int64_t n = args.n;
  const auto w = to_acc_vector<acc_t>(weight, n, acc_t(1));
  const int64_t rows_per_chunk = (m + chunks - 1) / chunks;
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread rows: xhat, g, h converted, and scratch partials for an absent weight/bias
    // (accumulating into L1-resident scratch is cheaper than a second loop variant).
    std::vector<acc_t> scratch(5 * n);
    acc_t* xhat = scratch.data();
    acc_t* g = xhat + n;
    acc_t* hbuf = g + n;
    for (int64_t c = begin; c < end; ++c) {
      acc_t* dw = dw_partials ? dw_partials + c * n : hbuf + n;
      acc_t* db = db_partials ? db_partials + c * n : hbuf + 2 * n;
      const int64_t r0 = c * rows_per_chunk;
      FUSEDRES_ISA_CALL(
          add_norm_bwd_rows<acc_t>(args, w.data(), dw, db, xhat, g, hbuf, r0, std::min(m, r0 + rows_per_chunk)));
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd_cpu(
    const Tensor& x,
    const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps,
    bool rms_norm,
    ScalarType h_dtype,
    bool store_h) {
  const RowsView shape = check_add_norm_fwd_args(x, residual, weight, bias, eps);
  auto [y, h, mean, rstd] = alloc_add_norm_fwd_outputs(x, shape, rms_norm, h_dtype, store_h);
  advise_huge_pages(y);
  advise_huge_pages(h);
  if (shape.rows == 0) {
    return {y, h, mean, rstd};
  }
  AddNormFwdRows args{};
  args.x = RowArg(x);
  args.residual = residual.has_value() ? RowArg(*residual) : RowArg();
  args.h = store_h ? RowArg(h) : RowArg();
  args.y = RowArg(y);
  args.h_dtype = h_dtype;
  args.mean = rms_norm ? nullptr : mean.data_ptr();
  args.rstd = rstd.data_ptr();
  args.n = shape.cols;
  args.eps = eps;
  args.rms_norm = rms_norm;
  if (rstd.scalar_type() == ScalarType::Double) {
    run_fwd<double>(args, weight, bias, shape.rows);
  } else {
    run_fwd<float>(args, weight, bias, shape.rows);
  }
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cpu(
    const Tensor& dy,
    const std::optional<Tensor>& dh,
    const Tensor& h,
    const std::optional<Tensor>& residual,
    ScalarType h_dtype,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    const Tensor& mean,
    const Tensor& rstd,
    bool rms_norm,
    std::optional<ScalarType> dresidual_dtype) {
  const RowsView shape = check_add_norm_bwd_args(dy, dh, h, residual, weight, bias, mean, rstd, rms_norm);
  auto [dx, dresidual] = alloc_add_norm_bwd_row_outputs(dy, shape, dresidual_dtype);
  advise_huge_pages(dx);
  advise_huge_pages(dresidual);
  const ScalarType acc = rstd.scalar_type();
  const int64_t chunks = num_chunks(shape.rows, shape.cols);
  // Zero-initialized so that M == 0 still yields zero grads.
  std::optional<Tensor> dw_partials, db_partials;
  if (weight.has_value()) {
    dw_partials = torch::stable::new_zeros(dy, {chunks, shape.cols}, acc);
  }
  if (bias.has_value()) {
    db_partials = torch::stable::new_zeros(dy, {chunks, shape.cols}, acc);
  }
  if (shape.rows > 0) {
    AddNormBwdRows args{};
    args.dy = RowArg(dy);
    args.dh = dh.has_value() ? RowArg(*dh) : RowArg();
    args.h = RowArg(h);
    args.residual = residual.has_value() ? RowArg(*residual) : RowArg();
    args.h_dtype = h_dtype;
    args.dx = RowArg(dx);
    args.dresidual = dresidual_dtype.has_value() ? RowArg(dresidual) : RowArg();
    args.mean = rms_norm ? nullptr : mean.const_data_ptr();
    args.rstd = rstd.const_data_ptr();
    args.n = shape.cols;
    args.rms_norm = rms_norm;
    auto ptr = [](const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; };
    if (acc == ScalarType::Double) {
      run_bwd<double>(args, weight, static_cast<double*>(ptr(dw_partials)),
                      static_cast<double*>(ptr(db_partials)), shape.rows, chunks);
    } else {
      run_bwd<float>(args, weight, static_cast<float*>(ptr(dw_partials)),
                     static_cast<float*>(ptr(db_partials)), shape.rows, chunks);
    }
  }
  Tensor dweight = dw_partials ? reduce_partials(*dw_partials, weight) : reduce_partials(dx, std::nullopt);
  Tensor dbias = db_partials ? reduce_partials(*db_partials, bias) : reduce_partials(dx, std::nullopt);
  return {dx, dresidual, dweight, dbias};
}

} // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("add_norm_fwd", TORCH_BOX(&add_norm_fwd_cpu));
  m.impl("add_norm_bwd", TORCH_BOX(&add_norm_bwd_cpu));
}

} // namespace fusedres::cpu
