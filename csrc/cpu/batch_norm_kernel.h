// BatchNorm + add + ReLU CPU loops. No include guard on purpose: batch_norm.cpp compiles this file
// once per instruction set (baseline and AVX2+FMA) into namespace FUSEDRES_CPU_ISA.
//
// NCHW data is walked plane by plane ((n, c) planes of S contiguous elements, one channel each);
// channels_last data row by row ((N*S) rows of C contiguous channels, vectorized across C).
// Statistics use sums of (x - shift_c) with shift_c a sample of channel c, so a large mean does
// not cancel away the variance; per-plane / per-row-chunk partials are combined in double in a
// fixed order, so results never depend on the thread count.

namespace fusedres::cpu::FUSEDRES_CPU_ISA {

// The rows kernels walk channels_last data in blocks of channels, each block down all of its rows
// before the next: a block's per-channel coefficients and accumulators (up to six arrays) then
// stay in L1 while the rows stream past, where whole rows of a wide C (2048 at ResNet-50's last
// stage: six 8 KB arrays) would not fit and were read back from L2 on every row (~2x slower).
// Each channel still sums its rows in row order, so results do not change.
constexpr int64_t kChannelBlock = 512;

template <typename T, typename acc_t>
void bn_stats_planes(const T* __restrict x, int64_t c_total, int64_t s, const acc_t* __restrict shift,
                     double* __restrict part_sum, double* __restrict part_sumsq, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const T* __restrict src = x + p * s;
    const acc_t k = shift[p % c_total];
    acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < s; ++i) {
      const acc_t d = static_cast<acc_t>(src[i]) - k;
      s1 += d;
      s2 += d * d;
    }
    part_sum[p] = s1;
    part_sumsq[p] = s2;
  }
}

template <typename T, typename acc_t>
void bn_stats_rows(const T* __restrict x, int64_t c_total, const acc_t* __restrict shift, acc_t* __restrict s1,
                   acc_t* __restrict s2, int64_t begin, int64_t end) {
  for (int64_t c0 = 0; c0 < c_total; c0 += kChannelBlock) {
    const int64_t c1 = std::min(c_total, c0 + kChannelBlock);
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict row = x + r * c_total;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t d = static_cast<acc_t>(row[c]) - shift[c];
        s1[c] += d;
        s2[c] += d * d;
      }
    }
  }
}

// Normalize + affine + residual + ReLU, (x - mean) * scale + bias rather than x * a + b: the
// latter loses the low bits of x when |mean| >> std.
template <bool kResidual, bool kRelu, typename T, typename acc_t>
inline acc_t bn_out(T x, const T* __restrict res, int64_t i, acc_t mean, acc_t scale, acc_t bias) {
  acc_t v = (static_cast<acc_t>(x) - mean) * scale + bias;
  if constexpr (kResidual) {
    v += static_cast<acc_t>(res[i]);
  }
  if constexpr (kRelu) {
    v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN, as torch.relu does
  }
  return v;
}

template <bool kResidual, bool kRelu, typename T, typename acc_t>
void bn_apply_planes(const T* __restrict x, const T* __restrict res, T* __restrict out, int64_t c_total, int64_t s,
                     const acc_t* __restrict mean, const acc_t* __restrict scale, const acc_t* __restrict bias,
                     int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % c_total;
    const acc_t m = mean[c], a = scale[c], b = bias[c];
    const T* __restrict xp = x + p * s;
    const T* __restrict rp = kResidual ? res + p * s : nullptr;
    T* __restrict op = out + p * s;
#pragma omp simd
    for (int64_t i = 0; i < s; ++i) {
      op[i] = static_cast<T>(bn_out<kResidual, kRelu>(xp[i], rp, i, m, a, b));
    }
  }
}

