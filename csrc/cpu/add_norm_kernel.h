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

// y = (buf - mean) * rstd * w + b, stored as T (y may be the row buf was loaded from: in place).
template <typename T, typename acc_t>
inline void normalize_row(const acc_t* __restrict buf, acc_t mean, acc_t rstd, const acc_t* __restrict w,
    const acc_t* __restrict b, int64_t n, T* __restrict y) {
  for_vec<acc_t>(n, [&](int64_t i, auto lanes) {
    using V = decltype(lanes);
    ((V::load(buf + i) - V::all(mean)) * V::all(rstd) * V::load(w + i) + V::load(b + i)).store(y + i);
  });
}

// --- the residual features (fusedres/spec/add_norm.py) -------------------------------------------
// Calls with dropout, rowscale or colscale, with the mask written, or in place, transform x's
// branch in the row buffer; a row's Philox bits are drawn once into `bits` (N uint32 of scratch).

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
      rs = to_acc_scalar<acc_t>(static_cast<const T*>(f.rowscale)[r]);
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
    normalize_row(buf, mean, rstd, w, b, n, reinterpret_cast<T*>(a.y.row(r)));
  }
}

// Forward for any mix of dtypes, with the residual features, the mask, or in place: each row goes
// through the buffer one operand at a time (converted at vector width), x's branch transformed
// there: h = residual + branch(x), rounded to h_dtype; y = norm(h) * w + b (w already holds
// weight + weight_offset; ones/zeros when absent: one multiply-add per element is free next to the
// memory traffic, and keeps a single loop). In place (y is x, h is residual) each row is read
// whole before it is written. Statistics are written where their pointers are given.
template <typename acc_t>
void add_norm_fwd_rows_features(const AddNormFwdRows& a, const acc_t* __restrict w, const acc_t* __restrict b,
    const acc_t* __restrict cs, acc_t* __restrict buf, uint32_t* __restrict bits, int64_t begin, int64_t end) {
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
    visit_float(a.y.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      normalize_row(buf, mean, rstd, w, b, n, reinterpret_cast<T*>(a.y.row(r)));
    });
  }
}

template <typename acc_t>
void add_norm_fwd_rows(
    const AddNormFwdRows& a, const acc_t* w, const acc_t* b, acc_t* buf, int64_t begin, int64_t end) {
  const ScalarType t = a.x.dtype;
  const bool same = a.h_dtype == t && (!a.residual || a.residual.dtype == t) && (!a.h || a.h.dtype == t);
  const auto mixed = [&] {
    add_norm_fwd_rows_features<acc_t>(a, w, b, nullptr, buf, nullptr, begin, end);  // no feature is on
  };
  if (!same) {
    return mixed();
  }
  visit_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) <= sizeof(acc_t)) {
      add_norm_fwd_rows_typed<T>(a, w, b, buf, begin, end);
    } else {
      mixed();
    }
  });
}

