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

// Forward over rows [begin, end) when x, residual, h and y share one dtype T (the common case):
// the conversions are fused into three loops, two of which touch memory.
template <typename T, typename acc_t>
void add_norm_fwd_rows_typed(const AddNormFwdRows& a, const acc_t* __restrict w, const acc_t* __restrict b,
                             acc_t* __restrict buf, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t eps = static_cast<acc_t>(a.eps);
  for (int64_t r = begin; r < end; ++r) {
    const T* __restrict x = reinterpret_cast<const T*>(a.x.row(r));
    acc_t sum = 0;
    if (a.residual) {
      const T* __restrict res = reinterpret_cast<const T*>(a.residual.row(r));
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) {
        // Rounded through T: the statistics see exactly the h that is stored.
        const acc_t v = static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(x[i]) + static_cast<acc_t>(res[i])));
        buf[i] = v;
        sum += v;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) {
        const acc_t v = static_cast<acc_t>(x[i]);
        buf[i] = v;
        sum += v;
      }
    }
    if (a.h) {
      T* __restrict h = reinterpret_cast<T*>(a.h.row(r));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        h[i] = static_cast<T>(buf[i]);
      }
    }
    const acc_t mean = a.rms_norm ? acc_t(0) : sum * inv_n;
    const acc_t rstd = acc_t(1) / std::sqrt(row_sum_sq_dev(buf, mean, n) * inv_n + eps);
    if (!a.rms_norm) {
      static_cast<acc_t*>(a.mean)[r] = mean;
    }
    static_cast<acc_t*>(a.rstd)[r] = rstd;
    T* __restrict y = reinterpret_cast<T*>(a.y.row(r));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<T>((buf[i] - mean) * rstd * w[i] + b[i]);
    }
  }
}

// Forward for any mix of dtypes: rows are converted through the buffer one operand at a time.
// w/b are N accumulators (ones/zeros when absent: one multiply-add per element is free next to
// the memory traffic, and keeps a single loop).
template <typename acc_t>
void add_norm_fwd_rows_mixed(const AddNormFwdRows& a, const acc_t* __restrict w, const acc_t* __restrict b,
                             acc_t* __restrict buf, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t eps = static_cast<acc_t>(a.eps);
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
    const acc_t rstd = acc_t(1) / std::sqrt(row_sum_sq_dev(buf, mean, n) * inv_n + eps);
    if (!a.rms_norm) {
      static_cast<acc_t*>(a.mean)[r] = mean;
    }
    static_cast<acc_t*>(a.rstd)[r] = rstd;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = (buf[i] - mean) * rstd * w[i] + b[i];
    }
    store_row(buf, n, a.y.dtype, a.y.row(r));
  }
}

template <typename acc_t>
void add_norm_fwd_rows(const AddNormFwdRows& a, const acc_t* w, const acc_t* b, acc_t* buf, int64_t begin,
                       int64_t end) {
  const ScalarType t = a.x.dtype;
  const bool same = a.h_dtype == t && (!a.residual || a.residual.dtype == t) && (!a.h || a.h.dtype == t);
  if (!same) {
    return add_norm_fwd_rows_mixed(a, w, b, buf, begin, end);
  }
  visit_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) <= sizeof(acc_t)) {
      add_norm_fwd_rows_typed<T>(a, w, b, buf, begin, end);
    } else {
      add_norm_fwd_rows_mixed(a, w, b, buf, begin, end);
    }
  });
}