template <bool kResidual, bool kRelu, typename T, typename acc_t>
void bn_apply_rows(const T* __restrict x, const T* __restrict res, T* __restrict out, int64_t c_total,
                   const acc_t* __restrict mean, const acc_t* __restrict scale, const acc_t* __restrict bias,
                   int64_t begin, int64_t end) {
  for (int64_t c0 = 0; c0 < c_total; c0 += kChannelBlock) {
    const int64_t c1 = std::min(c_total, c0 + kChannelBlock);
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict xr = x + r * c_total;
      const T* __restrict rr = kResidual ? res + r * c_total : nullptr;
      T* __restrict orow = out + r * c_total;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        orow[c] = static_cast<T>(bn_out<kResidual, kRelu>(xr[c], rr, c, mean[c], scale[c], bias[c]));
      }
    }
  }
}

// g = dy blocked where out <= 0: torch's threshold_backward, so a NaN output passes its grad on.
template <bool kMask, typename T, typename acc_t>
inline acc_t bn_grad(const T* __restrict dy, const T* __restrict out, int64_t i) {
  const acc_t g = static_cast<acc_t>(dy[i]);
  if constexpr (kMask) {
    return static_cast<acc_t>(out[i]) <= acc_t(0) ? acc_t(0) : g;
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
    acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < s; ++i) {
      const acc_t g = bn_grad<kMask, T, acc_t>(dy + o, out + o, i);
      if constexpr (kWriteG) {
        g_out[o + i] = static_cast<T>(g);
      }
      s1 += g;
      s2 += g * (static_cast<acc_t>(x[o + i]) - m);
    }
    part_dy[p] = s1;
    part_dy_xmu[p] = s2;
  }
}

template <bool kMask, bool kWriteG, typename T, typename acc_t>
void bn_bwd_reduce_rows(const T* __restrict dy, const T* __restrict out, const T* __restrict x, T* __restrict g_out,
                        int64_t c_total, const acc_t* __restrict mean, acc_t* __restrict s1, acc_t* __restrict s2,
                        int64_t begin, int64_t end) {
  for (int64_t c0 = 0; c0 < c_total; c0 += kChannelBlock) {
    const int64_t c1 = std::min(c_total, c0 + kChannelBlock);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * c_total;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t g = bn_grad<kMask, T, acc_t>(dy + o, out + o, c);
        if constexpr (kWriteG) {
          g_out[o + c] = static_cast<T>(g);
        }
        s1[c] += g;
        s2[c] += g * (static_cast<acc_t>(x[o + c]) - mean[c]);
      }
    }
  }
}

// grad_input = a_c * g - k_c * (x - mean_c) + b_c, the per-channel coefficients folding
// weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count) (see batch_norm.cpp).
template <bool kMask, typename T, typename acc_t>
void bn_bwd_input_planes(const T* __restrict grad, const T* __restrict out, const T* __restrict x, T* __restrict dx,
                         int64_t c_total, int64_t s, const acc_t* __restrict mean, const acc_t* __restrict a,
                         const acc_t* __restrict k, const acc_t* __restrict b, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % c_total;
    const acc_t m = mean[c], ac = a[c], kc = k[c], bc = b[c];
    const int64_t o = p * s;
#pragma omp simd
    for (int64_t i = 0; i < s; ++i) {
      const acc_t g = bn_grad<kMask, T, acc_t>(grad + o, out + o, i);
      dx[o + i] = static_cast<T>(ac * g - kc * (static_cast<acc_t>(x[o + i]) - m) + bc);
    }
  }
}

template <bool kMask, typename T, typename acc_t>
void bn_bwd_input_rows(const T* __restrict grad, const T* __restrict out, const T* __restrict x, T* __restrict dx,
                       int64_t c_total, const acc_t* __restrict mean, const acc_t* __restrict a,
                       const acc_t* __restrict k, const acc_t* __restrict b, int64_t begin, int64_t end) {
  for (int64_t c0 = 0; c0 < c_total; c0 += kChannelBlock) {
    const int64_t c1 = std::min(c_total, c0 + kChannelBlock);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * c_total;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t g = bn_grad<kMask, T, acc_t>(grad + o, out + o, c);
        dx[o + c] = static_cast<T>(a[c] * g - k[c] * (static_cast<acc_t>(x[o + c]) - mean[c]) + b[c]);
      }
    }
  }
}

} // namespace fusedres::cpu::FUSEDRES_CPU_ISA
