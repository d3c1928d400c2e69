// Add & Norm CUDA kernels: h = residual + dropout(x) * rowscale * colscale, y = norm(h) *
// (weight + weight_offset) + bias (LayerNorm or RMSNorm over the last dimension), the matching
// backward, and the in-place variant (h into residual, y into x). Arguments:
// fusedres/spec/add_norm.py. Eager spec: fusedres/reference/add_norm.py; what each feature
// computes, in which order: FEATURES-SPEC (issue 23).
//
// Both directions are memory bound (a handful of flops per element), so the design goal is one
// pass over HBM: every element of x/residual (forward) and dy/h/dh (backward) is read exactly
// once and every output written once. Rows are held in registers between the reductions and
// the output stage up to N = 16384 forward / 8192 backward (fp64: 8192 / 4096); longer rows
// fall back to kernels that re-read the row (mostly from L2), slower but correct for any N.
//
// Thread layout ("row group"): T threads own one row. Thread `lane` of the group owns the packs
// of 8 consecutive columns starting at column (k * T + lane) * 8, k < K, so for every k the
// group reads one contiguous, fully coalesced span of the row with 16-byte loads. T is a power
// of two <= 32 (several rows per warp, reductions are pure warp shuffles) or a multiple of 32
// (whole warps; the per-warp sums meet in shared memory). K is a compile-time constant, so the
// per-thread row slice is a fixed-size register array; T is chosen at run time from N, which
// keeps the number of template instantiations independent of N.
//
// Numerics: everything is accumulated in fp32 (fp64 for fp64 inputs). LayerNorm variance is a
// true two-pass computation over the register-resident row (mean first, then the sum of
// squared deviations), never E[h^2] - E[h]^2. Division is avoided (1/N is precomputed on the
// host in double) so --use_fast_math's approximate division never touches the results; the
// only transcendental is rsqrt, whose fast-math and IEEE forms are the same instruction
// (rsqrt.approx, <= 2 ulp) and which propagates NaN. No atomics anywhere: all reductions use a
// fixed tree / fixed order, so results are bitwise reproducible on the same device.
//
// Operands are (..., N) of any rank whose leading dimensions collapse into rows of one stride
// (row_stride, add_norm.h); outputs are contiguous. dweight/dbias/dcolscale go through
// fixed-size fp32 (fp64) partials, summed per column in a fixed order by param_grad_kernel,
// which also writes them in the parameter's dtype: the backward launches only its own kernels,
// no torch ops.
//
// Residual features (dropout, rowscale, colscale, weight_offset, the keep-mask output). Every
// kernel takes them through a compile-time flag, kFeatures, and within it through run-time
// fields (uniform branches), with argument structs of their own (FwdFeatureArgs,
// BwdFeatureArgs): the plain kernels are the code, with the parameter block, they were before
// the features. ptxas sizes a kernel for its heaviest path, and its register allocation of the
// plain kernels moved by up to 40% for a larger parameter block or one more kernel argument
// read (the plain register forward: 64 registers and a spill instead of 107, sm_90). The feature
// register kernels are instantiated for one access mode each (kAnyAccess, the access decided
// per pack; the backward's two-pack kernel kVecAccess, which alone fits its 128 registers),
// which halves their count. In place without features, the plain forward kernels run without
// statistics (kStats false). Dropout's mask is never stored for the backward: each thread
// regenerates the keep bits of the packs it owns from seed_offset (csrc/philox.h's counter
// layout: element e = row * N + col, whatever the strides), read from device memory inside the
// kernel (no host sync; a captured CUDA graph reads the values each replay's generator writes).
#include "add_norm.h"
#include "cuda/common.cuh"
#include "philox.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fusedres {
namespace {

using namespace fusedres::cuda;

// ---------------------------------------------------------------------------------------------
// Element types and conversions
// ---------------------------------------------------------------------------------------------

// Columns per pack: one 16-byte load for 16-bit types, two for fp32, four for fp64.
constexpr int kPack = 8;
// Largest block of the row kernels; __launch_bounds__ caps them at 128 registers per thread.
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
// Block size of the register row kernels when a row needs fewer threads than this (several
// rows per block). The backward uses bigger blocks: its partials are written once per block,
// so fewer, larger blocks mean less partial traffic for the same number of resident warps.
constexpr int kFwdRowsBlock = 256;
constexpr int kBwdRowsBlock = 512;

// How a kernel touches a row, fixed at compile time for the register kernels so that their
// hot path carries no dead scalar code (which would cost registers, hence occupancy):
//  kVecAccess:    every row start of every tensor of the launch is 16-byte aligned and
//                 n % 8 == 0, so a pack is either entirely inside the row (one, two or four
//                 16-byte accesses: 8 * sizeof(T) is a multiple of 16) or entirely outside.
//  kScalarAccess: anything else (odd N, odd row strides, offset views): masked element access.
//  kAnyAccess:    decided per pack at run time (long-row kernels, where it does not matter).
enum Access : int { kAnyAccess = 0, kVecAccess = 1, kScalarAccess = 2 };

// Packs per thread of the forward register kernel: it keeps one array of K * 8 values live
// (h). fp64 values take two registers each, hence half. (The backward keeps four such arrays
// and picks K = 1 or 2 per launch, see run_bwd.)
template <class X>
struct FwdPacks {
  static constexpr int value = 4;
};
template <>
struct FwdPacks<double> {
  static constexpr int value = 2;
};

// v rounded to T's precision and widened back to the accumulation type.
template <class T, class A>
__device__ __forceinline__ A round_to(A v) {
  return to_acc<A>(Cvt<T>::from(v));
}

// Run-time rounding of h for h dtypes that have no instantiation of their own (see
// add_norm_fwd_cuda): 1 = fp16, 2 = bf16, 3 = fp32 (only meaningful for fp64 accumulation).
template <class A>
__device__ __forceinline__ A round_mode(A v, int mode) {
  switch (mode) {
    case 1:
      return round_to<__half>(v);
    case 2:
      return round_to<__nv_bfloat16>(v);
    case 3:
      return round_to<float>(v);
    default:
      return v;
  }
}

// Scalar loads. Streams that are read exactly once (x, residual, dy, h, dh) use the
// evict-first hint so they do not push weight/bias (re-read by every row) out of L1/L2.
__device__ __forceinline__ float ld_stream(const float* p) { return __ldcs(p); }
__device__ __forceinline__ double ld_stream(const double* p) { return __ldcs(p); }
__device__ __forceinline__ __half ld_stream(const __half* p) {
  return __ushort_as_half(__ldcs(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ __nv_bfloat16 ld_stream(const __nv_bfloat16* p) {
  return __ushort_as_bfloat16(__ldcs(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float ld_cached(const float* p) { return __ldg(p); }
__device__ __forceinline__ double ld_cached(const double* p) { return __ldg(p); }
__device__ __forceinline__ __half ld_cached(const __half* p) {
  return __ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ __nv_bfloat16 ld_cached(const __nv_bfloat16* p) {
  return __ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// Whether column c + j of a pack starting at c exists.
template <int kAccess>
__device__ __forceinline__ bool in_row(int c, int j, int n) {
  return kAccess == kVecAccess ? c < n : c + j < n;
}

// Loads columns [c, c + 8) of a row into the accumulation type; columns >= n read as 0.
template <int kAccess, bool kStream, class T, class A>
__device__ __forceinline__ void load_pack(const T* __restrict__ row, int c, int n, bool vec, A (&out)[kPack]) {
  const bool full = kAccess == kVecAccess ? c < n : kAccess == kScalarAccess ? false : (vec && c + kPack <= n);
  if (full) {
    constexpr int kQ = static_cast<int>(sizeof(T)) * kPack / 16;
    const uint4* src = reinterpret_cast<const uint4*>(row + c);
    uint4 q[kQ];
#pragma unroll
    for (int i = 0; i < kQ; ++i) {
      q[i] = kStream ? __ldcs(src + i) : __ldg(src + i);
    }
    T vals[kPack];
    memcpy(vals, q, sizeof(vals));
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      out[j] = to_acc<A>(vals[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      out[j] = A(0);
      if (kAccess != kVecAccess && c + j < n) {
        out[j] = to_acc<A>(kStream ? ld_stream(row + c + j) : ld_cached(row + c + j));
      }
    }
  }
}

// Stores columns [c, c + 8) of a row, skipping columns >= n.
template <int kAccess, class T, class A>
__device__ __forceinline__ void store_pack(T* __restrict__ row, int c, int n, bool vec, const A (&v)[kPack]) {
  const bool full = kAccess == kVecAccess ? c < n : kAccess == kScalarAccess ? false : (vec && c + kPack <= n);
  T vals[kPack];
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    vals[j] = Cvt<T>::from(v[j]);
  }
  if (full) {
    constexpr int kQ = static_cast<int>(sizeof(T)) * kPack / 16;
    uint4 q[kQ];
    memcpy(q, vals, sizeof(q));
    uint4* dst = reinterpret_cast<uint4*>(row + c);
#pragma unroll
    for (int i = 0; i < kQ; ++i) {
      dst[i] = q[i];
    }
  } else if (kAccess != kVecAccess) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      if (c + j < n) {
        row[c + j] = vals[j];
      }
    }
  }
}

// Loads a pack of a tensor whose element type is X or float, chosen at run time (dh): a
// uniform branch is cheaper than doubling the instantiations for a rarely-mixed input.
template <int kAccess, class X, class A>
__device__ __forceinline__ void load_pack_x_or_f32(
    const void* base, int64_t row, int64_t stride, bool is_f32, int c, int n, bool vec, A (&out)[kPack]) {
  if (is_f32) {
    load_pack<kAccess, true>(static_cast<const float*>(base) + row * stride, c, n, vec, out);
  } else {
    load_pack<kAccess, true>(static_cast<const X*>(base) + row * stride, c, n, vec, out);
  }
}

// Stores a pack to a contiguous (rows, n) tensor of type X (mode 1) or float (mode 2).
template <int kAccess, class X, class A>
__device__ __forceinline__ void store_pack_x_or_f32(
    void* base, int64_t row, int n, int mode, int c, bool vec, const A (&v)[kPack]) {
  if (mode == 2) {
    store_pack<kAccess>(static_cast<float*>(base) + row * n, c, n, vec, v);
  } else {
    store_pack<kAccess>(static_cast<X*>(base) + row * n, c, n, vec, v);
  }
}

// Sums NV values over the T threads of each row group; every thread of the group gets the
// total. T is a power of two <= 32 (xor butterfly inside the warp: every lane computes the
// same additions, so all lanes hold bitwise-identical sums) or a multiple of 32 (butterfly per
// warp, then the warp sums are added in warp order from shared memory). The caller alternates
// between two `buf`s: a buffer is rewritten only after the next reduction's barrier, which
// every thread reaches after it has finished reading the buffer, so one barrier per reduction
// suffices.
template <int NV, class A>
__device__ __forceinline__ void group_sum(A (&v)[NV], int T, A (&buf)[NV][kMaxWarps]) {
  const int width = T < 32 ? T : 32;
  for (int off = width >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
    }
  }
  if (T <= 32) {
    return;
  }
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      buf[i][warp] = v[i];
    }
  }
  __syncthreads();
  const int nw = T >> 5;
  const int w0 = (static_cast<int>(threadIdx.x) / T) * nw;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    A s = buf[i][w0];
    for (int w = 1; w < nw; ++w) {
      s += buf[i][w0 + w];
    }
    v[i] = s;
  }
}

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// ---------------------------------------------------------------------------------------------
// Residual features
// ---------------------------------------------------------------------------------------------

// The residual features as the kernels read them; an absent one is a null pointer
// (weight_offset: 0, which the feature kernels add all the same, as the spec does).
template <class A>
struct Features {
  const int64_t* seed_offset;  // dropout's (seed, offset) in device memory; null: no dropout
  const void* rowscale;        // M elements of rowscale_code; null: none
  const void* colscale;        // N elements of colscale_code; null: none
  uint32_t threshold;          // philox::threshold(p): elements with bits below it are dropped
  A keep_scale;                // 1 / (1 - p) in double, rounded once to A
  A weight_offset;
  int rowscale_code;
  int colscale_code;
};

// Loads a pack of a tensor whose dtype is known only at run time (colscale): a uniform switch.
template <int kAccess, class A>
__device__ __forceinline__ void load_pack_any(const void* p, int code, int c, int n, bool vec, A (&out)[kPack]) {
  switch (code) {
    case kF64:
      load_pack<kAccess, false>(static_cast<const double*>(p), c, n, vec, out);
      break;
    case kF16:
      load_pack<kAccess, false>(static_cast<const __half*>(p), c, n, vec, out);
      break;
    case kBF16:
      load_pack<kAccess, false>(static_cast<const __nv_bfloat16*>(p), c, n, vec, out);
      break;
    default:
      load_pack<kAccess, false>(static_cast<const float*>(p), c, n, vec, out);
  }
}

// The keep bits of the 8 elements e, e + 1, ... (bit j: element e + j), all set without
// dropout: csrc/philox.h's blocks from the one holding element e (two blocks, three when e % 4
// != 0, as philox::bits_run<8> draws them), each compared with the threshold as soon as it is
// drawn, so only one block's words are live (bits_run keeps 8 words and two blocks: they cost the
// long-row kernel its third resident block). seed and offset are read here, from device memory
// (L1-resident after the first pack).
template <class A>
__device__ __forceinline__ uint32_t keep_pack(const Features<A>& f, uint64_t e) {
  if (f.seed_offset == nullptr) {
    return 0xFFu;
  }
  const auto* so = reinterpret_cast<const unsigned long long*>(f.seed_offset);
  const philox::Key key = philox::key_of(__ldg(so));
  const uint64_t first = __ldg(so + 1) + e / 4;
  const unsigned shift = static_cast<unsigned>(e % 4);
  uint32_t keep = 0;  // bit 4b + lane: element 4 * (e / 4 + b) + lane
#pragma unroll
  for (int b = 0; b < 3; ++b) {
    if (b < 2 || shift != 0) {
      const philox::Block blk = philox::block_at(key, first + static_cast<uint64_t>(b));
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        keep |= static_cast<uint32_t>(blk.v[lane] >= f.threshold) << (4 * b + lane);
      }
    }
  }
  return (keep >> shift) & 0xFFu;
}

// The keep bits of the K packs a thread owns in a row of a register kernel (bits 8k..8k+7: the
// pack at column (k * T + lane) * 8), one register for the whole slice; packs past the row
// draw nothing.
template <int K, class A>
__device__ __forceinline__ uint32_t keep_bits(const Features<A>& f, int64_t row, int n, int lane, int T) {
  static_assert(K * kPack <= 32, "one bit per element of a thread's row slice");
  if (f.seed_offset == nullptr) {
    return 0xFFFFFFFFu;
  }
  uint32_t keep = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (k * T + lane) * kPack;
    if (c < n) {
      keep |= keep_pack(f, static_cast<uint64_t>(row * n + c)) << (k * kPack);
    }
  }
  return keep;
}

// rowscale[row] in A (1 without rowscale).
template <class A>
__device__ __forceinline__ A row_scale(const Features<A>& f, int64_t row) {
  return f.rowscale != nullptr ? static_cast<A>(ld_any(f.rowscale, f.rowscale_code, row)) : A(1);
}

// x's branch of one pack, in the spec's order: v = ((v * (kept ? 1/(1-p) : 0)) * rowscale) *
// colscale (colscale only when `with_colscale`). A dropped NaN or Inf stays NaN, as F.dropout's
// multiply by 0 leaves it. keep8: the pack's keep bits; rs: the row's rowscale.
template <int kAccess, class A>
__device__ __forceinline__ void scale_branch(
    const Features<A>& f, uint32_t keep8, A rs, bool with_colscale, int c, int n, bool vec, A (&v)[kPack]) {
  if (f.seed_offset != nullptr) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      v[j] *= (keep8 >> j) & 1u ? f.keep_scale : A(0);
    }
  }
  if (f.rowscale != nullptr) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      v[j] *= rs;
    }
  }
  if (with_colscale && f.colscale != nullptr) {
    A s[kPack];
    load_pack_any<kAccess>(f.colscale, f.colscale_code, c, n, vec, s);
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      v[j] *= s[j];
    }
  }
}

