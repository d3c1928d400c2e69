// Add & Norm CPU row kernels. No include guard on purpose: add_norm.cpp compiles this file once
// per instruction set (baseline and AVX2+FMA) into namespace FUSEDRES_CPU_ISA and picks one at
// run time, so one wheel is fast on new CPUs and still loads on old ones.
//
// Each row goes through a per-thread buffer of N accumulators that stays in L1/L2: memory sees
// one read of x (and residual) and one write of y (and h) in the forward, one read of dy, h
// (and dh) and one write of dx (and dresidual) in the backward; the statistics are computed
// two-pass over the buffer (exact mean first, then sum((h - mean)^2)), which is as stable as
// Welford and vectorizes better.

namespace fusedres::cpu::FUSEDRES_CPU_ISA {

template <typename acc_t>
inline void load_row(const void* src, ScalarType dtype, int64_t n, acc_t* __restrict dst) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* __restrict s = static_cast<const T*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<acc_t>(s[i]);
    }
  });
}

template <typename acc_t>
inline void add_row(const void* src, ScalarType dtype, int64_t n, acc_t* __restrict dst) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* __restrict s = static_cast<const T*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      dst[i] += static_cast<acc_t>(s[i]);
    }
  });
}

template <typename acc_t>
inline void store_row(const acc_t* __restrict src, int64_t n, ScalarType dtype, void* dst) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* __restrict d = static_cast<T*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      d[i] = static_cast<T>(src[i]);
    }
  });
}

// Rounds the buffer through `dtype`, so the statistics see exactly the h a tensor of that dtype
// holds: eager computes norm((x + r).to(h_dtype)).
template <typename acc_t>
inline void round_row(acc_t* __restrict buf, int64_t n, ScalarType dtype) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) < sizeof(acc_t)) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = static_cast<acc_t>(static_cast<T>(buf[i]));
      }
    }
  });
}

template <typename acc_t>
inline acc_t row_sum(const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += b[i];
  }
  return s;
}

template <typename acc_t>
inline acc_t row_sum_sq_dev(const acc_t* __restrict b, acc_t center, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = b[i] - center;
    s += d * d;
  }
  return s;
}

template <typename acc_t>
inline acc_t row_dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// Forward over rows [begin, end). w/b are N accumulators (ones/zeros when absent: one fused
// multiply-add per element is free next to the memory traffic, and keeps a single loop).
template <typename acc_t>
void add_norm_fwd_rows(const AddNormFwdRows& a, const acc_t* __restrict w, const acc_t* __restrict b,
                       acc_t* __restrict buf, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t eps = static_cast<acc_t>(a.eps);
  acc_t* mean_out = static_cast<acc_t*>(a.mean);
  acc_t* rstd_out = static_cast<acc_t*>(a.rstd);
  for (int64_t r = begin; r < end; ++r) {
    load_row(a.x.row(r), a.x.dtype, n, buf);
    if (a.residual) {
      add_row(a.residual.row(r), a.residual.dtype, n, buf);
    }
    round_row(buf, n, a.h_dtype);
    if (a.h) {
      store_row(buf, n, a.h.dtype, a.h.row(r));
    }
    const acc_t mean = a.rms_norm ? acc_t(0) : row_sum(buf, n) * inv_n;
    const acc_t var = row_sum_sq_dev(buf, mean, n) * inv_n;
    const acc_t rstd = acc_t(1) / std::sqrt(var + eps);
    if (!a.rms_norm) {
      mean_out[r] = mean;
    }
    rstd_out[r] = rstd;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = (buf[i] - mean) * rstd * w[i] + b[i];
    }
    store_row(buf, n, a.y.dtype, a.y.row(r));
  }
}

// Backward over rows [begin, end), adding this range's dweight/dbias into dw/db (nullable).
// With xhat = (h - mean) * rstd (RMSNorm: h * rstd) and g = dy * w:
//   LayerNorm: dh = rstd * (g - xhat * mean(g * xhat) - mean(g))
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
// plus the incoming grad of h itself (prenorm); dweight = sum_rows dy * xhat, dbias = sum_rows dy.
template <typename acc_t>
void add_norm_bwd_rows(const AddNormBwdRows& a, const acc_t* __restrict w, acc_t* __restrict dw,
                       acc_t* __restrict db, acc_t* __restrict xhat, acc_t* __restrict g,
                       int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t* mean_in = static_cast<const acc_t*>(a.mean);
  const acc_t* rstd_in = static_cast<const acc_t*>(a.rstd);
  for (int64_t r = begin; r < end; ++r) {
    const acc_t mean = a.rms_norm ? acc_t(0) : mean_in[r];
    const acc_t rstd = rstd_in[r];
    load_row(a.h.row(r), a.h.dtype, n, xhat);
    load_row(a.dy.row(r), a.dy.dtype, n, g);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      xhat[i] = (xhat[i] - mean) * rstd;
    }
    if (dw != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        dw[i] += g[i] * xhat[i];
      }
    }
    if (db != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        db[i] += g[i];
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[i] *= w[i];
    }
    const acc_t c1 = row_dot(xhat, g, n) * inv_n;
    const acc_t c2 = a.rms_norm ? acc_t(0) : row_sum(g, n) * inv_n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[i] = (g[i] - xhat[i] * c1 - c2) * rstd;
    }
    if (a.dh) {
      add_row(a.dh.row(r), a.dh.dtype, n, g);
    }
    store_row(g, n, a.dx.dtype, a.dx.row(r));
    if (a.dresidual) {
      store_row(g, n, a.dresidual.dtype, a.dresidual.row(r));
    }
  }
}

template void add_norm_fwd_rows<float>(const AddNormFwdRows&, const float*, const float*, float*, int64_t, int64_t);
template void add_norm_fwd_rows<double>(const AddNormFwdRows&, const double*, const double*, double*, int64_t, int64_t);
template void add_norm_bwd_rows<float>(const AddNormBwdRows&, const float*, float*, float*, float*, float*, int64_t, int64_t);
template void add_norm_bwd_rows<double>(const AddNormBwdRows&, const double*, double*, double*, double*, double*, int64_t, int64_t);

} // namespace fusedres::cpu::FUSEDRES_CPU_ISA
