// Add & Norm on the CPU: torch's thread pool over rows, vectorized row kernels
// (add_norm_kernel.h) compiled for the baseline ISA and for AVX2+FMA, chosen at run time.
#include "add_norm.h"
#include "cpu/float_rows.h"
#include "cpu/huge_pages.h"
#include "philox.h"

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

// The residual features as the row kernels apply them to x's branch: dropout by the Philox
// layout of csrc/philox.h (bits drawn per row into a scratch buffer), rowscale read per row.
// colscale and weight_offset reach the kernels as accumulator vectors (see run_fwd).
struct RowFeatures {
  bool dropout = false;
  philox::Key key{};
  uint64_t offset = 0;
  uint32_t threshold = 0;
  double scale = 1.0;
  const void* rowscale = nullptr;
  ScalarType rowscale_dtype = ScalarType::Float;
  bool colscale = false;

  RowFeatures() = default;
  explicit RowFeatures(const AddNormFeatures& f)
      : dropout(f.dropout_p > 0.0),
        threshold(philox::threshold(f.dropout_p)),
        scale(philox::scale(f.dropout_p)),
        rowscale(f.rowscale),
        colscale(f.colscale != nullptr) {
    if (dropout) {  // the layout reads seed and offset as uint64
      key = philox::key_of(static_cast<uint64_t>(f.seed_offset[0]));
      offset = static_cast<uint64_t>(f.seed_offset[1]);
    }
    if (rowscale) {
      rowscale_dtype = f.rowscale_dtype == kF64    ? ScalarType::Double
                       : f.rowscale_dtype == kF16  ? ScalarType::Half
                       : f.rowscale_dtype == kBF16 ? ScalarType::BFloat16
                                                   : ScalarType::Float;
    }
  }
  // x's branch is transformed (else h = x + residual, the plain kernels' case).
  bool transforms_x() const { return dropout || rowscale != nullptr || colscale; }
};

struct AddNormFwdRows {
  RowArg x, residual, h, y;
  ScalarType h_dtype;
  void* mean;  // null for RMSNorm and in place
  void* rstd;  // null in place
  int64_t n;
  double eps;
  bool rms_norm;
  RowFeatures features;
  bool* mask;  // (M, N) contiguous keep-mask, or null
};

struct AddNormBwdRows {
  RowArg dy, dh, h, residual, dx, dresidual;  // residual: h is x, recompute x + residual
  ScalarType h_dtype;
  const void* mean;
  const void* rstd;
  int64_t n;
  bool rms_norm;
  RowFeatures features;
  RowArg x;          // the forward's x: for dcolscale, or h's recomputation when h is not stored
  bool recompute_h;  // h is not stored: form it from x (transformed) + residual
};

}  // namespace fusedres::cpu

#define FUSEDRES_CPU_KERNELS "cpu/add_norm_kernel.h"
#include "cpu/isa_dispatch.h"