// Four keep bits as four bools (bytes 0 / 1), little-endian.
__device__ __forceinline__ uint32_t bools4(uint32_t b) {
  return (b & 1u) | ((b & 2u) << 7) | ((b & 4u) << 14) | ((b & 8u) << 21);
}

// Stores a pack's keep bits as bools into a contiguous row of n (8-byte stores when vec8: n % 8
// == 0 and the mask 8-byte aligned), skipping columns >= n.
__device__ __forceinline__ void store_mask_pack(bool* row, int c, int n, bool vec8, uint32_t keep8) {
  if (vec8 && c + kPack <= n) {
    *reinterpret_cast<uint2*>(row + c) = make_uint2(bools4(keep8 & 0xFu), bools4((keep8 >> 4) & 0xFu));
    return;
  }
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    if (c + j < n) {
      row[c + j] = ((keep8 >> j) & 1u) != 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <class X, class R, class H, class W>
struct FwdArgs {
  using A = acc_t<X>;
  const X* x;
  const R* r;  // null without residual
  const W* w;  // null without weight
  const W* b;  // null without bias
  X* y;        // contiguous (rows, n); may be x itself (in place)
  H* h;        // contiguous (rows, n); unused unless store_h; may be the residual (in place)
  A* mean;     // (rows,), LayerNorm only; null in place
  A* rstd;     // (rows,); null in place
  int64_t rows;
  int64_t x_stride;
  int64_t r_stride;
  int n;
  int T;  // threads per row
  int G;  // rows per block (register kernel)
  A eps;
  A inv_n;
  int hround;  // extra rounding of h, see round_mode
  bool rms;
  bool has_r;
  bool store_h;
  bool vec;
};

// The feature kernels' arguments: the plain ones and the features. A struct of its own, so that
// the plain kernels keep their parameter block: ptxas allocates the plain register forward very
// differently (64 registers and a spill instead of 107, sm_90) once FwdArgs grows past 128 bytes.
template <class X, class R, class H, class W>
struct FwdFeatureArgs : FwdArgs<X, R, H, W> {
  bool* mask;  // contiguous (rows, n) keep-mask; null unless store_mask
  Features<acc_t<X>> f;
  bool mask_vec;   // the mask takes 8-byte stores
  int stats_lane;  // the lane of a row group that writes its statistics; -1 (none) in place
};

// Which lane of a row group writes the row's statistics: lane 0, none in place (kStats false),
// or the feature kernels' run-time choice. (The plain kernels test no pointer and read no lane
// from their arguments: either costs the plain register forward up to 32 registers.)
template <bool kFeatures, bool kStats, class Args>
__device__ __forceinline__ bool writes_stats(const Args& a, int lane) {
  if constexpr (kFeatures) {
    return lane == a.stats_lane;
  } else {
    return kStats && lane == 0;
  }
}

template <bool kFeatures, class X, class R, class H, class W>
using FwdArgsOf = std::conditional_t<kFeatures, FwdFeatureArgs<X, R, H, W>, FwdArgs<X, R, H, W>>;

// h for one pack of the long-row kernel: (x's branch + residual) in the accumulation type,
// rounded to h's dtype. Eager rounds h to h_dtype before normalizing, so the rounding happens
// even when h is not stored. Returns the pack's keep bits (rs: the row's rowscale).
template <int kAccess, bool kFeatures, class Args, class X, class R, class A>
__device__ __forceinline__ uint32_t h_pack(
    const Args& a, const X* xrow, const R* rrow, int64_t row, A rs, int c, A (&v)[kPack]) {
  using H = std::remove_cv_t<std::remove_pointer_t<decltype(a.h)>>;
  load_pack<kAccess, true>(xrow, c, a.n, a.vec, v);
  uint32_t keep8 = 0xFFu;
  if constexpr (kFeatures) {
    keep8 = keep_pack(a.f, static_cast<uint64_t>(row * a.n + c));
    scale_branch<kAccess>(a.f, keep8, rs, true, c, a.n, a.vec, v);
  }
  if (a.has_r) {
    A t[kPack];
    load_pack<kAccess, true>(rrow, c, a.n, a.vec, t);
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      v[j] += t[j];
    }
  }
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    v[j] = round_to<H>(v[j]);
  }
  if (a.hround != 0) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      v[j] = round_mode(v[j], a.hround);
    }
  }
  return keep8;
}

