// BatchNorm + add + ReLU CPU loops. No include guard on purpose: batch_norm.cpp compiles this file
// once per instruction set (baseline and AVX2+FMA+F16C) into namespace FUSEDRES_CPU_ISA.
//
// NCHW data is walked plane by plane ((n, c) planes of S contiguous elements, one channel each);
// channels_last data row by row ((N*S) rows of C contiguous channels, vectorized across C).
// Statistics use sums of (x - shift_c) with shift_c a sample of channel c, so a large mean does
// not cancel away the variance; per-plane / per-row-chunk partials are combined in double in a
// fixed order, so results never depend on the thread count.
//
// Every loop is written once over Vec<acc_t, W> (vec_convert.h): bf16/fp16 elements are converted
// in registers, a vector at a time, as they are loaded and stored.

namespace fusedres::cpu::FUSEDRES_CPU_ISA {

// The rows kernels walk channels_last data in blocks of channels, each block down all of its rows
// before the next: a block's per-channel coefficients and accumulators (up to six arrays) then
// stay in L1 while the rows stream past, where whole rows of a wide C (2048 at ResNet-50's last
// stage: six 8 KB arrays) would not fit and were read back from L2 on every row (~2x slower).
// Each channel still sums its rows in row order, so results do not change.
constexpr int64_t kChannelBlock = 512;

// body(o, c, lanes) over rows [begin, end) of channels_last (rows, c_total) data in that order:
// o the element's offset, c its channel, a Vec of lanes channels at a time.
template <typename acc_t, typename F>
inline void for_channel_blocks(int64_t c_total, int64_t begin, int64_t end, const F& body) {
  for (int64_t c0 = 0; c0 < c_total; c0 += kChannelBlock) {
    const int64_t len = std::min(c_total - c0, kChannelBlock);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * c_total + c0;
      for_vec<acc_t>(len, [&](int64_t i, auto lanes) { body(o + i, c0 + i, lanes); });
    }
  }
}

template <typename T, typename acc_t>
void bn_stats_planes(const T* __restrict x, int64_t c_total, int64_t s, const acc_t* __restrict shift,
    double* __restrict part_sum, double* __restrict part_sumsq, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const T* __restrict src = x + p * s;
    const acc_t k = shift[p % c_total];
    const auto [s1, s2] = sum_vec<2, acc_t>(s, [&](int64_t i, auto lanes) {
      using V = decltype(lanes);
      const V d = V::load(src + i) - V::all(k);
      return std::array<V, 2>{d, d * d};
    });
    part_sum[p] = s1;
    part_sumsq[p] = s2;
  }
}

template <typename T, typename acc_t>
void bn_stats_rows(const T* __restrict x, int64_t c_total, const acc_t* __restrict shift, acc_t* __restrict s1,
    acc_t* __restrict s2, int64_t begin, int64_t end) {
  for_channel_blocks<acc_t>(c_total, begin, end, [&](int64_t o, int64_t c, auto lanes) {
    using V = decltype(lanes);
    const V d = V::load(x + o) - V::load(shift + c);
    (V::load(s1 + c) + d).store(s1 + c);
    (V::load(s2 + c) + d * d).store(s2 + c);
  });
}

// Normalize + affine + residual + ReLU, (x - mean) * scale + bias rather than x * a + b: the
// latter loses the low bits of x when |mean| >> std.
template <bool kResidual, bool kRelu, typename T, typename V>
inline void bn_out(const T* __restrict x, const T* __restrict res, T* __restrict out, V mean, V scale, V bias) {
  V v = (V::load(x) - mean) * scale + bias;
  if constexpr (kResidual) {
    v = v + V::load(res);
  }
  if constexpr (kRelu) {
    v = v.relu();
  }
  v.store(out);
}

template <bool kResidual, bool kRelu, typename T, typename acc_t>
void bn_apply_planes(const T* __restrict x, const T* __restrict res, T* __restrict out, int64_t c_total, int64_t s,
    const acc_t* __restrict mean, const acc_t* __restrict scale, const acc_t* __restrict bias, int64_t begin,
    int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % c_total, o = p * s;
    for_vec<acc_t>(s, [&](int64_t i, auto lanes) {
      using V = decltype(lanes);
      bn_out<kResidual, kRelu>(x + o + i, kResidual ? res + o + i : nullptr, out + o + i, V::all(mean[c]),
          V::all(scale[c]), V::all(bias[c]));
    });
  }
}

