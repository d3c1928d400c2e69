// Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): the one random-number generator of fusedres's C++ kernels, for host C++ (the CPU
// kernels, compiled once per ISA by cpu/isa_dispatch.h) and CUDA device code alike.
// fusedres/triton/philox.py and fusedres/reference/philox.py implement the same function and the
// same counter layout; tests/test_philox.py holds all three to Random123's known answers and to
// each other, so one generator state gives one mask on every backend.
//
// Counter layout: the formula of every fused dropout, written down once (also in the reference's
// docstring).
//   seed_offset = [seed, offset]: two int64 drawn from torch's generator per call
//                 (fusedres/_rng.py), read as uint64 (two's complement).
//   e           = row * N + col: element e of the op's (M, N) input in logical row-major order,
//                 whatever its strides.
//   bits(e)     = lane e % 4 of Philox4x32-10(counter, key) with
//                 counter = offset + e / 4 (mod 2^64): c0 = its low 32 bits, c1 = its high 32 bits,
//                 c2 = c3 = 0; key = seed: k0 = its low 32 bits, k1 = its high 32 bits.
//   keep(e)     = bits(e) >= threshold(p), threshold(p) = min(floor(p * 2^32), 2^32 - 1) in double:
//                 an integer compare, so no backend's float rounding can flip an element;
//                 P(drop) = threshold / 2^32, within 2^-32 of p.
//   kept values are multiplied by scale(p) = 1 / (1 - p) (computed in double, rounded once to the
//   kernel's accumulation type).
// Every lane of every block is used: one Philox evaluation per 4 elements.
//
// How a kernel gets element e's keep bit (seed, offset: seed_offset's two values as uint64):
//   const philox::Key key = philox::key_of(seed);
//   const uint32_t thr = philox::threshold(p);  // once per call, in double
//   - CPU, a row or any run of consecutive elements:
//       philox::fill_bits(key, offset, e_begin, n, bits);  // bits[i] = bits(e_begin + i)
//     into a uint32 buffer (L1-resident), then `bits[i] >= thr` in the row loop. fill_bits
//     picks its vector path at run time (AVX2 where the CPU has it), so it can be called from
//     either ISA build of a kernel (cpu/isa_dispatch.h). Include this header from the .cpp,
//     before cpu/isa_dispatch.h, not from inside a kernel header.
//   - CUDA: a thread that owns K consecutive elements from e (K % 4 == 0, e anything: a pack of a
//     row whose start row * N is not a multiple of 4 when N is not) calls
//       uint32_t bits[K]; philox::bits_run<K>(key, offset, e, bits);  // bits[j] = bits(e + j)
//     (K / 4 blocks, one more when e % 4 != 0); 4 elements from e % 4 == 0:
//       const philox::Block b = philox::block_at(key, offset + e / 4);  // b.v[lane] = bits(e + lane)
//     an element on its own: philox::bits_at(key, offset, e) (a whole block for one lane).
//   - kept values: x * scale(p) in the accumulation type.
#pragma once

#include <cmath>
#include <cstdint>

#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(__CUDACC__)
#define FUSEDRES_PHILOX_HD __host__ __device__ __forceinline__
#else
#define FUSEDRES_PHILOX_HD inline
#endif

#if defined(__GNUC__)
// Host loops are always inlined into their caller, so each ISA build of a CPU kernel gets its own
// vectorized copy (an out-of-line copy would be compiled once, for the baseline ISA).
#define FUSEDRES_PHILOX_HOST inline __attribute__((always_inline))
#else
#define FUSEDRES_PHILOX_HOST inline
#endif

namespace fusedres::philox {

// Random123's constants for Philox4x32: the round multipliers and the Weyl sequence that bumps
// the key between rounds.
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Key {
  uint32_t k0, k1;
};

struct Block {
  uint32_t v[4];
};

FUSEDRES_PHILOX_HD Key key_of(uint64_t seed) {
  return Key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

FUSEDRES_PHILOX_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with kRounds rounds on counter (c0, c1, c2, c3) and key (k0, k1).
FUSEDRES_PHILOX_HD Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, Key key) {
  uint32_t k0 = key.k0;
  uint32_t k1 = key.k1;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t hi0 = mulhi(kMul0, c0);
    const uint32_t lo0 = kMul0 * c0;
    const uint32_t hi1 = mulhi(kMul1, c2);
    const uint32_t lo1 = kMul1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Block{{c0, c1, c2, c3}};
}

// The block at a 64-bit counter (the layout's c2 = c3 = 0).
FUSEDRES_PHILOX_HD Block block_at(Key key, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u, key);
}