// y for one pack; kFeatures: weight + weight_offset (the feature kernels add the offset even
// when it is 0, as the spec does: the plain kernels stay bitwise eager's F.layer_norm).
template <int kAccess, bool kFeatures, class Args, class X, class A>
__device__ __forceinline__ void y_pack(const Args& a, X* yrow, int c, A mean, A rstd, const A (&v)[kPack]) {
  A out[kPack];
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    out[j] = (v[j] - mean) * rstd;
  }
  if (a.w != nullptr) {
    A t[kPack];
    load_pack<kAccess, false>(a.w, c, a.n, a.vec, t);
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      if constexpr (kFeatures) {
        out[j] *= t[j] + a.f.weight_offset;
      } else {
        out[j] *= t[j];
      }
    }
  }
  if (a.b != nullptr) {
    A t[kPack];
    load_pack<kAccess, false>(a.b, c, a.n, a.vec, t);
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      out[j] += t[j];
    }
  }
  store_pack<kAccess>(yrow, c, a.n, a.vec, out);
}

// Minimum resident blocks per SM hinted to ptxas for the register forward (0: no hint). Given
// only the 512-thread bound, ptxas fits the fp64 kernel into 64 registers (two blocks per SM)
// and spills on sm_80; one block per SM lets it keep the row in registers (fp64 is the
// gradcheck path, not a bandwidth-critical one). The in-place plain kernels (kStats false) and
// the feature kernels get the same hint: without it ptxas fits some of them into 64 (long rows:
// 40) registers with a spill on sm_90. The plain kernels keep the bound they had.
template <class X, bool kFeatures, bool kStats>
constexpr int kFwdMinBlocks = std::is_same_v<X, double> || kFeatures || !kStats ? 1 : 0;

// Register-resident forward: each row group loads its row once (all K packs of x, then of the
// residual, issued back to back so a thread has K * 16..64 bytes in flight), keeps h in
// registers through both reductions and writes y (and h) from registers. HBM traffic is the
// minimum: read x and residual, write y, h (optional) and two floats of statistics per row.
// kFeatures: x's branch is scaled (dropout, rowscale, colscale) before the add. The Philox
// blocks of a thread's packs are computed after x's loads are issued, so they overlap their
// latency; the keep bits of the whole slice stay in one register (K * 8 <= 32).
template <int kAccess, bool kFeatures, bool kStats, class X, class R, class H, class W>
__global__ void __launch_bounds__(kMaxThreads, kFwdMinBlocks<X, kFeatures, kStats>)
    add_norm_fwd_rows_kernel(const FwdArgsOf<kFeatures, X, R, H, W> a) {
  using A = acc_t<X>;
  constexpr int K = FwdPacks<X>::value;
  __shared__ A red[2][1][kMaxWarps];
  const int T = a.T;
  const int G = a.G;
  const int n = a.n;
  const int g = static_cast<int>(threadIdx.x) / T;
  const int lane = static_cast<int>(threadIdx.x) - g * T;
  int pp = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * G; base < a.rows;
      base += static_cast<int64_t>(gridDim.x) * G) {
    // Groups past the last row recompute the last row (their loads stay in bounds and the
    // warp shuffles / barriers stay uniform) and store nothing.
    const bool valid = base + g < a.rows;
    const int64_t row = valid ? base + g : a.rows - 1;
    const X* xrow = a.x + row * a.x_stride;
    const R* rrow = a.has_r ? a.r + row * a.r_stride : nullptr;

    A v[K][kPack];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      load_pack<kAccess, true>(xrow, (k * T + lane) * kPack, n, a.vec, v[k]);
    }
    uint32_t keep = 0xFFFFFFFFu;
    if constexpr (kFeatures) {
      keep = keep_bits<K>(a.f, row, n, lane, T);
      const A rs = row_scale(a.f, row);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        scale_branch<kAccess>(a.f, keep >> (k * kPack), rs, true, (k * T + lane) * kPack, n, a.vec, v[k]);
      }
    }
    if (a.has_r) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        A t[kPack];
        load_pack<kAccess, true>(rrow, (k * T + lane) * kPack, n, a.vec, t);
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          v[k][j] += t[j];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        v[k][j] = round_to<H>(v[k][j]);
      }
    }
    if (a.hround != 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          v[k][j] = round_mode(v[k][j], a.hround);
        }
      }
    }
    if (a.store_h && valid) {
      H* hrow = a.h + row * n;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = (k * T + lane) * kPack;
        if (c < n) {
          store_pack<kAccess>(hrow, c, n, a.vec, v[k]);
        }
      }
    }
    if constexpr (kFeatures) {
      if (a.mask != nullptr && valid) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = (k * T + lane) * kPack;
          if (c < n) {
            store_mask_pack(a.mask + row * n, c, n, a.mask_vec, keep >> (k * kPack));
          }
        }
      }
    }

    // Columns >= n hold 0, so they do not disturb the sum; the deviation pass masks them.
    A mean = A(0);
    if (!a.rms) {
      A s[1] = {A(0)};
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          s[0] += v[k][j];
        }
      }
      group_sum<1>(s, T, red[pp]);
      pp ^= 1;
      mean = s[0] * a.inv_n;
    }
    A ss[1] = {A(0)};
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * T + lane) * kPack;
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const A d = v[k][j] - mean;
        ss[0] += in_row<kAccess>(c, j, n) ? d * d : A(0);
      }
    }
    group_sum<1>(ss, T, red[pp]);
    pp ^= 1;
    const A rstd = rsqrt_acc(ss[0] * a.inv_n + a.eps);

    if (valid) {
      if (writes_stats<kFeatures, kStats>(a, lane)) {
        if (!a.rms) {
          a.mean[row] = mean;
        }
        a.rstd[row] = rstd;
      }
      X* yrow = a.y + row * n;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = (k * T + lane) * kPack;
        if (c < n) {
          y_pack<kAccess, kFeatures>(a, yrow, c, mean, rstd, v[k]);
        }
      }
    }
  }
}

// Rows too long for registers: one block per row, the row is re-read for every pass (sum,
// sum of squared deviations, output). The re-reads mostly hit L2; h is recomputed
// bit-identically in every pass (dropout's bits included), so the maths is exactly that of the
// register kernel. In place (y is x, h is the residual) it stays correct: only the last pass
// writes, and each thread writes a pack right after reading it, and reads no pack after that.
// The long-row forward's hint, by the same rule as kFwdMinBlocks (the plain kernels: none).
template <bool kFeatures, bool kStats>
constexpr int kLongMinBlocks = kFeatures || !kStats ? 1 : 0;

