// Add & Norm CPU row kernels. No include guard on purpose: add_norm.cpp compiles this file once
// per instruction set (baseline and AVX2+FMA+F16C) into namespace FUSEDRES_CPU_ISA and picks one
// at run time, so one wheel is fast on new CPUs and still loads on old ones. The loops that touch
// memory are written over Vec<acc_t, W> (vec_convert.h), which converts bf16/fp16 in registers.
//
// Each row goes through a per-thread buffer of N accumulators that stays in L1/L2: memory sees
// one read of x (and residual) and one write of y (and h) in the forward, one read of dy, h
// (and dh) and one write of dx (and dresidual) in the backward; the statistics are computed
// two-pass over the buffer (exact mean first, then sum((h - mean)^2)), which is as stable as
// Welford and vectorizes better.

namespace fusedres::cpu::FUSEDRES_CPU_ISA {

// Row conversions for an operand of any dtype.
template <typename acc_t>
inline void load_row(const void* src, ScalarType dtype, int64_t n, acc_t* __restrict dst) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    to_acc(static_cast<const T*>(src), n, dst);
  });
}

template <typename acc_t>
inline void add_row(const void* src, ScalarType dtype, int64_t n, acc_t* __restrict dst) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    add_to_acc(static_cast<const T*>(src), n, dst);
  });
}

template <typename acc_t>
inline void store_row(const acc_t* __restrict src, int64_t n, ScalarType dtype, void* dst) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    from_acc(src, n, static_cast<T*>(dst));
  });
}

// Rounds the buffer through `dtype`, so the statistics see exactly the h a tensor of that dtype
// holds: eager computes norm((x + r).to(h_dtype)).
template <typename acc_t>
inline void round_row(acc_t* __restrict buf, int64_t n, ScalarType dtype) {
  visit_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    round_through<T>(buf, n);
  });
}

template <typename acc_t>
inline acc_t row_sum(const acc_t* __restrict b, int64_t n) {
  return sum_vec<1, acc_t>(n, [&](int64_t i, auto lanes) { return std::array{decltype(lanes)::load(b + i)}; })[0];
}

template <typename acc_t>
inline acc_t row_sum_sq_dev(const acc_t* __restrict b, acc_t center, int64_t n) {
  return sum_vec<1, acc_t>(n, [&](int64_t i, auto lanes) {
    using V = decltype(lanes);
    const V d = V::load(b + i) - V::all(center);
    return std::array{d * d};
  })[0];
}