namespace fusedres::cpu {
namespace {

// Rows per parallel task: enough elements that the pool's per-task overhead is noise.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// The backward splits rows into a fixed number of chunks that depends only on (M, N), never on
// the thread count, and sums the per-chunk dweight/dbias partials in a fixed order afterwards:
// the grads are bitwise reproducible on any machine with the same ISA.
int64_t num_chunks(int64_t m, int64_t n) {
  const int64_t by_work = (m * n + 32767) / 32768;
  return std::max<int64_t>(1, std::min<int64_t>({m, by_work, 128}));
}

// weight + weight_offset as accumulators (the offset added in the accumulation dtype, as HF's
// GemmaRMSNorm adds 1 in fp32): the row kernels see one weight.
template <typename acc_t>
std::vector<acc_t> weight_vector(const std::optional<Tensor>& weight, int64_t n, double weight_offset) {
  auto w = to_acc_vector<acc_t>(weight, n, acc_t(1));
  if (weight_offset != 0.0) {
    const acc_t offset = static_cast<acc_t>(weight_offset);
    for (acc_t& v : w) {
      v += offset;
    }
  }
  return w;
}

template <typename acc_t>
void run_fwd(const AddNormFwdRows& args, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& colscale, double weight_offset, int64_t m) {
  const int64_t n = args.n;
  const auto w = weight_vector<acc_t>(weight, n, weight_offset);
  const auto b = to_acc_vector<acc_t>(bias, n, acc_t(0));
  const auto cs = to_acc_vector<acc_t>(colscale, colscale ? n : 0, acc_t(1));
  // The plain kernels write every statistic and read x + residual: anything else (features, the
  // mask, in place) takes the features kernel.
  const bool plain = !args.features.transforms_x() && !args.mask && args.rstd;
  parallel_for(0, m, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(n);
    if (plain) {
      FUSEDRES_ISA_CALL(add_norm_fwd_rows<acc_t>(args, w.data(), b.data(), buf.data(), begin, end));
      return;
    }
    std::vector<uint32_t> bits(args.features.dropout ? n : 0);
    FUSEDRES_ISA_CALL(add_norm_fwd_rows_features<acc_t>(
        args, w.data(), b.data(), colscale ? cs.data() : nullptr, buf.data(), bits.data(), begin, end));
  });
}

// dweight, dbias and dcolscale partials: (chunks, n) each, or null when not wanted.
template <typename acc_t>
struct Partials {
  acc_t* dw;
  acc_t* db;
  acc_t* dcs;
};

template <typename acc_t>
void run_bwd(const AddNormBwdRows& args, const std::optional<Tensor>& weight, const std::optional<Tensor>& colscale,
    double weight_offset, Partials<acc_t> partials, int64_t m, int64_t chunks) {
  const int64_t n = args.n;
  const auto w = weight_vector<acc_t>(weight, n, weight_offset);
  const auto cs = to_acc_vector<acc_t>(colscale, colscale ? n : 0, acc_t(1));
  const bool plain = !args.features.transforms_x();
  const int64_t rows_per_chunk = (m + chunks - 1) / chunks;
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread rows: xhat, g, h converted, and scratch partials for an absent weight/bias
    // (accumulating into L1-resident scratch is cheaper than a second loop variant).
    std::vector<acc_t> scratch(5 * n);
    acc_t* xhat = scratch.data();
    acc_t* g = xhat + n;
    acc_t* hbuf = g + n;
    std::vector<uint32_t> bits(args.features.dropout ? n : 0);
    for (int64_t c = begin; c < end; ++c) {
      acc_t* dw = partials.dw ? partials.dw + c * n : hbuf + n;
      acc_t* db = partials.db ? partials.db + c * n : hbuf + 2 * n;
      const int64_t r0 = c * rows_per_chunk;
      const int64_t r1 = std::min(m, r0 + rows_per_chunk);
      if (plain) {
        FUSEDRES_ISA_CALL(add_norm_bwd_rows<acc_t>(args, w.data(), dw, db, xhat, g, hbuf, r0, r1));
      } else {
        acc_t* dcs = partials.dcs ? partials.dcs + c * n : nullptr;
        FUSEDRES_ISA_CALL(add_norm_bwd_rows_features<acc_t>(
            args, w.data(), colscale ? cs.data() : nullptr, dw, db, dcs, xhat, g, hbuf, bits.data(), r0, r1));
      }
    }
  });
}

AddNormFwdRows fwd_rows(const AddNormFwd& a, const AddNormParams& p) {
  AddNormFwdRows args{};
  args.x = RowArg(a.x);
  args.residual = a.residual ? RowArg(*a.residual) : RowArg();
  args.h_dtype = a.h_dtype;
  args.n = p.shape.cols;
  args.eps = a.eps;
  args.rms_norm = a.rms_norm;
  args.features = RowFeatures(p.features);
  return args;
}

AddNormFwdResult<Tensor> add_norm_fwd_cpu(const AddNormFwd& a) {
  const AddNormParams p = check_add_norm(a);
  auto out = alloc_add_norm_outputs(a, p.shape);
  auto& [y, h, mean, rstd, mask] = out;
  advise_huge_pages(y);
  advise_huge_pages(h);
  if (p.shape.rows == 0) {
    return out;
  }
  AddNormFwdRows args = fwd_rows(a, p);
  args.h = a.store_h ? RowArg(h) : RowArg();
  args.y = RowArg(y);
  args.mean = a.rms_norm ? nullptr : mean.data_ptr();
  args.rstd = rstd.data_ptr();
  args.mask = a.store_mask ? static_cast<bool*>(mask.data_ptr()) : nullptr;
  if (rstd.scalar_type() == ScalarType::Double) {
    run_fwd<double>(args, a.weight, a.bias, a.colscale, a.weight_offset, p.shape.rows);
  } else {
    run_fwd<float>(args, a.weight, a.bias, a.colscale, a.weight_offset, p.shape.rows);
  }
  return out;
}