template <bool kFeatures, bool kStats, class X, class R, class H, class W>
__global__ void __launch_bounds__(kMaxThreads, kLongMinBlocks<kFeatures, kStats>)
    add_norm_fwd_long_rows_kernel(const FwdArgsOf<kFeatures, X, R, H, W> a) {
  using A = acc_t<X>;
  __shared__ A red[2][1][kMaxWarps];
  const int n = a.n;
  const int T = static_cast<int>(blockDim.x);
  const int stride = T * kPack;
  int pp = 0;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const X* xrow = a.x + row * a.x_stride;
    const R* rrow = a.has_r ? a.r + row * a.r_stride : nullptr;
    A rs = A(1);
    if constexpr (kFeatures) {
      rs = row_scale(a.f, row);
    }
    A mean = A(0);
    if (!a.rms) {
      A s[1] = {A(0)};
      for (int c = static_cast<int>(threadIdx.x) * kPack; c < n; c += stride) {
        A v[kPack];
        h_pack<kAnyAccess, kFeatures>(a, xrow, rrow, row, rs, c, v);
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          s[0] += v[j];
        }
      }
      group_sum<1>(s, T, red[pp]);
      pp ^= 1;
      mean = s[0] * a.inv_n;
    }
    A ss[1] = {A(0)};
    for (int c = static_cast<int>(threadIdx.x) * kPack; c < n; c += stride) {
      A v[kPack];
      h_pack<kAnyAccess, kFeatures>(a, xrow, rrow, row, rs, c, v);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const A d = v[j] - mean;
        ss[0] += (c + j < n) ? d * d : A(0);
      }
    }
    group_sum<1>(ss, T, red[pp]);
    pp ^= 1;
    const A rstd = rsqrt_acc(ss[0] * a.inv_n + a.eps);
    if (writes_stats<kFeatures, kStats>(a, static_cast<int>(threadIdx.x))) {
      if (!a.rms) {
        a.mean[row] = mean;
      }
      a.rstd[row] = rstd;
    }
    X* yrow = a.y + row * n;
    for (int c = static_cast<int>(threadIdx.x) * kPack; c < n; c += stride) {
      A v[kPack];
      const uint32_t keep8 = h_pack<kAnyAccess, kFeatures>(a, xrow, rrow, row, rs, c, v);
      if (a.store_h) {
        store_pack<kAnyAccess>(a.h + row * n, c, n, a.vec, v);
      }
      if constexpr (kFeatures) {
        if (a.mask != nullptr) {
          store_mask_pack(a.mask + row * n, c, n, a.mask_vec, keep8);
        }
      }
      y_pack<kAnyAccess, kFeatures>(a, yrow, c, mean, rstd, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <class X, class H, class W>
struct BwdArgs {
  using A = acc_t<X>;
  const X* dy;
  const void* dh;  // X or float (dh_f32); null without dh
  const H* h;
  const W* w;  // null without weight
  const A* mean;
  const A* rstd;
  X* dx;       // contiguous (rows, n)
  void* dres;  // contiguous (rows, n) of X (dres_mode 1) or float (2); unused for mode 0
  A* pw;       // (blocks, n) dweight partials; null without weight
  A* pb;       // (blocks, n) dbias partials; null without bias
  int64_t rows;
  int64_t dy_stride;
  int64_t dh_stride;
  int64_t h_stride;
  int64_t rows_per_block;
  int n;
  int T;
  int G;
  A inv_n;
  int dres_mode;
  bool rms;
  bool dh_f32;
  bool vec;
};

// The feature kernels' arguments (and the column kernel's): the plain ones and the features, a
// struct of its own so that the plain kernels keep their parameter block (see FwdFeatureArgs).
template <class X, class H, class W>
struct BwdFeatureArgs : BwdArgs<X, H, W> {
  const void* x;    // X or float (x_f32): the forward's x, for dcolscale; null without
  acc_t<X>* pc;     // (blocks, n) dcolscale partials; null without colscale_grad
  acc_t<X>* row_c;  // long rows with dcolscale: c1, c2 of each row, for the column kernel
  Features<acc_t<X>> f;
  int64_t x_stride;
  bool x_f32;
};

template <bool kFeatures, class X, class H, class W>
using BwdArgsOf = std::conditional_t<kFeatures, BwdFeatureArgs<X, H, W>, BwdArgs<X, H, W>>;

// Backward of y = xhat * w + b with xhat = (h - mean) * rstd (RMSNorm: mean = 0), per row of
// N elements, with g = dy * w (g = dy without weight):
//
//   dL/dh_i = rstd * (g_i - mean_j(g_j) - xhat_i * mean_j(g_j * xhat_j))            LayerNorm
//   dL/dh_i = rstd * (g_i - xhat_i * mean_j(g_j * xhat_j))                          RMSNorm
//
// (differentiate xhat_i = (h_i - mu) * rstd through mu = mean(h) and
// rstd = (var + eps)^-1/2: dmu/dh_j = 1/N, drstd/dh_j = -rstd^3 (h_j - mu) / N; for RMSNorm
// mu = 0 and drstd/dh_j = -rstd^3 h_j / N.) With c1 = mean(g * xhat), c2 = mean(g) (0 for
// RMSNorm): dL/dh = (g - (xhat * c1 + c2)) * rstd + dh, where dh is the gradient flowing into h
// directly (prenorm output). Since h = residual + branch(x), dresidual = dL/dh and
// dx = branch'(dL/dh): dL/dh itself, or with the features dL/dh * (kept ? 1/(1-p) : 0) *
// rowscale * colscale. dweight_i = sum over rows of dy_i * xhat_i (weight_offset adds to w in g,
// not to dweight), dbias_i = sum over rows of dy_i, dcolscale_i = sum over rows of
// dL/dh_i * x_i * (kept ? 1/(1-p) : 0) * rowscale.
//
// The kernel computes u = g * rstd + dh before the row reduction, then
// dL/dh = u - (xhat * c1 + c2) * rstd after it: the same value, but dh's loads are issued with
// dy's and h's (one batch of loads in flight per row instead of two round trips) and g is not
// kept live across the reduction.
//
// Each block owns a contiguous range of rows and each thread a fixed set of columns, so the
// dweight/dbias partials of those columns live in registers for the whole range and reach
// memory once per block: HBM traffic is read dy, h, dh, write dx (+ dresidual), plus
// blocks * N partials written and re-read by param_grad_kernel (one wave of blocks: 1-2 per SM,
// i.e. 2-4% of the row traffic at M = 16384, less for larger M). The G row groups of a block
// (G > 1 when a row needs at most half a block) are combined in shared memory in group order,
// so the partials are deterministic; param_grad_kernel then adds the blocks in a fixed order.
//
// kFeatures: the keep bits are drawn right after the loads are issued (they overlap their
// latency; one register holds them across the reduction). dcolscale's partials accumulate in
// shared memory, in the slot layout the groups are combined in (slot = group * span + column,
// each slot owned by one thread, added to in row order: no barrier until the end, and no
// registers: three register partials of K = 2 packs would not fit 128 registers). x is loaded
// only after the reduction, where dcolscale needs it, so it is not live across it.
template <int kAccess, int K, bool kFeatures, class X, class H, class W>
__global__ void __launch_bounds__(kMaxThreads) add_norm_bwd_rows_kernel(const BwdArgsOf<kFeatures, X, H, W> a) {
  using A = acc_t<X>;
  constexpr int kSlots = kBwdRowsBlock * K * kPack;
  __shared__ A red[2][2][kMaxWarps];
  __shared__ A comb[kSlots];  // dcolscale's partials, then the groups' combination
  const int T = a.T;
  const int G = a.G;
  const int n = a.n;
  const int g = static_cast<int>(threadIdx.x) / T;
  const int lane = static_cast<int>(threadIdx.x) - g * T;
  const int span = T * K * kPack;  // columns covered by one group (>= n)
  A* pc = nullptr;                 // dcolscale's partials
  if constexpr (kFeatures) {
    pc = a.pc;
  }
  const bool dcol = pc != nullptr;

  A dw[K][kPack];
  A db[K][kPack];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      dw[k][j] = A(0);
      db[k][j] = A(0);
      if (dcol) {
        comb[g * span + (k * T + lane) * kPack + j] = A(0);
      }
    }
  }

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int64_t r1 = r0 + a.rows_per_block < a.rows ? r0 + a.rows_per_block : a.rows;
  int pp = 0;
  for (int64_t base = r0; base < r1; base += G) {
    // Groups past the block's last row redo that row with dy treated as 0 (so nothing reaches
    // the partials) and store nothing; this keeps shuffles and barriers uniform.
    const bool valid = base + g < r1;
    const int64_t row = valid ? base + g : r1 - 1;
    const A rs = a.rstd[row];
    const A mu = a.rms ? A(0) : a.mean[row];
    const H* hrow = a.h + row * a.h_stride;
    const X* dyrow = a.dy + row * a.dy_stride;

    // The keep bits: drawn while the loads are in flight, except in fp64 (the gradcheck path),
    // whose row in flight takes twice the registers: there Philox's temporaries would push the
    // kernel past the 128 registers of a 512-thread block (a spill on sm_80), so they come first.
    constexpr bool kBitsFirst = kFeatures && std::is_same_v<X, double>;
    uint32_t keep = 0xFFFFFFFFu;
    if constexpr (kBitsFirst) {
      keep = keep_bits<K>(a.f, row, n, lane, T);
    }
    A xh[K][kPack];  // h, then xhat
    A u[K][kPack];   // dy, then g * rstd + dh
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * T + lane) * kPack;
      load_pack<kAccess, true>(hrow, c, n, a.vec, xh[k]);
      load_pack<kAccess, true>(dyrow, c, n, a.vec, u[k]);
    }
    if constexpr (kFeatures && !kBitsFirst) {
      keep = keep_bits<K>(a.f, row, n, lane, T);
    }
    A s[2] = {A(0), A(0)};  // sum(g * xhat), sum(g)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * T + lane) * kPack;
      A wv[kPack];
      if (a.w != nullptr) {
        load_pack<kAccess, false>(a.w, c, n, a.vec, wv);
        if constexpr (kFeatures) {
#pragma unroll
          for (int j = 0; j < kPack; ++j) {
            wv[j] += a.f.weight_offset;
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          wv[j] = A(1);
        }
      }
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        // Padding columns (h = dy = 0 there, but xhat would be -mu * rstd) and the duplicate
        // row of a group past the range contribute exact zeros, even if that row is NaN.
        const bool live = valid && in_row<kAccess>(c, j, n);
        const A xhat = live ? (xh[k][j] - mu) * rs : A(0);
        const A d = live ? u[k][j] : A(0);
        dw[k][j] += d * xhat;
        db[k][j] += d;
        const A gw = d * wv[j];
        s[0] += gw * xhat;
        s[1] += gw;
        xh[k][j] = xhat;
        u[k][j] = gw * rs;
      }
    }
    if (a.dh != nullptr) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        A t[kPack];
        load_pack_x_or_f32<kAccess, X>(a.dh, row, a.dh_stride, a.dh_f32, (k * T + lane) * kPack, n, a.vec, t);
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          u[k][j] += t[j];
        }
      }
    }
    group_sum<2>(s, T, red[pp]);
    pp ^= 1;
    const A c1 = s[0] * a.inv_n;
    const A c2 = a.rms ? A(0) : s[1] * a.inv_n;
    if (valid) {
      A row_s = A(1);
      if constexpr (kFeatures) {
        row_s = row_scale(a.f, row);
      }
      X* dxrow = a.dx + row * n;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = (k * T + lane) * kPack;
        if (c < n) {
          A out[kPack];  // dL/dh, then dx
#pragma unroll
          for (int j = 0; j < kPack; ++j) {
            out[j] = u[k][j] - (xh[k][j] * c1 + c2) * rs;
          }
          if constexpr (!kFeatures) {  // dx is dL/dh (stored first, as before the features)
            store_pack<kAccess>(dxrow, c, n, a.vec, out);
          }
          if (a.dres_mode != 0) {
            store_pack_x_or_f32<kAccess, X>(a.dres, row, n, a.dres_mode, c, a.vec, out);
          }
          if constexpr (kFeatures) {
            if (dcol) {
              A t[kPack];
              load_pack_x_or_f32<kAccess, X>(a.x, row, a.x_stride, a.x_f32, c, n, a.vec, t);
#pragma unroll
              for (int j = 0; j < kPack; ++j) {
                t[j] *= out[j];
              }
              scale_branch<kAccess>(a.f, keep >> (k * kPack), row_s, false, c, n, a.vec, t);
              A* slot = comb + g * span + c;
#pragma unroll
              for (int j = 0; j < kPack; ++j) {
                slot[j] += in_row<kAccess>(c, j, n) ? t[j] : A(0);
              }
            }
            scale_branch<kAccess>(a.f, keep >> (k * kPack), row_s, true, c, n, a.vec, out);
            store_pack<kAccess>(dxrow, c, n, a.vec, out);
          }
        }
      }
    }
  }

  if (a.pw == nullptr && a.pb == nullptr && !dcol) {
    return;
  }
  if (G == 1) {
    // Every column < n belongs to exactly one thread: write the registers (and its own
    // dcolscale slots) directly.
    const int64_t off = static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * T + lane) * kPack;
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        if (c + j < n) {
          if (a.pw != nullptr) {
            a.pw[off + c + j] = dw[k][j];
          }
          if (a.pb != nullptr) {
            a.pb[off + c + j] = db[k][j];
          }
          if (dcol) {
            pc[off + c + j] = comb[c + j];
          }
        }
      }
    }
    return;
  }
  // G > 1 only when blockDim == kBwdRowsBlock: combine the groups' partials in shared
  // memory, slot = column, groups added in order 0..G-1 (dcolscale's are there already).
  const int lim = n < span ? n : span;
  for (int which = dcol ? -1 : 0; which < 2; ++which) {
    A* dst = which < 0 ? pc : which == 0 ? a.pw : a.pb;
    if (dst == nullptr) {
      continue;
    }
    dst += static_cast<int64_t>(blockIdx.x) * n;
    __syncthreads();  // previous round's readers (or dcolscale's writers) are done with comb
    if (which >= 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          comb[g * span + (k * T + lane) * kPack + j] = which == 0 ? dw[k][j] : db[k][j];
        }
      }
      __syncthreads();
    }
    for (int col = static_cast<int>(threadIdx.x); col < lim; col += static_cast<int>(blockDim.x)) {
      A acc = comb[col];
      for (int gg = 1; gg < G; ++gg) {
        acc += comb[gg * span + col];
      }
      dst[col] = acc;
    }
  }
}