// bits(e) alone: a whole Philox evaluation for one element. Kernels that own 4 aligned
// consecutive elements call block_at once instead.
FUSEDRES_PHILOX_HD uint32_t bits_at(Key key, uint64_t offset, uint64_t e) {
  const Block b = block_at(key, offset + e / 4);
  return b.v[e % 4];
}

// Lane i (0..3, known only at run time) of b, by selects: a dynamic index into b.v would put the
// block in local memory on a GPU.
FUSEDRES_PHILOX_HD uint32_t lane_of(const Block& b, unsigned i) {
  return i == 0 ? b.v[0] : i == 1 ? b.v[1] : i == 2 ? b.v[2] : b.v[3];
}

// bits(e + j) for j < K (K a multiple of 4) and any e: K / 4 blocks when e % 4 == 0, one more
// otherwise. For a GPU thread that owns K consecutive elements of a row (row * N + col need not
// be a multiple of 4 when N is not).
template <int K>
FUSEDRES_PHILOX_HD void bits_run(Key key, uint64_t offset, uint64_t e, uint32_t (&out)[K]) {
  static_assert(K % 4 == 0, "bits_run fills whole blocks' worth of elements");
  const uint64_t first = offset + e / 4;
  const unsigned shift = static_cast<unsigned>(e % 4);
  if (shift == 0) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int b = 0; b < K / 4; ++b) {
      const Block blk = block_at(key, first + static_cast<uint64_t>(b));
      for (int lane = 0; lane < 4; ++lane) {
        out[4 * b + lane] = blk.v[lane];
      }
    }
    return;
  }
  Block prev = block_at(key, first);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int b = 0; b < K / 4; ++b) {
    const Block next = block_at(key, first + static_cast<uint64_t>(b + 1));
    for (unsigned j = 0; j < 4; ++j) {
      const unsigned lane = shift + j;  // of prev, or of next past 3
      out[4 * b + j] = lane < 4 ? lane_of(prev, lane) : lane_of(next, lane - 4);
    }
    prev = next;
  }
}

// Elements whose bits are >= threshold(p) are kept. p in [0, 1): p * 2^32 is exact in double.
FUSEDRES_PHILOX_HD uint32_t threshold(double p) {
  const double t = floor(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t > 0.0 ? t : 0.0);
}

FUSEDRES_PHILOX_HD double scale(double p) { return 1.0 / (1.0 - p); }

#if !defined(__CUDACC__)
// ---------------------------------------------------------------------------------------------
// Host: bits for a run of consecutive elements, vectorized across Philox blocks.
//
// Measured on a 2-core AMD EPYC (AVX2), one thread, bits into an L1-resident buffer: the plain
// loop below, auto-vectorized by GCC 12, costs 2.6 ns per element (baseline SSE2) and 2.2 ns
// (AVX2); GCC splits each 32x32 -> 64-bit product into widening halves and spends most of the
// time permuting lanes back. The AVX2 path below keeps 8 blocks per vector and 4 vectors in
// flight (10 dependent rounds per vector: one chain alone is latency-bound): 0.54 ns per element.
// It is chosen at run time by fill_bits itself, so a CPU kernel gets it from either of its ISA
// builds (cpu/isa_dispatch.h), and other CPUs run the plain loop.
namespace detail {

// out[4 * i + lane] = block_at(key, counter + i).v[lane] for i < blocks.
FUSEDRES_PHILOX_HOST void fill_blocks_plain(Key key, uint64_t counter, int64_t blocks, uint32_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < blocks; ++i) {
    const Block b = block_at(key, counter + static_cast<uint64_t>(i));
    out[4 * i + 0] = b.v[0];
    out[4 * i + 1] = b.v[1];
    out[4 * i + 2] = b.v[2];
    out[4 * i + 3] = b.v[3];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDRES_PHILOX_AVX2 1
#define FUSEDRES_PHILOX_AVX2_FN __attribute__((target("avx2"), always_inline)) inline

// Counter words (c0, c1, c2, c3) of 8 consecutive blocks, one block per 32-bit lane.
struct Lanes8 {
  __m256i c0, c1, c2, c3;
};

// The 8 blocks from 64-bit counter c: c0 = low words + lane, carried into the high words.
FUSEDRES_PHILOX_AVX2_FN Lanes8 lanes8_at(uint64_t c) {
  const __m256i low = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c)));
  const __m256i c0 = _mm256_add_epi32(low, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // Unsigned c0 < low (a carry) as a signed compare with the sign bits flipped: -1 per carry.
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(low, flip), _mm256_xor_si256(c0, flip));
  const __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32))), carry);
  return Lanes8{c0, c1, _mm256_setzero_si256(), _mm256_setzero_si256()};
}

