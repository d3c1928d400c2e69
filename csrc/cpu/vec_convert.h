// Vectors of accumulators that load from and store to any supported float dtype, converting in
// registers, for the CPU kernels. No include guard on purpose: isa_dispatch.h includes this file
// once per instruction set, into namespace FUSEDRES_CPU_ISA, before the kernel header.
//
// Why: c10's scalar Half/BFloat16 conversions branch (NaN, subnormals; fp16 in software unless the
// including file is built for F16C), so a loop that converts element by element stays scalar, and
// bf16/fp16 ran 3-10x slower than fp32 on half the bytes. A kernel loop is instead written once
// over Vec<acc_t, W> (for_vec / sum_vec call it with the build's widest W over full vectors, then
// with W = 1 for the rest), and Vec::load / Vec::store convert whole vectors:
//   AVX2 build, fp32 accumulators: W = 8 (one __m256); bf16 <-> fp32 by integer shifts, fp16 by
//     F16C (vcvtph2ps / vcvtps2ph);
//   otherwise W = 1; the loop carries `omp simd`, so the compiler still vectorizes it where it can
//     (the bf16 formulas below are branch-free for that reason).
// Arithmetic on Vec is GCC vector arithmetic, contracted into FMAs exactly as the scalar code was.
//
// The values are c10's, bit for bit (the rounding is unchanged: once, from fp32, to nearest even):
//   bf16 -> fp32  the 16 bits shifted up (exact);
//   fp32 -> bf16  the high 16 bits after adding 0x7FFF + the lowest kept bit; every NaN becomes
//                 0x7FC0, as c10::BFloat16(float) makes it (torch's vectorized .to() makes 0xFFFF:
//                 a NaN either way);
//   fp16          F16C in the AVX2 build, c10's conversion in the baseline one: the same value for
//                 every non-NaN input.

namespace fusedres::cpu::FUSEDRES_CPU_ISA {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
  return f != f ? UINT16_C(0x7FC0) : rounded;  // a select, not a branch: the loop still vectorizes
}

// One element, T to acc_t and back.
template <typename acc_t, typename T>
inline acc_t to_acc_scalar(T v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return static_cast<acc_t>(bf16_bits_to_float(v.x));
  } else if constexpr (std::is_same_v<T, Half>) {
#if FUSEDRES_CPU_AVX2
    return static_cast<acc_t>(_cvtsh_ss(v.x));
#else
    return static_cast<acc_t>(static_cast<float>(v));
#endif
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename T, typename acc_t>
inline T from_acc_scalar(acc_t v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return T(float_to_bf16_bits(static_cast<float>(v)), T::from_bits());
  } else if constexpr (std::is_same_v<T, Half>) {
#if FUSEDRES_CPU_AVX2
    return T(_cvtss_sh(static_cast<float>(v), _MM_FROUND_TO_NEAREST_INT), T::from_bits());
#else
    return static_cast<T>(static_cast<float>(v));
#endif
  } else {
    return static_cast<T>(v);
  }
}

template <typename acc_t, int W>
struct Vec;

// One accumulator: the remainder of every loop, and every element where no wider Vec exists.
template <typename acc_t>
struct Vec<acc_t, 1> {
  static constexpr int64_t kWidth = 1;
  acc_t v;

  static Vec all(acc_t s) { return {s}; }
  template <typename T>
  static Vec load(const T* p) {
    return {to_acc_scalar<acc_t>(*p)};
  }
  template <typename T>
  void store(T* p) const {
    *p = from_acc_scalar<T>(v);
  }
  // Stores v where it already holds values of T (loaded from T, or rounded<T>()): no second rounding.
  template <typename T>
  void store_exact(T* p) const {
    *p = from_acc_scalar<T>(v);
  }
  // v rounded through T: what storing to a T tensor and loading back gives.
  template <typename T>
  Vec rounded() const {
    if constexpr (sizeof(T) < sizeof(acc_t)) {
      return {to_acc_scalar<acc_t>(from_acc_scalar<T>(v))};
    } else {
      return *this;
    }
  }
  Vec relu() const { return {v < acc_t(0) ? acc_t(0) : v}; }  // keeps NaN and -0, as torch.relu does
  // 0 where `out` <= 0, v elsewhere (a NaN `out` keeps v): torch's threshold_backward.
  Vec zero_where_nonpositive(Vec out) const { return {out.v <= acc_t(0) ? acc_t(0) : v}; }
  acc_t sum() const { return v; }
  friend Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
  friend Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
  friend Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
};

#if FUSEDRES_CPU_AVX2
constexpr int kFloatWidth = 8;

// v rounded to bf16, in the high 16 bits of each 32-bit lane (the low bits are left over).
inline __m256i bf16_rounded_high(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(nan));
}