// Rows too long for registers: one block per row, two passes over the row (row sums, then
// dx), the second one mostly from L2. dweight/dbias/dcolscale come from add_norm_bwd_cols_kernel
// (dcolscale from each row's c1, c2, left in row_c).
template <bool kFeatures, class X, class H, class W>
__global__ void __launch_bounds__(kMaxThreads) add_norm_bwd_long_rows_kernel(const BwdArgsOf<kFeatures, X, H, W> a) {
  using A = acc_t<X>;
  __shared__ A red[2][2][kMaxWarps];
  const int n = a.n;
  const int T = static_cast<int>(blockDim.x);
  const int stride = T * kPack;
  A w_off = A(0);
  if constexpr (kFeatures) {
    w_off = a.f.weight_offset;
  }
  int pp = 0;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const A rs = a.rstd[row];
    const A mu = a.rms ? A(0) : a.mean[row];
    const H* hrow = a.h + row * a.h_stride;
    const X* dyrow = a.dy + row * a.dy_stride;
    A s[2] = {A(0), A(0)};
    for (int c = static_cast<int>(threadIdx.x) * kPack; c < n; c += stride) {
      A hv[kPack], d[kPack], wv[kPack];
      load_pack<kAnyAccess, true>(hrow, c, n, a.vec, hv);
      load_pack<kAnyAccess, true>(dyrow, c, n, a.vec, d);
      if (a.w != nullptr) {
        load_pack<kAnyAccess, false>(a.w, c, n, a.vec, wv);
      }
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const A xhat = (c + j < n) ? (hv[j] - mu) * rs : A(0);
        const A gw = a.w != nullptr ? d[j] * (kFeatures ? wv[j] + w_off : wv[j]) : d[j];
        s[0] += gw * xhat;
        s[1] += gw;
      }
    }
    group_sum<2>(s, T, red[pp]);
    pp ^= 1;
    const A c1 = s[0] * a.inv_n;
    const A c2 = a.rms ? A(0) : s[1] * a.inv_n;
    A row_s = A(1);
    if constexpr (kFeatures) {
      if (a.row_c != nullptr && threadIdx.x == 0) {
        a.row_c[2 * row] = c1;
        a.row_c[2 * row + 1] = c2;
      }
      row_s = row_scale(a.f, row);
    }
    X* dxrow = a.dx + row * n;
    for (int c = static_cast<int>(threadIdx.x) * kPack; c < n; c += stride) {
      A hv[kPack], d[kPack], wv[kPack], t[kPack];
      load_pack<kAnyAccess, false>(hrow, c, n, a.vec, hv);  // second read: keep it cacheable
      load_pack<kAnyAccess, false>(dyrow, c, n, a.vec, d);
      if (a.w != nullptr) {
        load_pack<kAnyAccess, false>(a.w, c, n, a.vec, wv);
      }
      if (a.dh != nullptr) {
        load_pack_x_or_f32<kAnyAccess, X>(a.dh, row, a.dh_stride, a.dh_f32, c, n, a.vec, t);
      }
      A out[kPack];  // dL/dh, then dx
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const A xhat = (hv[j] - mu) * rs;
        const A gw = a.w != nullptr ? d[j] * (kFeatures ? wv[j] + w_off : wv[j]) : d[j];
        out[j] = (gw - (xhat * c1 + c2)) * rs;
        if (a.dh != nullptr) {
          out[j] += t[j];
        }
      }
      if constexpr (!kFeatures) {  // dx is dL/dh (stored first, as before the features)
        store_pack<kAnyAccess>(dxrow, c, n, a.vec, out);
      }
      if (a.dres_mode != 0) {
        store_pack_x_or_f32<kAnyAccess, X>(a.dres, row, n, a.dres_mode, c, a.vec, out);
      }
      if constexpr (kFeatures) {
        const uint32_t keep8 = keep_pack(a.f, static_cast<uint64_t>(row * n + c));
        scale_branch<kAnyAccess>(a.f, keep8, row_s, true, c, n, a.vec, out);
        store_pack<kAnyAccess>(dxrow, c, n, a.vec, out);
      }
    }
  }
}

// Element i of a tensor of type X or float (chosen at run time), in A.
template <class X, class A>
__device__ __forceinline__ A ld_x_or_f32(const void* base, bool is_f32, int64_t i) {
  return is_f32 ? to_acc<A>(ld_stream(static_cast<const float*>(base) + i))
                : to_acc<A>(ld_stream(static_cast<const X*>(base) + i));
}