// High words of a * m per 32-bit lane: vpmuludq multiplies the even lanes into 64-bit products;
// the odd lanes are moved down and multiplied too.
FUSEDRES_PHILOX_AVX2_FN __m256i mulhi8(__m256i a, __m256i m) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xF5), m);
  return _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
}

FUSEDRES_PHILOX_AVX2_FN void round8(Lanes8& s, __m256i k0, __m256i k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  const __m256i hi0 = mulhi8(s.c0, m0);
  const __m256i lo0 = _mm256_mullo_epi32(s.c0, m0);
  const __m256i hi1 = mulhi8(s.c2, m1);
  const __m256i lo1 = _mm256_mullo_epi32(s.c2, m1);
  s.c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, s.c1), k0);
  s.c1 = lo1;
  s.c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, s.c3), k1);
  s.c3 = lo0;
}

// The 8 blocks in element order (block-major: out[4 * block + lane]), a 4x8 transpose.
FUSEDRES_PHILOX_AVX2_FN void store8(const Lanes8& s, uint32_t* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(s.c0, s.c1);  // blocks 0, 1 | 4, 5: words 0 and 1
  const __m256i t1 = _mm256_unpackhi_epi32(s.c0, s.c1);  // blocks 2, 3 | 6, 7
  const __m256i t2 = _mm256_unpacklo_epi32(s.c2, s.c3);  // words 2 and 3
  const __m256i t3 = _mm256_unpackhi_epi32(s.c2, s.c3);
  const __m256i b04 = _mm256_unpacklo_epi64(t0, t2);
  const __m256i b15 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i b26 = _mm256_unpacklo_epi64(t1, t3);
  const __m256i b37 = _mm256_unpackhi_epi64(t1, t3);
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(b04, b15, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(b26, b37, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(b04, b15, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(b26, b37, 0x31));
}

// Runs `vectors` chains of 8 blocks each from `counter`, interleaved: one chain alone waits on
// its 10 dependent rounds.
template <int kVectors>
FUSEDRES_PHILOX_AVX2_FN void blocks8x(Key key, uint64_t counter, uint32_t* out) {
  Lanes8 s[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    s[v] = lanes8_at(counter + static_cast<uint64_t>(8 * v));
  }
  uint32_t k0 = key.k0;
  uint32_t k1 = key.k1;
  for (int round = 0; round < kRounds; ++round) {
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kVectors; ++v) {
      round8(s[v], vk0, vk1);
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  for (int v = 0; v < kVectors; ++v) {
    store8(s[v], out + 32 * v);
  }
}

// fill_blocks_plain for the largest multiple of 8 blocks <= blocks; returns that count.
__attribute__((target("avx2"))) inline int64_t fill_blocks_avx2(
    Key key, uint64_t counter, int64_t blocks, uint32_t* out) {
  int64_t i = 0;
  for (; i + 32 <= blocks; i += 32) {
    blocks8x<4>(key, counter + static_cast<uint64_t>(i), out + 4 * i);
  }
  for (; i + 8 <= blocks; i += 8) {
    blocks8x<1>(key, counter + static_cast<uint64_t>(i), out + 4 * i);
  }
  return i;
}

inline bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

}  // namespace detail

// bits(e) for e in [e_begin, e_begin + n) into out[0, n): one Philox evaluation per 4 elements,
// plus at most one more for a partial block at each end. e_begin >= 0.
FUSEDRES_PHILOX_HOST void fill_bits(Key key, uint64_t offset, int64_t e_begin, int64_t n, uint32_t* out) {
  if (n <= 0) {
    return;
  }
  uint64_t e = static_cast<uint64_t>(e_begin);
  const uint64_t end = e + static_cast<uint64_t>(n);
  if (e % 4 != 0) {  // the partial block at the start
    const Block b = block_at(key, offset + e / 4);
    for (; e % 4 != 0 && e < end; ++e) {
      *out++ = b.v[e % 4];
    }
  }
  int64_t blocks = static_cast<int64_t>((end - e) / 4);
  uint64_t counter = offset + e / 4;
  e += 4 * static_cast<uint64_t>(blocks);
#if defined(FUSEDRES_PHILOX_AVX2)
  if (blocks >= 8 && detail::has_avx2()) {
    const int64_t done = detail::fill_blocks_avx2(key, counter, blocks, out);
    out += 4 * done;
    counter += static_cast<uint64_t>(done);
    blocks -= done;
  }
#endif
  detail::fill_blocks_plain(key, counter, blocks, out);
  out += 4 * blocks;
  if (e < end) {  // the partial block at the end
    const Block b = block_at(key, offset + e / 4);
    for (int lane = 0; e < end; ++e, ++lane) {
      *out++ = b.v[lane];
    }
  }
}
#endif  // !defined(__CUDACC__)

}  // namespace fusedres::philox
