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
        stride(row_stride(t) * static_cast<int64_t>(t.element_size())),
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
  parallel_for(0, m, grain_rows(n), [&](int64_t begin, int64_t end) {
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
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
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

// Until the CPU kernels implement them (issue 23): the residual features are refused here.
void refuse_features(const AddNormParams& p, bool store_mask) {
  STD_TORCH_CHECK(!p.features.any() && !store_mask,
      "fusedres: dropout_p, rowscale, colscale, weight_offset and the dropout mask are not implemented by the CPU "
      "backend yet");
}

AddNormFwdResult<Tensor> add_norm_fwd_cpu(const AddNormFwd& a) {
  const AddNormParams p = check_add_norm(a);
  refuse_features(p, a.store_mask);
  auto out = alloc_add_norm_outputs(a, p.shape);
  auto& [y, h, mean, rstd, mask] = out;
  advise_huge_pages(y);
  advise_huge_pages(h);
  if (p.shape.rows == 0) {
    return out;
  }
  AddNormFwdRows args{};
  args.x = RowArg(a.x);
  args.residual = a.residual ? RowArg(*a.residual) : RowArg();
  args.h = a.store_h ? RowArg(h) : RowArg();
  args.y = RowArg(y);
  args.h_dtype = a.h_dtype;
  args.mean = a.rms_norm ? nullptr : mean.data_ptr();
  args.rstd = rstd.data_ptr();
  args.n = p.shape.cols;
  args.eps = a.eps;
  args.rms_norm = a.rms_norm;
  if (rstd.scalar_type() == ScalarType::Double) {
    run_fwd<double>(args, a.weight, a.bias, p.shape.rows);
  } else {
    run_fwd<float>(args, a.weight, a.bias, p.shape.rows);
  }
  return out;
}

// Sums the (chunks, n) partials in chunk order into a parameter grad of any float dtype.
template <typename acc_t>
void store_column_sums(const std::vector<acc_t>& partials, int64_t chunks, int64_t n, Tensor& out) {
  std::vector<acc_t> total(n, acc_t(0));
  for (int64_t c = 0; c < chunks; ++c) {
    const acc_t* row = partials.data() + c * n;
    for (int64_t i = 0; i < n; ++i) {
      total[i] += row[i];
    }
  }
  store_acc_vector(total.data(), n, out);
}

template <typename acc_t>
void run_bwd_and_reduce(const AddNormBwdRows& args, const std::optional<Tensor>& weight, Tensor* dweight,
                        Tensor* dbias, int64_t m, int64_t n) {
  const int64_t chunks = num_chunks(m, n);
  // Zero-initialized so that M == 0 still yields zero grads.
  std::vector<acc_t> dw_partials(dweight ? chunks * n : 0, acc_t(0));
  std::vector<acc_t> db_partials(dbias ? chunks * n : 0, acc_t(0));
  if (m > 0) {
    run_bwd<acc_t>(args, weight, dweight ? dw_partials.data() : nullptr, dbias ? db_partials.data() : nullptr, m,
                   chunks);
  }
  if (dweight) {
    store_column_sums(dw_partials, chunks, n, *dweight);
  }
  if (dbias) {
    store_column_sums(db_partials, chunks, n, *dbias);
  }
}

AddNormBwdResult<Tensor> add_norm_bwd_cpu(const AddNormBwd& a) {
  const AddNormParams p = check_add_norm(a);
  refuse_features(p, false);
  auto out = alloc_add_norm_outputs(a);
  auto& [dx, dresidual, dweight, dbias, dcolscale] = out;
  advise_huge_pages(dx);
  advise_huge_pages(dresidual);
  AddNormBwdRows args{};
  args.dy = RowArg(a.dy);
  args.dh = a.dh ? RowArg(*a.dh) : RowArg();
  // The normalized h: read as stored, or x (+ residual, added back per row as the forward did).
  args.h = a.h ? RowArg(*a.h) : RowArg(*a.x);
  args.residual = !a.h && a.residual ? RowArg(*a.residual) : RowArg();
  args.h_dtype = a.h_dtype;
  args.dx = RowArg(dx);
  args.dresidual = a.dresidual_dtype ? RowArg(dresidual) : RowArg();
  args.mean = a.rms_norm ? nullptr : a.mean->const_data_ptr();
  args.rstd = a.rstd.const_data_ptr();
  args.n = p.shape.cols;
  args.rms_norm = a.rms_norm;
  Tensor* dw = a.weight ? &dweight : nullptr;
  Tensor* db = a.bias ? &dbias : nullptr;
  if (a.rstd.scalar_type() == ScalarType::Double) {
    run_bwd_and_reduce<double>(args, a.weight, dw, db, p.shape.rows, p.shape.cols);
  } else {
    run_bwd_and_reduce<float>(args, a.weight, dw, db, p.shape.rows, p.shape.cols);
  }
  return out;
}

} // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("add_norm_fwd", TORCH_BOX((&add_norm_fwd_entry<Tensor, &add_norm_fwd_cpu>)));
  m.impl("add_norm_bwd", TORCH_BOX((&add_norm_bwd_entry<Tensor, &add_norm_bwd_cpu>)));
}

} // namespace fusedres::cpu