// Backward over rows [begin, end), adding this range's dweight/dbias into dw/db (per-chunk
// partial rows). With xhat = (h - mean) * rstd (RMSNorm: h * rstd) and g = dy * w:
//   LayerNorm: dh = rstd * (g - xhat * mean(g * xhat) - mean(g))
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
// plus the incoming grad of h itself (prenorm); dweight = sum_rows dy * xhat, dbias = sum_rows dy.
// A first loop reads h and dy, a second writes dx; an h of another dtype than dy is converted
// through a buffer first.
template <typename T, typename acc_t>
void add_norm_bwd_rows_typed(const AddNormBwdRows& a, const acc_t* __restrict w, acc_t* __restrict dw,
                             acc_t* __restrict db, acc_t* __restrict xhat, acc_t* __restrict g,
                             acc_t* __restrict hbuf, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  // h is read as is when it has dy's dtype; otherwise (another dtype, or x to which the residual
  // is added back) it is first formed in a buffer, exactly as the forward formed it.
  const bool h_typed = a.h.dtype == a.dy.dtype && !a.residual;
  const bool h_recomputed_typed =
      a.residual && a.h.dtype == a.dy.dtype && a.residual.dtype == a.dy.dtype && a.h_dtype == a.dy.dtype;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t mean = a.rms_norm ? acc_t(0) : static_cast<const acc_t*>(a.mean)[r];
    const acc_t rstd = static_cast<const acc_t*>(a.rstd)[r];
    const T* __restrict dy = reinterpret_cast<const T*>(a.dy.row(r));
    acc_t sum_gx = 0, sum_g = 0;
    // One loop reads h (however it is formed) and dy, producing xhat, g, the two row sums and
    // the dweight/dbias terms.
    auto first_pass = [&](auto h_at) {
#pragma omp simd reduction(+ : sum_gx, sum_g)
      for (int64_t i = 0; i < n; ++i) {
        const acc_t xh = (h_at(i) - mean) * rstd;
        const acc_t d = static_cast<acc_t>(dy[i]);
        const acc_t gw = d * w[i];
        dw[i] += d * xh;
        db[i] += d;
        xhat[i] = xh;
        g[i] = gw;
        sum_gx += gw * xh;
        sum_g += gw;
      }
    };
    if (h_typed) {
      const T* __restrict h = reinterpret_cast<const T*>(a.h.row(r));
      first_pass([h](int64_t i) { return static_cast<acc_t>(h[i]); });
    } else if (h_recomputed_typed) {
      const T* __restrict x = reinterpret_cast<const T*>(a.h.row(r));
      const T* __restrict res = reinterpret_cast<const T*>(a.residual.row(r));
      first_pass([x, res](int64_t i) {
        return static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(x[i]) + static_cast<acc_t>(res[i])));
      });
    } else {
      load_row(a.h.row(r), a.h.dtype, n, hbuf);
      if (a.residual) {
        add_row(a.residual.row(r), a.residual.dtype, n, hbuf);
        round_row(hbuf, n, a.h_dtype);
      }
      first_pass([hbuf](int64_t i) { return hbuf[i]; });
    }
    const acc_t c1 = sum_gx * inv_n;
    const acc_t c2 = a.rms_norm ? acc_t(0) : sum_g * inv_n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[i] = (g[i] - xhat[i] * c1 - c2) * rstd;
    }
    if (a.dh) {
      add_row(a.dh.row(r), a.dh.dtype, n, g);
    }
    T* __restrict dx = reinterpret_cast<T*>(a.dx.row(r));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      dx[i] = static_cast<T>(g[i]);
    }
    if (a.dresidual) {
      store_row(g, n, a.dresidual.dtype, a.dresidual.row(r));
    }
  }
}

template <typename acc_t>
void add_norm_bwd_rows(const AddNormBwdRows& a, const acc_t* w, acc_t* dw, acc_t* db, acc_t* xhat, acc_t* g,
                       acc_t* hbuf, int64_t begin, int64_t end) {
  visit_float(a.dy.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) <= sizeof(acc_t)) {
      add_norm_bwd_rows_typed<T>(a, w, dw, db, xhat, g, hbuf, begin, end);
    } else {
      STD_TORCH_CHECK(false, "fusedres: float64 grads need float64 statistics");
    }
  });
}

// --- the residual features (fusedres/spec/add_norm.py) -------------------------------------------
// Calls with dropout, rowscale or colscale, with the mask written, or in place take these row
// kernels: they work through the row buffers of the mixed-dtype path (the conversions are
// load_row/store_row), and draw a row's Philox bits once into `bits` (N uint32 of scratch).

// bits[i] = the Philox bits of element (r, i) (csrc/philox.h's layout), when dropout is on.
inline void draw_row_bits(const RowFeatures& f, int64_t r, int64_t n, uint32_t* __restrict bits) {
  if (f.dropout) {
    philox::fill_bits(f.key, f.offset, r * n, n, bits);
  }
}

// buf[i] *= (keep ? scale : 0) * rowscale[r] (* cs[i] when cs is given), in that order: x's
// branch in the forward, and dx from dL/dh in the backward (the chain rule multiplies the same
// factors). A dropped NaN stays NaN (times 0), as F.dropout's x * mask does.
template <typename acc_t>
inline void scale_branch(const RowFeatures& f, int64_t r, int64_t n, const acc_t* __restrict cs,
                         const uint32_t* __restrict bits, acc_t* __restrict buf) {
  if (f.dropout) {
    const acc_t scale = static_cast<acc_t>(f.scale);
    const uint32_t thr = f.threshold;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      buf[i] *= bits[i] >= thr ? scale : acc_t(0);
    }
  }
  if (f.rowscale) {
    acc_t rs = 1;
    visit_float(f.rowscale_dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      rs = static_cast<acc_t>(static_cast<const T*>(f.rowscale)[r]);
    });
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      buf[i] *= rs;
    }
  }
  if (cs) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      buf[i] *= cs[i];
    }
  }
}