// In place, for inference: h into residual, y into x (the features kernel reads each row whole
// before writing it); no statistics.
void add_norm_inplace_cpu(const AddNormInplaceArgs<Tensor>& a) {
  const RowsView shape = check_add_norm_inplace(a);
  if (shape.rows == 0) {
    return;
  }
  AddNormFwdRows args{};
  args.x = RowArg(a.x);
  args.residual = RowArg(a.residual);
  args.h = RowArg(a.residual);
  args.y = RowArg(a.x);
  args.h_dtype = a.residual.scalar_type();
  args.n = shape.cols;
  args.eps = a.eps;
  args.rms_norm = a.rms_norm;
  args.features.colscale = a.colscale.has_value();
  if (stats_dtype(a.x.scalar_type()) == ScalarType::Double) {
    run_fwd<double>(args, a.weight, a.bias, a.colscale, a.weight_offset, shape.rows);
  } else {
    run_fwd<float>(args, a.weight, a.bias, a.colscale, a.weight_offset, shape.rows);
  }
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
void run_bwd_and_reduce(const AddNormBwd& a, const AddNormBwdRows& args, Tensor* dweight, Tensor* dbias,
    Tensor* dcolscale, int64_t m, int64_t n) {
  const int64_t chunks = num_chunks(m, n);
  // Zero-initialized so that M == 0 still yields zero grads.
  std::vector<acc_t> dw_partials(dweight ? chunks * n : 0, acc_t(0));
  std::vector<acc_t> db_partials(dbias ? chunks * n : 0, acc_t(0));
  std::vector<acc_t> dcs_partials(dcolscale ? chunks * n : 0, acc_t(0));
  if (m > 0) {
    const Partials<acc_t> partials{dweight ? dw_partials.data() : nullptr, dbias ? db_partials.data() : nullptr,
        dcolscale ? dcs_partials.data() : nullptr};
    run_bwd<acc_t>(args, a.weight, a.colscale, a.weight_offset, partials, m, chunks);
  }
  if (dweight) {
    store_column_sums(dw_partials, chunks, n, *dweight);
  }
  if (dbias) {
    store_column_sums(db_partials, chunks, n, *dbias);
  }
  if (dcolscale) {
    store_column_sums(dcs_partials, chunks, n, *dcolscale);
  }
}

AddNormBwdResult<Tensor> add_norm_bwd_cpu(const AddNormBwd& a) {
  const AddNormParams p = check_add_norm(a);
  auto out = alloc_add_norm_outputs(a);
  auto& [dx, dresidual, dweight, dbias, dcolscale] = out;
  advise_huge_pages(dx);
  advise_huge_pages(dresidual);
  AddNormBwdRows args{};
  args.features = RowFeatures(p.features);
  args.dy = RowArg(a.dy);
  args.dh = a.dh ? RowArg(*a.dh) : RowArg();
  // The normalized h: read as stored, or formed from x (+ residual) per row as the forward did.
  args.h = a.h ? RowArg(*a.h) : RowArg(*a.x);
  args.residual = !a.h && a.residual ? RowArg(*a.residual) : RowArg();
  args.x = a.x ? RowArg(*a.x) : RowArg();
  args.recompute_h = !a.h;
  args.h_dtype = a.h_dtype;
  args.dx = RowArg(dx);
  args.dresidual = a.dresidual_dtype ? RowArg(dresidual) : RowArg();
  args.mean = a.rms_norm ? nullptr : a.mean->const_data_ptr();
  args.rstd = a.rstd.const_data_ptr();
  args.n = p.shape.cols;
  args.rms_norm = a.rms_norm;
  Tensor* dw = a.weight ? &dweight : nullptr;
  Tensor* db = a.bias ? &dbias : nullptr;
  Tensor* dcs = a.colscale_grad ? &dcolscale : nullptr;
  if (a.rstd.scalar_type() == ScalarType::Double) {
    run_bwd_and_reduce<double>(a, args, dw, db, dcs, p.shape.rows, p.shape.cols);
  } else {
    run_bwd_and_reduce<float>(a, args, dw, db, dcs, p.shape.rows, p.shape.cols);
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("add_norm_fwd", TORCH_BOX((&add_norm_fwd_entry<Tensor, &add_norm_fwd_cpu>)));
  m.impl("add_norm_bwd", TORCH_BOX((&add_norm_bwd_entry<Tensor, &add_norm_bwd_cpu>)));
  m.impl("add_norm_inplace", TORCH_BOX((&add_norm_inplace_entry<Tensor, &add_norm_inplace_cpu>)));
}

}  // namespace fusedres::cpu