// Stores the high 16 bits of each lane: 8 bf16.
inline void store_high_halves(BFloat16* p, __m256i u) {
  // Within each 128-bit half, bytes 2-3, 6-7, 10-11, 14-15 to the low 8 bytes; then quadwords 0 and
  // 2 to the low 128 bits.
  const __m256i pick = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11,
      14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(u, pick), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <>
struct Vec<float, 8> {
  static constexpr int64_t kWidth = 8;
  __m256 v;

  static Vec all(float s) { return {_mm256_set1_ps(s)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  static Vec load(const Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static Vec load(const double* p) {  // an fp64 operand of an fp32 computation (mixed dtypes)
    return {_mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p)))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(double* p) const {
    _mm256_storeu_pd(p, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(p + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  void store(BFloat16* p) const { store_high_halves(p, bf16_rounded_high(v)); }
  void store(Half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  template <typename T>
  void store_exact(T* p) const {
    if constexpr (std::is_same_v<T, BFloat16>) {
      store_high_halves(p, _mm256_castps_si256(v));  // exact: the low 16 bits are zero
    } else {
      store(p);
    }
  }
  template <typename T>
  Vec rounded() const {
    if constexpr (std::is_same_v<T, BFloat16>) {
      return {_mm256_castsi256_ps(_mm256_and_si256(bf16_rounded_high(v), _mm256_set1_epi32(int(0xFFFF0000))))};
    } else if constexpr (std::is_same_v<T, Half>) {
      return {_mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT))};
    } else {
      return *this;
    }
  }
  Vec relu() const {
    return {_mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ))};
  }
  Vec zero_where_nonpositive(Vec out) const {
    return {_mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(out.v, _mm256_setzero_ps(), _CMP_LE_OQ))};
  }
  float sum() const {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
  }
  friend Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
  friend Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
  friend Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
};
#else
constexpr int kFloatWidth = 1;
#endif

// The widest Vec of acc_t in this build.
template <typename acc_t>
constexpr int kWidest = std::is_same_v<acc_t, float> ? kFloatWidth : 1;

// body(i, Vec<acc_t, W>{}) for i over [0, n) in steps of W: the widest W over full vectors, then 1.
// Iterations must be independent (the remainder loop is `omp simd`).
template <typename acc_t, typename F>
inline void for_vec(int64_t n, const F& body) {
  constexpr int W = kWidest<acc_t>;
  int64_t i0 = 0;
  if constexpr (W > 1) {
    for (; i0 + W <= n; i0 += W) {
      body(i0, Vec<acc_t, W>{});
    }
  }
#pragma omp simd
  for (int64_t i = i0; i < n; ++i) {
    body(i, Vec<acc_t, 1>{});
  }
}

// The sums over [0, n) of the K Vecs (K = 1 or 2) body(i, Vec<acc_t, W>{}) returns as a
// std::array, looping as for_vec; body may also store, as in for_vec. Full vectors go to
// kAccumulators interleaved accumulators: with one, the loop waits on each add's latency (an FMA's
// 4 cycles on Zen 3 held the sum of squares of a row to a quarter of its speed).
template <int K, typename acc_t, typename F>
inline std::array<acc_t, K> sum_vec(int64_t n, const F& body) {
  static_assert(K == 1 || K == 2, "sum_vec sums one or two quantities");
  constexpr int W = kWidest<acc_t>;
  int64_t i0 = 0;
  std::array<acc_t, K> total{};
  if constexpr (W > 1) {
    using V = Vec<acc_t, W>;
    constexpr int kAccumulators = 4;
    std::array<std::array<V, K>, kAccumulators> acc;
    for (auto& a : acc) {
      a.fill(V::all(acc_t(0)));
    }
    const auto add = [&](std::array<V, K>& a, int64_t i) {
      const std::array<V, K> terms = body(i, V{});
      for (int k = 0; k < K; ++k) {
        a[k] = a[k] + terms[k];
      }
    };
    for (; i0 + kAccumulators * W <= n; i0 += kAccumulators * W) {
      for (int u = 0; u < kAccumulators; ++u) {
        add(acc[u], i0 + u * W);
      }
    }
    for (; i0 + W <= n; i0 += W) {
      add(acc[0], i0);
    }
    for (int k = 0; k < K; ++k) {
      total[k] = ((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k])).sum();
    }
  }
  acc_t s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t i = i0; i < n; ++i) {
    const std::array<Vec<acc_t, 1>, K> terms = body(i, Vec<acc_t, 1>{});
    s0 += terms[0].v;
    if constexpr (K == 2) {
      s1 += terms[K - 1].v;
    }
  }
  total[0] += s0;
  if constexpr (K == 2) {
    total[K - 1] += s1;
  }
  return total;
}

// Whole-row conversions: dst = src, dst += src, and buf rounded through T in place.
template <typename T, typename acc_t>
inline void to_acc(const T* __restrict src, int64_t n, acc_t* __restrict dst) {
  for_vec<acc_t>(n, [&](int64_t i, auto lanes) { decltype(lanes)::load(src + i).store(dst + i); });
}

template <typename T, typename acc_t>
inline void add_to_acc(const T* __restrict src, int64_t n, acc_t* __restrict dst) {
  for_vec<acc_t>(n, [&](int64_t i, auto lanes) {
    using V = decltype(lanes);
    (V::load(dst + i) + V::load(src + i)).store(dst + i);
  });
}

template <typename T, typename acc_t>
inline void from_acc(const acc_t* __restrict src, int64_t n, T* __restrict dst) {
  for_vec<acc_t>(n, [&](int64_t i, auto lanes) { decltype(lanes)::load(src + i).store(dst + i); });
}

template <typename T, typename acc_t>
inline void round_through(acc_t* __restrict buf, int64_t n) {
  for_vec<acc_t>(
      n, [&](int64_t i, auto lanes) { decltype(lanes)::load(buf + i).template rounded<T>().store(buf + i); });
}

}  // namespace fusedres::cpu::FUSEDRES_CPU_ISA