template <bool kResidual, bool kRelu, typename T, typename acc_t>
void bn_apply_rows(const T* __restrict x, const T* __restrict res, T* __restrict out, int64_t c_total,
    const acc_t* __restrict mean, const acc_t* __restrict scale, const acc_t* __restrict bias, int64_t begin,
    int64_t end) {
  for_channel_blocks<acc_t>(c_total, begin, end, [&](int64_t o, int64_t c, auto lanes) {
    using V = decltype(lanes);
    bn_out<kResidual, kRelu>(
        x + o, kResidual ? res + o : nullptr, out + o, V::load(mean + c), V::load(scale + c), V::load(bias + c));
  });
}

// g = dy blocked where out <= 0: torch's threshold_backward, so a NaN output passes its grad on.
template <bool kMask, typename V, typename T>
inline V bn_grad(const T* __restrict dy, const T* __restrict out) {
  const V g = V::load(dy);
  if constexpr (kMask) {
    return g.zero_where_nonpositive(V::load(out));
  }
  return g;
}

template <bool kMask, bool kWriteG, typename T, typename acc_t>
void bn_bwd_reduce_planes(const T* __restrict dy, const T* __restrict out, const T* __restrict x, T* __restrict g_out,
    int64_t c_total, int64_t s, const acc_t* __restrict mean, double* __restrict part_dy,
    double* __restrict part_dy_xmu, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const acc_t m = mean[p % c_total];
    const int64_t o = p * s;
    const auto [s1, s2] = sum_vec<2, acc_t>(s, [&](int64_t i, auto lanes) {
      using V = decltype(lanes);
      const V g = bn_grad<kMask, V>(dy + o + i, out + o + i);
      if constexpr (kWriteG) {
        g.store_exact(g_out + o + i);  // dy or 0: a value of T
      }
      return std::array<V, 2>{g, g * (V::load(x + o + i) - V::all(m))};
    });
    part_dy[p] = s1;
    part_dy_xmu[p] = s2;
  }
}

template <bool kMask, bool kWriteG, typename T, typename acc_t>
void bn_bwd_reduce_rows(const T* __restrict dy, const T* __restrict out, const T* __restrict x, T* __restrict g_out,
    int64_t c_total, const acc_t* __restrict mean, acc_t* __restrict s1, acc_t* __restrict s2, int64_t begin,
    int64_t end) {
  for_channel_blocks<acc_t>(c_total, begin, end, [&](int64_t o, int64_t c, auto lanes) {
    using V = decltype(lanes);
    const V g = bn_grad<kMask, V>(dy + o, out + o);
    if constexpr (kWriteG) {
      g.store_exact(g_out + o);  // dy or 0: a value of T
    }
    (V::load(s1 + c) + g).store(s1 + c);
    (V::load(s2 + c) + g * (V::load(x + o) - V::load(mean + c))).store(s2 + c);
  });
}

// grad_input = a_c * g - k_c * (x - mean_c) + b_c, the per-channel coefficients folding
// weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count) (see batch_norm.cpp).
template <bool kMask, typename T, typename V>
inline void bn_dx(
    const T* __restrict grad, const T* __restrict out, const T* __restrict x, T* __restrict dx, V mean, V a, V k, V b) {
  const V g = bn_grad<kMask, V>(grad, out);
  (a * g - k * (V::load(x) - mean) + b).store(dx);
}

template <bool kMask, typename T, typename acc_t>
void bn_bwd_input_planes(const T* __restrict grad, const T* __restrict out, const T* __restrict x, T* __restrict dx,
    int64_t c_total, int64_t s, const acc_t* __restrict mean, const acc_t* __restrict a, const acc_t* __restrict k,
    const acc_t* __restrict b, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % c_total, o = p * s;
    for_vec<acc_t>(s, [&](int64_t i, auto lanes) {
      using V = decltype(lanes);
      bn_dx<kMask>(
          grad + o + i, out + o + i, x + o + i, dx + o + i, V::all(mean[c]), V::all(a[c]), V::all(k[c]), V::all(b[c]));
    });
  }
}

template <bool kMask, typename T, typename acc_t>
void bn_bwd_input_rows(const T* __restrict grad, const T* __restrict out, const T* __restrict x, T* __restrict dx,
    int64_t c_total, const acc_t* __restrict mean, const acc_t* __restrict a, const acc_t* __restrict k,
    const acc_t* __restrict b, int64_t begin, int64_t end) {
  for_channel_blocks<acc_t>(c_total, begin, end, [&](int64_t o, int64_t c, auto lanes) {
    using V = decltype(lanes);
    bn_dx<kMask>(grad + o, out + o, x + o, dx + o, V::load(mean + c), V::load(a + c), V::load(k + c), V::load(b + c));
  });
}

}  // namespace fusedres::cpu::FUSEDRES_CPU_ISA