// Backward over rows [begin, end), adding this range's dweight/dbias (and dcolscale) into dw/db
// (dcs) (per-chunk partial rows). With xhat = (h - mean) * rstd (RMSNorm: h * rstd) and g = dy * w:
//   LayerNorm: dh = rstd * (g - xhat * mean(g * xhat) - mean(g))
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
// plus the incoming grad of h itself (prenorm); dweight = sum_rows dy * xhat, dbias = sum_rows dy.
// With the residual features, dresidual = dL/dh, dcolscale += dL/dh * branch(x) without colscale,
// and dx = dL/dh scaled as the branch was (cs and bits are null without them). A first loop reads
// h and dy, a second writes dx; an h of another dtype than dy, or one formed from a transformed x,
// is formed in a buffer first, exactly as the forward formed it.
template <typename T, typename acc_t>
void add_norm_bwd_rows_typed(const AddNormBwdRows& a, const acc_t* __restrict w, const acc_t* __restrict cs,
    acc_t* __restrict dw, acc_t* __restrict db, acc_t* __restrict dcs, acc_t* __restrict xhat, acc_t* __restrict g,
    acc_t* __restrict hbuf, uint32_t* __restrict bits, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const RowFeatures& f = a.features;
  const bool transforms_x = f.transforms_x();
  // h is read as is when it has dy's dtype (x alone is h when nothing transforms or rounds it);
  // x + residual is formed in registers when they all do.
  const bool h_typed =
      a.h.dtype == a.dy.dtype && (!a.recompute_h || (!transforms_x && !a.residual && a.h_dtype == a.dy.dtype));
  const bool h_recomputed_typed = a.recompute_h && !transforms_x && a.residual && a.h.dtype == a.dy.dtype &&
                                  a.residual.dtype == a.dy.dtype && a.h_dtype == a.dy.dtype;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t mean = a.rms_norm ? acc_t(0) : static_cast<const acc_t*>(a.mean)[r];
    const acc_t rstd = static_cast<const acc_t*>(a.rstd)[r];
    const T* __restrict dy = reinterpret_cast<const T*>(a.dy.row(r));
    draw_row_bits(f, r, n, bits);
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
      load_row(a.h.row(r), a.h.dtype, n, hbuf);  // the stored h, or x when h is recomputed
      if (a.recompute_h) {
        scale_branch(f, r, n, cs, bits, hbuf);
        if (a.residual) {
          add_row(a.residual.row(r), a.residual.dtype, n, hbuf);
        }
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
    if (transforms_x) {
      scale_branch(f, r, n, cs, bits, g);
    }
    from_acc(g, n, reinterpret_cast<T*>(a.dx.row(r)));
  }
}

template <typename acc_t>
void add_norm_bwd_rows_features(const AddNormBwdRows& a, const acc_t* w, const acc_t* cs, acc_t* dw, acc_t* db,
    acc_t* dcs, acc_t* xhat, acc_t* g, acc_t* hbuf, uint32_t* bits, int64_t begin, int64_t end) {
  visit_float(a.dy.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) <= sizeof(acc_t)) {
      add_norm_bwd_rows_typed<T>(a, w, cs, dw, db, dcs, xhat, g, hbuf, bits, begin, end);
    } else {
      STD_TORCH_CHECK(false, "fusedres: float64 grads need float64 statistics");
    }
  });
}

template <typename acc_t>
void add_norm_bwd_rows(const AddNormBwdRows& a, const acc_t* w, acc_t* dw, acc_t* db, acc_t* xhat, acc_t* g,
    acc_t* hbuf, int64_t begin, int64_t end) {
  add_norm_bwd_rows_features<acc_t>(a, w, nullptr, dw, db, nullptr, xhat, g, hbuf, nullptr, begin, end);
}

template void add_norm_fwd_rows<float>(const AddNormFwdRows&, const float*, const float*, float*, int64_t, int64_t);
template void add_norm_fwd_rows<double>(const AddNormFwdRows&, const double*, const double*, double*, int64_t, int64_t);
template void add_norm_bwd_rows<float>(
    const AddNormBwdRows&, const float*, float*, float*, float*, float*, float*, int64_t, int64_t);
template void add_norm_bwd_rows<double>(
    const AddNormBwdRows&, const double*, double*, double*, double*, double*, double*, int64_t, int64_t);
template void add_norm_fwd_rows_features<float>(
    const AddNormFwdRows&, const float*, const float*, const float*, float*, uint32_t*, int64_t, int64_t);
template void add_norm_fwd_rows_features<double>(
    const AddNormFwdRows&, const double*, const double*, const double*, double*, uint32_t*, int64_t, int64_t);
template void add_norm_bwd_rows_features<float>(const AddNormBwdRows&, const float*, const float*, float*, float*,
    float*, float*, float*, float*, uint32_t*, int64_t, int64_t);
template void add_norm_bwd_rows_features<double>(const AddNormBwdRows&, const double*, const double*, double*, double*,
    double*, double*, double*, double*, uint32_t*, int64_t, int64_t);

}  // namespace fusedres::cpu::FUSEDRES_CPU_ISA