// Forward with features: h = residual + branch(x), rounded to h_dtype; y = norm(h) * w + b (w
// already holds weight + weight_offset). In place (y is x, h is residual) each row is read whole
// before it is written. Statistics are written where their pointers are given.
template <typename acc_t>
void add_norm_fwd_rows_features(const AddNormFwdRows& a, const acc_t* __restrict w, const acc_t* __restrict b,
                                const acc_t* __restrict cs, acc_t* __restrict buf, uint32_t* __restrict bits,
                                int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t eps = static_cast<acc_t>(a.eps);
  const RowFeatures& f = a.features;
  for (int64_t r = begin; r < end; ++r) {
    draw_row_bits(f, r, n, bits);
    load_row(a.x.row(r), a.x.dtype, n, buf);
    scale_branch(f, r, n, cs, bits, buf);
    if (a.residual) {
      add_row(a.residual.row(r), a.residual.dtype, n, buf);
    }
    round_row(buf, n, a.h_dtype);
    if (a.h) {
      store_row(buf, n, a.h.dtype, a.h.row(r));
    }
    const acc_t mean = a.rms_norm ? acc_t(0) : row_sum(buf, n) * inv_n;
    const acc_t rstd = acc_t(1) / std::sqrt(row_sum_sq_dev(buf, mean, n) * inv_n + eps);
    if (a.mean) {
      static_cast<acc_t*>(a.mean)[r] = mean;
    }
    if (a.rstd) {
      static_cast<acc_t*>(a.rstd)[r] = rstd;
    }
    if (a.mask) {
      bool* __restrict keep = a.mask + r * n;
      const uint32_t thr = f.threshold;
      const bool dropout = f.dropout;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        keep[i] = !dropout || bits[i] >= thr;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = (buf[i] - mean) * rstd * w[i] + b[i];
    }
    store_row(buf, n, a.y.dtype, a.y.row(r));
  }
}

// Backward with features: the norm's backward as add_norm_bwd_rows_typed, then dresidual = dL/dh,
// dcolscale += dL/dh * branch(x) without colscale, and dx = dL/dh scaled as the branch was.
template <typename acc_t>
void add_norm_bwd_rows_features(const AddNormBwdRows& a, const acc_t* __restrict w, const acc_t* __restrict cs,
                                acc_t* __restrict dw, acc_t* __restrict db, acc_t* __restrict dcs,
                                acc_t* __restrict xhat, acc_t* __restrict g, acc_t* __restrict hbuf,
                                uint32_t* __restrict bits, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const RowFeatures& f = a.features;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t mean = a.rms_norm ? acc_t(0) : static_cast<const acc_t*>(a.mean)[r];
    const acc_t rstd = static_cast<const acc_t*>(a.rstd)[r];
    draw_row_bits(f, r, n, bits);
    if (a.recompute_h) {  // exactly as the forward formed it
      load_row(a.x.row(r), a.x.dtype, n, hbuf);
      scale_branch(f, r, n, cs, bits, hbuf);
      if (a.residual) {
        add_row(a.residual.row(r), a.residual.dtype, n, hbuf);
      }
      round_row(hbuf, n, a.h_dtype);
    } else {
      load_row(a.h.row(r), a.h.dtype, n, hbuf);
    }
    load_row(a.dy.row(r), a.dy.dtype, n, g);
    acc_t sum_gx = 0, sum_g = 0;
#pragma omp simd reduction(+ : sum_gx, sum_g)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xh = (hbuf[i] - mean) * rstd;
      const acc_t d = g[i];
      const acc_t gw = d * w[i];
      dw[i] += d * xh;
      db[i] += d;
      xhat[i] = xh;
      g[i] = gw;
      sum_gx += gw * xh;
      sum_g += gw;
    }
    const acc_t c1 = sum_gx * inv_n;
    const acc_t c2 = a.rms_norm ? acc_t(0) : sum_g * inv_n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[i] = (g[i] - xhat[i] * c1 - c2) * rstd;
    }
    if (a.dh) {
      add_row(a.dh.row(r), a.dh.dtype, n, g);
    }
    if (a.dresidual) {
      store_row(g, n, a.dresidual.dtype, a.dresidual.row(r));
    }
    if (dcs) {
      load_row(a.x.row(r), a.x.dtype, n, hbuf);
      scale_branch(f, r, n, static_cast<const acc_t*>(nullptr), bits, hbuf);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        dcs[i] += g[i] * hbuf[i];
      }
    }
    scale_branch(f, r, n, cs, bits, g);
    store_row(g, n, a.dx.dtype, a.dx.row(r));
  }
}

template void add_norm_fwd_rows<float>(const AddNormFwdRows&, const float*, const float*, float*, int64_t, int64_t);
template void add_norm_fwd_rows<double>(const AddNormFwdRows&, const double*, const double*, double*, int64_t, int64_t);
template void add_norm_bwd_rows<float>(const AddNormBwdRows&, const float*, float*, float*, float*, float*, float*,
                                       int64_t, int64_t);
template void add_norm_bwd_rows<double>(const AddNormBwdRows&, const double*, double*, double*, double*, double*,
                                        double*, int64_t, int64_t);
template void add_norm_fwd_rows_features<float>(const AddNormFwdRows&, const float*, const float*, const float*,
                                                float*, uint32_t*, int64_t, int64_t);
template void add_norm_fwd_rows_features<double>(const AddNormFwdRows&, const double*, const double*, const double*,
                                                 double*, uint32_t*, int64_t, int64_t);
template void add_norm_bwd_rows_features<float>(const AddNormBwdRows&, const float*, const float*, float*, float*,
                                                float*, float*, float*, float*, uint32_t*, int64_t, int64_t);
template void add_norm_bwd_rows_features<double>(const AddNormBwdRows&, const double*, const double*, double*,
                                                 double*, double*, double*, double*, double*, uint32_t*, int64_t,
                                                 int64_t);

} // namespace fusedres::cpu::FUSEDRES_CPU_ISA