// Column partials for rows too long for the register kernel: thread = column, block
// (x, y) = (256 columns, chunk of rows); reads dy and h once more (and for dcolscale dh and x,
// recomputing dL/dh from the row's c1, c2 exactly as the long-row kernel formed it, and each
// element's keep bit on its own). Partials (chunks, n).
template <class X, class H, class W>
__global__ void __launch_bounds__(256) add_norm_bwd_cols_kernel(const BwdFeatureArgs<X, H, W> a) {
  using A = acc_t<X>;
  const int n = a.n;
  const int col = static_cast<int>(blockIdx.x) * 256 + static_cast<int>(threadIdx.x);
  if (col >= n) {
    return;
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * a.rows_per_block;
  const int64_t r1 = r0 + a.rows_per_block < a.rows ? r0 + a.rows_per_block : a.rows;
  const bool dcol = a.pc != nullptr;
  A wc = A(1);  // the column's weight + weight_offset (dcolscale only)
  if (dcol && a.w != nullptr) {
    wc = to_acc<A>(ld_cached(a.w + col)) + a.f.weight_offset;
  }
  A sw = A(0);
  A sb = A(0);
  A sc = A(0);
  if (!dcol) {
#pragma unroll 4
    for (int64_t row = r0; row < r1; ++row) {
      const A d = to_acc<A>(ld_stream(a.dy + row * a.dy_stride + col));
      const A hv = to_acc<A>(ld_stream(a.h + row * a.h_stride + col));
      const A mu = a.rms ? A(0) : __ldg(a.mean + row);
      const A xhat = (hv - mu) * __ldg(a.rstd + row);
      sw += d * xhat;
      sb += d;
    }
  } else {
    // Its own loop: the unrolled one above keeps 4 rows of loads in flight, which with these
    // operands (and a Philox block per element) would cost the plain path its occupancy.
    for (int64_t row = r0; row < r1; ++row) {
      const A d = to_acc<A>(ld_stream(a.dy + row * a.dy_stride + col));
      const A hv = to_acc<A>(ld_stream(a.h + row * a.h_stride + col));
      const A mu = a.rms ? A(0) : __ldg(a.mean + row);
      const A rs = __ldg(a.rstd + row);
      const A xhat = (hv - mu) * rs;
      sw += d * xhat;
      sb += d;
      const A gw = a.w != nullptr ? d * wc : d;
      A g = (gw - (xhat * __ldg(a.row_c + 2 * row) + __ldg(a.row_c + 2 * row + 1))) * rs;
      if (a.dh != nullptr) {
        g += ld_x_or_f32<X, A>(a.dh, a.dh_f32, row * a.dh_stride + col);
      }
      A t = g * ld_x_or_f32<X, A>(a.x, a.x_f32, row * a.x_stride + col);
      if (a.f.seed_offset != nullptr) {
        const auto* so = reinterpret_cast<const unsigned long long*>(a.f.seed_offset);
        const uint32_t bits =
            philox::bits_at(philox::key_of(__ldg(so)), __ldg(so + 1), static_cast<uint64_t>(row * n + col));
        t *= bits >= a.f.threshold ? a.f.keep_scale : A(0);
      }
      if (a.f.rowscale != nullptr) {
        t *= row_scale(a.f, row);
      }
      sc += t;
    }
  }
  const int64_t off = static_cast<int64_t>(blockIdx.y) * n + col;
  if (a.pw != nullptr) {
    a.pw[off] = sw;
  }
  if (a.pb != nullptr) {
    a.pb[off] = sb;
  }
  if (dcol) {
    a.pc[off] = sc;
  }
}

// dweight, dbias and dcolscale from the (chunks, n) partials of the kernels above, in one
// launch. Lane ty of column col adds chunks ty, ty + kSumY, ... in order, then the kSumY lane
// sums are added in lane order: a fixed order for a given chunk count, so the grads are bitwise
// reproducible. The total is rounded once, from the accumulation type to the parameter's dtype
// (eager's sum(0).to(dtype)). No chunks (no rows): zeros.
constexpr int kSumX = 32;
constexpr int kSumY = 8;
constexpr int kParamGrads = 3;  // dweight, dbias, dcolscale

// Each grad's partials and output (both null when the grad is not wanted) and output dtype.
template <class A>
struct ParamGrads {
  const A* part[kParamGrads];
  void* out[kParamGrads];
  int code[kParamGrads];
};

template <class A>
__global__ void __launch_bounds__(kSumX* kSumY) param_grad_kernel(const ParamGrads<A> p, int64_t chunks, int n) {
  __shared__ A sh[kParamGrads][kSumY][kSumX];
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int col = static_cast<int>(blockIdx.x) * kSumX + tx;
  A sum[kParamGrads];
#pragma unroll
  for (int i = 0; i < kParamGrads; ++i) {
    sum[i] = A(0);
  }
  if (col < n) {
    for (int64_t k = ty; k < chunks; k += kSumY) {
#pragma unroll
      for (int i = 0; i < kParamGrads; ++i) {
        if (p.part[i] != nullptr) {
          sum[i] += p.part[i][k * n + col];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kParamGrads; ++i) {
    sh[i][ty][tx] = sum[i];
  }
  __syncthreads();
  if (ty != 0 || col >= n) {
    return;
  }
#pragma unroll
  for (int i = 0; i < kParamGrads; ++i) {
    for (int y = 1; y < kSumY; ++y) {
      sum[i] += sh[i][y][tx];
    }
    if (p.out[i] != nullptr) {
      st_any(p.out[i], p.code[i], col, sum[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Every row start base + r * stride (r < rows) is 16-byte aligned.
bool rows_aligned16(const void* base, int64_t stride, size_t elem, int64_t rows) {
  return aligned16(base) && (rows <= 1 || (static_cast<int64_t>(elem) * stride) % 16 == 0);
}

// Threads per row for a row kept in registers as K packs per thread: the fewest threads that
// cover the row, as a power of two up to a warp or whole warps beyond. T == 0: the row does
// not fit (more than kMaxThreads threads would be needed), use the long-row kernels. G rows
// share a block of rows_block threads when T divides it, so a block always has >= 8 warps.
struct RowPlan {
  int T = 0;
  int G = 0;
  int block = 0;
};

RowPlan plan_rows(int64_t n, int K, int rows_block) {
  const int64_t packs = (n + kPack - 1) / kPack;
  const int64_t tmin = (packs + K - 1) / K;
  RowPlan plan;
  if (tmin > kMaxThreads) {
    return plan;
  }
  int T = 1;
  if (tmin <= 32) {
    while (T < tmin) {
      T <<= 1;
    }
  } else {
    T = static_cast<int>((tmin + 31) / 32 * 32);
  }
  plan.T = T;
  plan.G = (T <= rows_block / 2 && rows_block % T == 0) ? rows_block / T : 1;
  plan.block = plan.T * plan.G;
  return plan;
}

// Grid of a grid-stride row loop: one block per row group up to a cap that any realistic M
// stays under (the loop handles the rest, e.g. M > 2^31 rows of a tiny N).
unsigned int row_grid(int64_t groups) {
  const int64_t cap = int64_t{1} << 20;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(groups, cap)));
}

// Rounding mode (see round_mode) that turns an acc-precision h into h_dtype's precision.
int rounding_mode(ScalarType h_dtype, ScalarType acc) {
  switch (h_dtype) {
    case ScalarType::Half:
      return 1;
    case ScalarType::BFloat16:
      return 2;
    case ScalarType::Float:
      return acc == ScalarType::Double ? 3 : 0;
    default:
      return 0;
  }
}

// The kernels' view of a call's residual features.
template <class A>
Features<A> features_for(const AddNormFeatures& f) {
  Features<A> k{};
  if (f.dropout_p > 0.0) {
    k.seed_offset = f.seed_offset;
    k.threshold = philox::threshold(f.dropout_p);
    k.keep_scale = static_cast<A>(philox::scale(f.dropout_p));
  }
  k.rowscale = f.rowscale;
  k.rowscale_code = f.rowscale_dtype;
  k.colscale = f.colscale;
  k.colscale_code = f.colscale_dtype;
  k.weight_offset = static_cast<A>(f.weight_offset);
  return k;
}

// Host view of one forward call after dtype normalization.
struct FwdCall {
  const Tensor* x;
  const Tensor* r;  // null without residual
  const Tensor* w;
  const Tensor* b;
  Tensor* y;
  Tensor* h;     // the h buffer the kernel writes (of the storage dtype)
  Tensor* mean;  // null (with rstd) in place: no statistics
  Tensor* rstd;
  Tensor* mask;  // null unless the keep-mask is wanted
  AddNormFeatures features;
  RowsView shape;
  double eps;
  bool rms;
  bool store_h;
  int hround;
  cudaStream_t stream;

  // Whether the feature kernels are needed.
  bool any_feature() const { return features.any() || mask != nullptr; }
};

template <class X, class R, class H, class W>
void run_fwd(const FwdCall& c) {
  using A = acc_t<X>;
  FwdFeatureArgs<X, R, H, W> a{};  // the plain kernels get its FwdArgs part
  const FwdArgs<X, R, H, W>& plain = a;
  const int64_t M = c.shape.rows;
  const int N = static_cast<int>(c.shape.cols);
  a.x = static_cast<const X*>(c.x->const_data_ptr());
  a.r = c.r ? static_cast<const R*>(c.r->const_data_ptr()) : nullptr;
  a.w = c.w ? static_cast<const W*>(c.w->const_data_ptr()) : nullptr;
  a.b = c.b ? static_cast<const W*>(c.b->const_data_ptr()) : nullptr;
  a.y = static_cast<X*>(c.y->mutable_data_ptr());
  a.h = c.store_h ? static_cast<H*>(c.h->mutable_data_ptr()) : nullptr;
  a.mean = c.rms || c.mean == nullptr ? nullptr : static_cast<A*>(c.mean->mutable_data_ptr());
  a.rstd = c.rstd == nullptr ? nullptr : static_cast<A*>(c.rstd->mutable_data_ptr());
  a.mask = c.mask == nullptr ? nullptr : static_cast<bool*>(c.mask->mutable_data_ptr());
  a.f = features_for<A>(c.features);
  const bool features = c.any_feature();
  a.rows = M;
  a.x_stride = row_stride(*c.x);
  a.r_stride = c.r ? row_stride(*c.r) : 0;
  a.n = N;
  a.eps = static_cast<A>(c.eps);
  a.inv_n = static_cast<A>(1.0 / static_cast<double>(N));
  a.hround = c.hround;
  a.rms = c.rms;
  a.has_r = c.r != nullptr;
  a.store_h = c.store_h;
  a.vec = rows_aligned16(a.x, a.x_stride, sizeof(X), M) &&
          (!a.has_r || rows_aligned16(a.r, a.r_stride, sizeof(R), M)) && (a.w == nullptr || aligned16(a.w)) &&
          (a.b == nullptr || aligned16(a.b)) && rows_aligned16(a.y, N, sizeof(X), M) &&
          (!a.store_h || rows_aligned16(a.h, N, sizeof(H), M)) && aligned16(a.f.colscale);
  a.mask_vec = N % kPack == 0 && reinterpret_cast<uintptr_t>(a.mask) % 8 == 0;
  a.stats_lane = a.rstd != nullptr ? 0 : -1;
  // In place (no statistics) the plain kernels are instantiations of their own (kStats false),
  // for the dtypes it has: h of the residual's dtype.
  if constexpr (!std::is_same_v<R, H>) {
    STD_TORCH_CHECK(features || a.rstd != nullptr, "fusedres: internal error: add_norm_fwd without statistics");
  }

  const RowPlan plan = plan_rows(N, FwdPacks<X>::value, kFwdRowsBlock);
  if (plan.T > 0) {
    a.T = plan.T;
    a.G = plan.G;
    const unsigned int grid = row_grid((M + plan.G - 1) / plan.G);
    const bool vec = a.vec && N % kPack == 0;
    if (features) {
      add_norm_fwd_rows_kernel<kAnyAccess, true, true, X, R, H, W><<<grid, plan.block, 0, c.stream>>>(a);
    } else if (a.rstd != nullptr) {
      auto kernel = vec ? add_norm_fwd_rows_kernel<kVecAccess, false, true, X, R, H, W>
                        : add_norm_fwd_rows_kernel<kScalarAccess, false, true, X, R, H, W>;
      kernel<<<grid, plan.block, 0, c.stream>>>(plain);
    } else if constexpr (std::is_same_v<R, H>) {
      auto kernel = vec ? add_norm_fwd_rows_kernel<kVecAccess, false, false, X, R, H, W>
                        : add_norm_fwd_rows_kernel<kScalarAccess, false, false, X, R, H, W>;
      kernel<<<grid, plan.block, 0, c.stream>>>(plain);
    }
    check_launch("add_norm_fwd_rows_kernel");
  } else {
    a.T = kMaxThreads;
    a.G = 1;
    if (features) {
      add_norm_fwd_long_rows_kernel<true, true, X, R, H, W><<<row_grid(M), kMaxThreads, 0, c.stream>>>(a);
    } else if (a.rstd != nullptr) {
      add_norm_fwd_long_rows_kernel<false, true, X, R, H, W><<<row_grid(M), kMaxThreads, 0, c.stream>>>(plain);
    } else if constexpr (std::is_same_v<R, H>) {
      add_norm_fwd_long_rows_kernel<false, false, X, R, H, W><<<row_grid(M), kMaxThreads, 0, c.stream>>>(plain);
    }
    check_launch("add_norm_fwd_long_rows_kernel");
  }
}

// fp16/bf16 x: residual, h and weight/bias are each X or float. (residual float, h X) has no
// instantiation; the caller maps it to h stored as float plus run-time rounding.
template <class X>
void run_fwd_16(const FwdCall& c, bool r_f32, bool h_f32, bool w_f32) {
  STD_TORCH_CHECK(h_f32 || !r_f32, "fusedres: internal error: unsupported add_norm_fwd dtypes");
  if (!r_f32 && !h_f32) {
    w_f32 ? run_fwd<X, X, X, float>(c) : run_fwd<X, X, X, X>(c);
  } else if (!r_f32) {
    w_f32 ? run_fwd<X, X, float, float>(c) : run_fwd<X, X, float, X>(c);
  } else {
    w_f32 ? run_fwd<X, float, float, float>(c) : run_fwd<X, float, float, X>(c);
  }
}

// Kernels exist for residual / h / weight dtypes equal to x's or float32 (fp32 and fp64 x: x's
// dtype only).
bool has_kernel(ScalarType t, ScalarType xt) { return t == xt || (t == ScalarType::Float && xt != ScalarType::Double); }

// weight or bias as the kernels read it: a dtype without a kernel is converted to the
// accumulation dtype first (exact for fp16/bf16, and for wider dtypes the very rounding eager's
// .to(acc) does, so results are unchanged; only speed suffers, by a cast kernel, in these rare
// cases). Weight and bias share a dtype (the checks), so they get one W type.
std::optional<Tensor> kernel_param(const std::optional<Tensor>& t, ScalarType xt) {
  if (t && !has_kernel(t->scalar_type(), xt)) {
    return torch::stable::to(*t, stats_dtype(xt));
  }
  return t;
}

// Runs the forward kernel for x's dtype; residual, h's storage and weight are each x's dtype or
// float32 (flags). (residual float32 with h of x's dtype has no kernel: callers store such an h
// as float32 and round it at run time.)
void run_fwd_for(const FwdCall& call, ScalarType xt, bool r_f32, bool h_f32, bool w_f32) {
  switch (xt) {
    case ScalarType::Float:
      run_fwd<float, float, float, float>(call);
      break;
    case ScalarType::Double:
      run_fwd<double, double, double, double>(call);
      break;
    case ScalarType::Half:
      run_fwd_16<__half>(call, r_f32, h_f32, w_f32);
      break;
    case ScalarType::BFloat16:
      run_fwd_16<__nv_bfloat16>(call, r_f32, h_f32, w_f32);
      break;
    default:
      STD_TORCH_CHECK(false, "fusedres: unsupported x dtype");
  }
}

AddNormFwdResult<Tensor> add_norm_fwd_cuda(const AddNormFwd& a) {
  const AddNormParams p = check_add_norm(a);
  const RowsView shape = p.shape;
  const Tensor& x = a.x;
  const ScalarType h_dtype = a.h_dtype;
  const bool store_h = a.store_h;
  STD_TORCH_CHECK(x.is_cuda(), "fusedres: add_norm_fwd (CUDA) expects CUDA tensors");
  STD_TORCH_CHECK(shape.cols <= (int64_t{1} << 30), "fusedres: N is too large");
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  auto out = alloc_add_norm_outputs(a, shape);
  auto& [y, h, mean, rstd, mask] = out;
  if (shape.rows == 0) {
    return out;
  }

  const ScalarType xt = x.scalar_type();
  const ScalarType acc = stats_dtype(xt);
  // A residual without a kernel is converted like a parameter (see kernel_param).
  std::optional<Tensor> r = a.residual;
  if (r && !has_kernel(r->scalar_type(), xt)) {
    r = torch::stable::to(*r, acc);
  }
  const std::optional<Tensor> w = kernel_param(a.weight, xt);
  const std::optional<Tensor> b = kernel_param(a.bias, xt);
  const ScalarType wt = w ? w->scalar_type() : (b ? b->scalar_type() : xt);
  const bool r_f32 = r && r->scalar_type() == ScalarType::Float && xt != ScalarType::Float;

  // h's storage dtype in the kernel. An h_dtype without a kernel is computed in acc precision,
  // rounded to h_dtype in registers (so the normalized values match eager exactly), written
  // to an acc-dtype buffer (exactly representable there) and copied into h afterwards.
  ScalarType hs = h_dtype;
  int hround = 0;
  if (!has_kernel(h_dtype, xt) || (r_f32 && h_dtype == xt)) {
    hs = acc;
    hround = rounding_mode(h_dtype, acc);
  }
  const bool h_via_buffer = store_h && hs != h_dtype;
  Tensor h_buf = h_via_buffer ? empty_shaped_like(x, hs) : h;

  FwdCall call{};
  call.x = &x;
  call.r = r ? &*r : nullptr;
  call.w = w ? &*w : nullptr;
  call.b = b ? &*b : nullptr;
  call.y = &y;
  call.h = &h_buf;
  call.mean = &mean;
  call.rstd = &rstd;
  call.mask = a.store_mask ? &mask : nullptr;
  call.features = p.features;
  call.shape = shape;
  call.eps = a.eps;
  call.rms = a.rms_norm;
  call.store_h = store_h;
  call.hround = hround;
  call.stream = current_stream(x.get_device_index());
  run_fwd_for(call, xt, r_f32, hs == ScalarType::Float, wt == ScalarType::Float);
  if (h_via_buffer) {
    torch::stable::copy_(h, h_buf);
  }
  return out;
}

// In place, for inference: the forward kernels with y's buffer x's and h's the residual's, no
// statistics and no mask. Every kernel reads each pack of x and the residual before the same
// thread writes it, and the long-row kernel writes only in its last pass (see there), so the
// aliasing is safe. A residual dtype without a kernel (fp16/bf16 x with another 16-bit or a
// float64 residual, fp32 x with a 16-bit one) takes the out-of-place forward and copies its
// results back: correct, not allocation-free.
void add_norm_inplace_cuda(const AddNormInplaceArgs<Tensor>& a) {
  const RowsView shape = check_add_norm_inplace(a);
  Tensor x = a.x;
  Tensor residual = a.residual;
  STD_TORCH_CHECK(x.is_cuda(), "fusedres: add_norm_inplace (CUDA) expects CUDA tensors");
  STD_TORCH_CHECK(shape.cols <= (int64_t{1} << 30), "fusedres: N is too large");
  if (shape.rows == 0) {
    return;
  }
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const ScalarType xt = x.scalar_type();
  const ScalarType rt = residual.scalar_type();
  if (!has_kernel(rt, xt)) {
    const std::optional<Tensor> r = residual;
    const std::optional<Tensor> none;
    const AddNormFwd fwd{
        x, r, a.weight, a.bias, a.eps, a.rms_norm, rt, true, 0.0, none, none, a.colscale, a.weight_offset, false};
    auto [y, h, mean, rstd, mask] = add_norm_fwd_cuda(fwd);
    torch::stable::copy_(residual, h);
    torch::stable::copy_(x, y);
    return;
  }
  const std::optional<Tensor> w = kernel_param(a.weight, xt);
  const std::optional<Tensor> b = kernel_param(a.bias, xt);
  const ScalarType wt = w ? w->scalar_type() : (b ? b->scalar_type() : xt);
  FwdCall call{};
  call.x = &x;
  call.r = &residual;
  call.w = w ? &*w : nullptr;
  call.b = b ? &*b : nullptr;
  call.y = &x;
  call.h = &residual;
  if (a.colscale) {
    call.features.colscale = a.colscale->const_data_ptr();
    call.features.colscale_dtype = dtype_code(a.colscale->scalar_type());
  }
  call.features.weight_offset = a.weight_offset;
  call.shape = shape;
  call.eps = a.eps;
  call.rms = a.rms_norm;
  call.store_h = true;
  call.stream = current_stream(x.get_device_index());
  const bool r_f32 = rt == ScalarType::Float && xt != ScalarType::Float;
  run_fwd_for(call, xt, r_f32, r_f32, wt == ScalarType::Float);
}

struct BwdCall {
  const Tensor* dy;
  const Tensor* dh;  // null without dh
  const Tensor* h;
  const Tensor* x;  // null unless dcolscale is wanted
  const Tensor* w;
  const Tensor* mean;
  const Tensor* rstd;
  Tensor* dx;
  Tensor* dres;  // the buffer the kernel writes; null when not requested
  AddNormFeatures features;
  int dres_mode;
  bool need_dw;
  bool need_db;
  bool need_dc;
  RowsView shape;
  bool rms;
  bool dh_f32;
  bool x_f32;
  int device;
  cudaStream_t stream;
  // Outputs: the dweight / dbias / dcolscale partials, `chunks` rows of N accumulation-type
  // values each (null when not wanted), in one buffer; with long rows and dcolscale, each row's
  // c1, c2 (row_c).
  Tensor partials;
  Tensor row_c;
  int64_t chunks;
  void* part[kParamGrads];
};

// Allocates the partials of `chunks` rows: dweight's rows, then dbias's, then dcolscale's.
template <class A>
void alloc_partials(BwdCall& c, int64_t chunks) {
  c.chunks = chunks;
  const bool need[kParamGrads] = {c.need_dw, c.need_db, c.need_dc};
  const int64_t parts = (c.need_dw ? 1 : 0) + (c.need_db ? 1 : 0) + (c.need_dc ? 1 : 0);
  if (parts == 0) {
    return;
  }
  const int64_t N = c.shape.cols;
  c.partials = empty_on(*c.dy, {parts * chunks * N}, stats_dtype(c.dy->scalar_type()));
  A* next = static_cast<A*>(c.partials.mutable_data_ptr());
  for (int i = 0; i < kParamGrads; ++i) {
    c.part[i] = need[i] ? next : nullptr;
    next += need[i] ? chunks * N : 0;
  }
}

// Points a's partials at c's.
template <class X, class H, class W>
void set_partials(BwdFeatureArgs<X, H, W>& a, const BwdCall& c) {
  using A = acc_t<X>;
  a.pw = static_cast<A*>(c.part[0]);
  a.pb = static_cast<A*>(c.part[1]);
  a.pc = static_cast<A*>(c.part[2]);
}

// Launches the register backward kernel if a row fits in kMaxThreads threads with K packs each.
// One wave of resident blocks, each owning a contiguous range of rows: enough warps to keep HBM
// busy and as few partial rows as possible. Same device, kernel and M -> same block count and
// row split -> bitwise-identical dweight/dbias/dcolscale.
template <int kAccess, int K, bool kFeatures, class X, class H, class W>
bool launch_bwd_rows(BwdFeatureArgs<X, H, W>& a, BwdCall& c, int sms) {
  using A = acc_t<X>;
  const RowPlan plan = plan_rows(a.n, K, kBwdRowsBlock);
  if (plan.T == 0) {
    return false;
  }
  constexpr auto kernel = add_norm_bwd_rows_kernel<kAccess, K, kFeatures, X, H, W>;
  const int64_t M = a.rows;
  const int per_sm = blocks_per_sm<kernel>(c.device, plan.block);
  const int64_t groups = (M + plan.G - 1) / plan.G;
  int64_t blocks = std::min<int64_t>(groups, static_cast<int64_t>(sms) * per_sm);
  const int64_t rows_per_block = (groups + blocks - 1) / blocks * plan.G;
  blocks = (M + rows_per_block - 1) / rows_per_block;
  alloc_partials<A>(c, blocks);
  set_partials(a, c);
  a.rows_per_block = rows_per_block;
  a.T = plan.T;
  a.G = plan.G;
  // The plain kernels get the BwdArgs part.
  kernel<<<static_cast<unsigned int>(blocks), plan.block, 0, c.stream>>>(
      static_cast<const BwdArgsOf<kFeatures, X, H, W>&>(a));
  check_launch("add_norm_bwd_rows_kernel");
  return true;
}

template <class X, class H, class W>
void run_bwd(BwdCall& c) {
  using A = acc_t<X>;
  const int64_t M = c.shape.rows;
  const int N = static_cast<int>(c.shape.cols);
  BwdFeatureArgs<X, H, W> a{};  // the plain kernels get its BwdArgs part
  a.dy = static_cast<const X*>(c.dy->const_data_ptr());
  a.dh = c.dh ? c.dh->const_data_ptr() : nullptr;
  a.h = static_cast<const H*>(c.h->const_data_ptr());
  a.x = c.x ? c.x->const_data_ptr() : nullptr;
  a.w = c.w ? static_cast<const W*>(c.w->const_data_ptr()) : nullptr;
  a.mean = c.rms ? nullptr : static_cast<const A*>(c.mean->const_data_ptr());
  a.rstd = static_cast<const A*>(c.rstd->const_data_ptr());
  a.dx = static_cast<X*>(c.dx->mutable_data_ptr());
  a.dres = c.dres ? c.dres->mutable_data_ptr() : nullptr;
  a.f = features_for<A>(c.features);
  const bool features = c.features.any();
  a.rows = M;
  a.dy_stride = row_stride(*c.dy);
  a.dh_stride = c.dh ? row_stride(*c.dh) : 0;
  a.h_stride = row_stride(*c.h);
  a.x_stride = c.x ? row_stride(*c.x) : 0;
  a.n = N;
  a.inv_n = static_cast<A>(1.0 / static_cast<double>(N));
  a.dres_mode = c.dres ? c.dres_mode : 0;
  a.rms = c.rms;
  a.dh_f32 = c.dh_f32;
  a.x_f32 = c.x_f32;
  a.vec = rows_aligned16(a.dy, a.dy_stride, sizeof(X), M) && rows_aligned16(a.h, a.h_stride, sizeof(H), M) &&
          (a.w == nullptr || aligned16(a.w)) &&
          (a.dh == nullptr || rows_aligned16(a.dh, a.dh_stride, c.dh_f32 ? sizeof(float) : sizeof(X), M)) &&
          (a.x == nullptr || rows_aligned16(a.x, a.x_stride, c.x_f32 ? sizeof(float) : sizeof(X), M)) &&
          rows_aligned16(a.dx, N, sizeof(X), M) &&
          (a.dres_mode == 0 || rows_aligned16(a.dres, N, a.dres_mode == 2 ? sizeof(float) : sizeof(X), M)) &&
          aligned16(a.f.colscale);

  const int sms = sm_count(c.device);
  // Register kernel: the vectorized one with one pack per thread while a row fits in 512
  // threads (N <= 4096: ~64 registers, so 2 blocks of 512 per SM), two packs beyond
  // (N <= 8192: ~105 registers, one block per SM); the masked scalar one with one pack. With
  // the features: one pack with the access decided per pack, or two vectorized ones (with the
  // run-time access, two packs need more than the 128 registers a 512-thread block allows).
  bool launched = false;
  if (features) {
    launched = launch_bwd_rows<kAnyAccess, 1, true>(a, c, sms);
    if constexpr (!std::is_same_v<X, double>) {
      launched = launched || (a.vec && N % kPack == 0 && launch_bwd_rows<kVecAccess, 2, true>(a, c, sms));
    }
  } else if (a.vec && N % kPack == 0) {
    launched = launch_bwd_rows<kVecAccess, 1, false>(a, c, sms);
    if constexpr (!std::is_same_v<X, double>) {
      launched = launched || launch_bwd_rows<kVecAccess, 2, false>(a, c, sms);
    }
  } else {
    launched = launch_bwd_rows<kScalarAccess, 1, false>(a, c, sms);
  }
  if (launched) {
    return;
  }

  a.T = kMaxThreads;
  a.G = 1;
  if (c.need_dc) {
    c.row_c = empty_on(*c.dy, {2 * M}, stats_dtype(c.dy->scalar_type()));
    a.row_c = static_cast<A*>(c.row_c.mutable_data_ptr());
  }
  if (features) {
    add_norm_bwd_long_rows_kernel<true, X, H, W><<<row_grid(M), kMaxThreads, 0, c.stream>>>(a);
  } else {
    const BwdArgs<X, H, W>& plain = a;
    add_norm_bwd_long_rows_kernel<false, X, H, W><<<row_grid(M), kMaxThreads, 0, c.stream>>>(plain);
  }
  check_launch("add_norm_bwd_long_rows_kernel");
  if (!c.need_dw && !c.need_db && !c.need_dc) {
    return;
  }
  const int64_t col_blocks = (N + 255) / 256;
  int64_t chunks = std::max<int64_t>(1, (4 * static_cast<int64_t>(sms) + col_blocks - 1) / col_blocks);
  chunks = std::min<int64_t>({chunks, M, 65535});
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  alloc_partials<A>(c, chunks);
  set_partials(a, c);
  a.rows_per_block = rows_per_chunk;
  const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(chunks));
  add_norm_bwd_cols_kernel<X, H, W><<<grid, 256, 0, c.stream>>>(a);
  check_launch("add_norm_bwd_cols_kernel");
}

template <class X>
void run_bwd_16(BwdCall& c, bool h_f32, bool w_f32) {
  if (!h_f32) {
    w_f32 ? run_bwd<X, X, float>(c) : run_bwd<X, X, X>(c);
  } else {
    w_f32 ? run_bwd<X, float, float>(c) : run_bwd<X, float, X>(c);
  }
}

// dweight / dbias / dcolscale (null when not wanted) from c's partials: c.chunks rows, none
// when M == 0.
template <class A>
void launch_param_grads(const BwdCall& c, Tensor* const (&grads)[kParamGrads]) {
  ParamGrads<A> p{};
  bool any = false;
  for (int i = 0; i < kParamGrads; ++i) {
    p.part[i] = grads[i] ? static_cast<const A*>(c.part[i]) : nullptr;
    p.out[i] = grads[i] ? grads[i]->mutable_data_ptr() : nullptr;
    p.code[i] = grads[i] ? dtype_code(grads[i]->scalar_type()) : kF32;
    any = any || grads[i] != nullptr;
  }
  if (!any) {
    return;
  }
  const int64_t N = c.shape.cols;
  const unsigned int grid = static_cast<unsigned int>((N + kSumX - 1) / kSumX);
  param_grad_kernel<A><<<grid, dim3(kSumX, kSumY), 0, c.stream>>>(p, c.chunks, static_cast<int>(N));
  check_launch("param_grad_kernel");
}

// h as the forward formed it, when the backward was not given it (a cold path: the Python plan
// stores h on GPUs, where a write costs what a read does): the forward kernel itself, so it is
// the same formula (dropout bits included). Its y and statistics are discarded: any eps, no
// weight.
Tensor recompute_h(const AddNormBwd& a) {
  const std::optional<Tensor> none;
  const AddNormFwd fwd{*a.x, a.residual, none, none, 1.0, true, a.h_dtype, true, a.dropout_p, a.seed_offset, a.rowscale,
      a.colscale, 0.0, false};
  return std::get<1>(add_norm_fwd_cuda(fwd));
}

AddNormBwdResult<Tensor> add_norm_bwd_cuda(const AddNormBwd& a) {
  const AddNormParams p = check_add_norm(a);
  const RowsView shape = p.shape;
  const Tensor& dy = a.dy;
  STD_TORCH_CHECK(dy.is_cuda(), "fusedres: add_norm_bwd (CUDA) expects CUDA tensors");
  STD_TORCH_CHECK(shape.cols <= (int64_t{1} << 30), "fusedres: N is too large");
  const int device = dy.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const ScalarType xt = dy.scalar_type();
  const ScalarType acc = stats_dtype(xt);

  // Without h, it is recomputed (recompute_h); without a residual and with x's branch as it is,
  // x stands for h (x.to(h_dtype) only widens).
  Tensor h = a.h ? *a.h : *a.x;
  if (!a.h && (a.residual || p.features.transforms_x()) && shape.rows > 0) {
    h = recompute_h(a);
  }
  auto out = alloc_add_norm_outputs(a);
  auto& [dx, dres, dweight, dbias, dcolscale] = out;
  const std::optional<ScalarType> dresidual_dtype = a.dresidual_dtype;
  const Tensor& mean = a.rms_norm ? a.rstd : *a.mean;
  const Tensor& rstd = a.rstd;
  const std::optional<Tensor>& weight = a.weight;
  const std::optional<Tensor>& bias = a.bias;
  const std::optional<Tensor>& dh = a.dh;
  const bool rms_norm = a.rms_norm;

  BwdCall call{};
  call.dy = &dy;
  call.mean = &mean;
  call.rstd = &rstd;
  call.dx = &dx;
  call.features = p.features;
  call.need_dw = weight.has_value();
  call.need_db = bias.has_value();
  call.need_dc = a.colscale_grad;
  call.shape = shape;
  call.rms = rms_norm;
  call.device = device;
  call.stream = current_stream(device);

  // The parameter grads: the column sums of the partials the row kernels leave in `call` (with
  // no rows, over no partials: zeros).
  Tensor* const grads[kParamGrads] = {weight.has_value() ? &dweight : nullptr, bias.has_value() ? &dbias : nullptr,
      a.colscale_grad ? &dcolscale : nullptr};
  auto param_grads = [&] {
    if (acc == ScalarType::Double) {
      launch_param_grads<double>(call, grads);
    } else {
      launch_param_grads<float>(call, grads);
    }
  };
  if (shape.rows == 0) {
    param_grads();
    return out;
  }

  // Same policy as the forward: kernels for h / weight of dy's dtype or float32, anything
  // else converted to the accumulation dtype (exactly, or with eager's own .to(acc) rounding).
  const Tensor hk = has_kernel(h.scalar_type(), xt) ? h : torch::stable::to(h, acc);
  const std::optional<Tensor> w = kernel_param(weight, xt);
  // dh and x are read as dy's dtype or float32 (chosen at run time in the kernel); another
  // dtype is converted to float32 (exact, or A(x)'s own rounding for a float64 x).
  auto x_or_f32 = [&](const std::optional<Tensor>& t) -> std::optional<Tensor> {
    if (t && t->scalar_type() != xt && t->scalar_type() != ScalarType::Float) {
      return torch::stable::to(*t, ScalarType::Float);
    }
    return t;
  };
  const std::optional<Tensor> dhk = x_or_f32(dh);
  const std::optional<Tensor> xk = a.colscale_grad ? x_or_f32(a.x) : std::nullopt;

  // dresidual is written as dy's dtype (mode 1) or float32 (mode 2); another dtype goes
  // through an acc-dtype buffer (a single rounding, as eager's dx.to(dtype)).
  Tensor dres_buf = dres;
  bool dres_via_buffer = false;
  if (dresidual_dtype.has_value()) {
    if (*dresidual_dtype == xt) {
      call.dres_mode = 1;
    } else if (*dresidual_dtype == ScalarType::Float) {
      call.dres_mode = 2;
    } else {
      dres_via_buffer = true;
      dres_buf = empty_shaped_like(h, acc);
      call.dres_mode = acc == xt ? 1 : 2;
    }
  }
  call.dh = dhk ? &*dhk : nullptr;
  call.dh_f32 = dhk && dhk->scalar_type() == ScalarType::Float && xt != ScalarType::Float;
  call.x = xk ? &*xk : nullptr;
  call.x_f32 = xk && xk->scalar_type() == ScalarType::Float && xt != ScalarType::Float;
  call.h = &hk;
  call.w = w ? &*w : nullptr;
  call.dres = call.dres_mode != 0 ? &dres_buf : nullptr;

  const bool h_f32 = hk.scalar_type() == ScalarType::Float;
  const bool w_f32 = w && w->scalar_type() == ScalarType::Float;
  switch (xt) {
    case ScalarType::Float:
      run_bwd<float, float, float>(call);
      break;
    case ScalarType::Double:
      run_bwd<double, double, double>(call);
      break;
    case ScalarType::Half:
      run_bwd_16<__half>(call, h_f32, w_f32);
      break;
    case ScalarType::BFloat16:
      run_bwd_16<__nv_bfloat16>(call, h_f32, w_f32);
      break;
    default:
      STD_TORCH_CHECK(false, "fusedres: unsupported dy dtype");
  }
  if (dres_via_buffer) {
    torch::stable::copy_(dres, dres_buf);
  }
  param_grads();
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("add_norm_fwd", TORCH_BOX((&add_norm_fwd_entry<Tensor, &add_norm_fwd_cuda>)));
  m.impl("add_norm_bwd", TORCH_BOX((&add_norm_bwd_entry<Tensor, &add_norm_bwd_cuda>)));
  m.impl("add_norm_inplace", TORCH_BOX((&add_norm_inplace_entry<Tensor, &add_norm_inplace_cuda>)));
}

}  // namespace fusedres