// Forward over rows [begin, end) when x, residual, h and y share one dtype T (the common case):
// the conversions are fused into three loops, two of which touch memory.
template <typename T, typename acc_t>
void add_norm_fwd_rows_typed(const AddNormFwdRows& a, const acc_t* __restrict w, const acc_t* __restrict b,
                             acc_t* __restrict buf, int64_t begin, int64_t end) {
  using Yes = std::true_type;
  using No = std::false_type;
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t eps = static_cast<acc_t>(a.eps);
  for (int64_t r = begin; r < end; ++r) {
    const T* __restrict x = reinterpret_cast<const T*>(a.x.row(r));
    const T* __restrict res = a.residual ? reinterpret_cast<const T*>(a.residual.row(r)) : nullptr;
    T* __restrict h = a.h ? reinterpret_cast<T*>(a.h.row(r)) : nullptr;
    // Reads x (and the residual), keeps h in buf for the statistics, writes it out, sums it.
    const auto first_pass = [&](auto with_residual, auto store_h) {
      return sum_vec<1, acc_t>(n, [&](int64_t i, auto lanes) {
        using V = decltype(lanes);
        V v = V::load(x + i);
        if constexpr (decltype(with_residual)::value) {
          // Rounded through T: the statistics see exactly the h that is stored.
          v = (v + V::load(res + i)).template rounded<T>();
        }
        v.store(buf + i);
        if constexpr (decltype(store_h)::value) {
          v.store_exact(h + i);
        }
        return std::array<V, 1>{v};
      })[0];
    };
    const acc_t sum = res ? (h ? first_pass(Yes{}, Yes{}) : first_pass(Yes{}, No{}))
                          : (h ? first_pass(No{}, Yes{}) : first_pass(No{}, No{}));
    const acc_t mean = a.rms_norm ? acc_t(0) : sum * inv_n;
    const acc_t rstd = acc_t(1) / std::sqrt(row_sum_sq_dev(buf, mean, n) * inv_n + eps);
    if (!a.rms_norm) {
      static_cast<acc_t*>(a.mean)[r] = mean;
    }
    static_cast<acc_t*>(a.rstd)[r] = rstd;
    T* __restrict y = reinterpret_cast<T*>(a.y.row(r));
    for_vec<acc_t>(n, [&](int64_t i, auto lanes) {
      using V = decltype(lanes);
      ((V::load(buf + i) - V::all(mean)) * V::all(rstd) * V::load(w + i) + V::load(b + i)).store(y + i);
    });
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
    // One loop reads h (however it is formed: h_at(i, lanes)) and dy, producing xhat, g, the two
    // row sums and the dweight/dbias terms.
    auto first_pass = [&](const auto& h_at) {
      return sum_vec<2, acc_t>(n, [&](int64_t i, auto lanes) {
        using V = decltype(lanes);
        const V xh = (h_at(i, lanes) - V::all(mean)) * V::all(rstd);
        const V d = V::load(dy + i);
        const V gw = d * V::load(w + i);
        (V::load(dw + i) + d * xh).store(dw + i);
        (V::load(db + i) + d).store(db + i);
        xh.store(xhat + i);
        gw.store(g + i);
        return std::array<V, 2>{gw * xh, gw};
      });
    };
    std::array<acc_t, 2> sums;  // sum of g * xhat, sum of g
    if (h_typed) {
      const T* __restrict h = reinterpret_cast<const T*>(a.h.row(r));
      sums = first_pass([h](int64_t i, auto lanes) { return decltype(lanes)::load(h + i); });
    } else if (h_recomputed_typed) {
      const T* __restrict x = reinterpret_cast<const T*>(a.h.row(r));
      const T* __restrict res = reinterpret_cast<const T*>(a.residual.row(r));
      sums = first_pass([x, res](int64_t i, auto lanes) {
        using V = decltype(lanes);
        return (V::load(x + i) + V::load(res + i)).template rounded<T>();
      });
    } else {
      load_row(a.h.row(r), a.h.dtype, n, hbuf);
      if (a.residual) {
        add_row(a.residual.row(r), a.residual.dtype, n, hbuf);
        round_row(hbuf, n, a.h_dtype);
      }
      sums = first_pass([hbuf](int64_t i, auto lanes) { return decltype(lanes)::load(hbuf + i); });
    }
    const acc_t c1 = sums[0] * inv_n;
    const acc_t c2 = a.rms_norm ? acc_t(0) : sums[1] * inv_n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[i] = (g[i] - xhat[i] * c1 - c2) * rstd;
    }
    if (a.dh) {
      add_row(a.dh.row(r), a.dh.dtype, n, g);
    }
    from_acc(g, n, reinterpret_cast<T*>(a.dx.row(r)));
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

template void add_norm_fwd_rows<float>(const AddNormFwdRows&, const float*, const float*, float*, int64_t, int64_t);
template void add_norm_fwd_rows<double>(const AddNormFwdRows&, const double*, const double*, double*, int64_t, int64_t);
template void add_norm_bwd_rows<float>(const AddNormBwdRows&, const float*, float*, float*, float*, float*, float*,
                                       int64_t, int64_t);
template void add_norm_bwd_rows<double>(const AddNormBwdRows&, const double*, double*, double*, double*, double*,
                                        double*, int64_t, int64_t);

} // namespace fusedres::cpu::FUSEDRES_CPU_ISA
