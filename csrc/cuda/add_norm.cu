// Add & Norm CUDA kernels: h = x + residual, y = norm(h) * weight + bias (LayerNorm or
// RMSNorm over the last dimension), and the matching backward. Arguments: fusedres/spec/add_norm.py.
// Eager spec: fusedres/reference/add_norm.py.
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
// (row_stride, add_norm.h); outputs are contiguous. dweight/dbias go through fixed-size fp32
// (fp64) partials, summed per column in a fixed order by param_grad_kernel, which also writes
// them in the parameter's dtype: the backward launches only its own kernels, no torch ops.
#include "add_norm.h"
#include "cuda/common.cuh"

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
__device__ __forceinline__ void load_pack(const T* __restrict__ row, int c, int n, bool vec,
                                          A (&out)[kPack]) {
  const bool full = kAccess == kVecAccess ? c < n
      : kAccess == kScalarAccess          ? false
                                          : (vec && c + kPack <= n);
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
__device__ __forceinline__ void store_pack(T* __restrict__ row, int c, int n, bool vec,
                                           const A (&v)[kPack]) {
  const bool full = kAccess == kVecAccess ? c < n
      : kAccess == kScalarAccess          ? false
                                          : (vec && c + kPack <= n);
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
__device__ __forceinline__ void load_pack_x_or_f32(const void* base, int64_t row, int64_t stride,
                                                   bool is_f32, int c, int n, bool vec,
                                                   A (&out)[kPack]) {
  if (is_f32) {
    load_pack<kAccess, true>(static_cast<const float*>(base) + row * stride, c, n, vec, out);
  } else {
    load_pack<kAccess, true>(static_cast<const X*>(base) + row * stride, c, n, vec, out);
  }
}

// Stores a pack to a contiguous (rows, n) tensor of type X (mode 1) or float (mode 2).
template <int kAccess, class X, class A>
__device__ __forceinline__ void store_pack_x_or_f32(void* base, int64_t row, int n, int mode,
                                                    int c, bool vec, const A (&v)[kPack]) {
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
// Forward
// ---------------------------------------------------------------------------------------------

template <class X, class R, class H, class W>
struct FwdArgs {
  using A = acc_t<X>;
  const X* x;
  const R* r;  // null without residual
  const W* w;  // null without weight
  const W* b;  // null without bias
  X* y;        // contiguous (rows, n)
  H* h;        // contiguous (rows, n); unused unless store_h
  A* mean;     // (rows,), LayerNorm only
  A* rstd;     // (rows,)
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

// h for one pack: (x + residual) in the accumulation type, rounded to h's dtype. Eager rounds
// h to h_dtype before normalizing, so the rounding happens even when h is not stored.
template <int kAccess, class X, class R, class H, class W, class A>
__device__ __forceinline__ void h_pack(const FwdArgs<X, R, H, W>& a, const X* xrow,
                                       const R* rrow, int c, A (&v)[kPack]) {
  load_pack<kAccess, true>(xrow, c, a.n, a.vec, v);
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
}

template <int kAccess, class X, class R, class H, class W, class A>
__device__ __forceinline__ void y_pack(const FwdArgs<X, R, H, W>& a, X* yrow, int c, A mean,
                                       A rstd, const A (&v)[kPack]) {
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
      out[j] *= t[j];
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
// gradcheck path, not a bandwidth-critical one).
template <class X>
constexpr int kFwdMinBlocks = std::is_same_v<X, double> ? 1 : 0;

// Register-resident forward: each row group loads its row once (all K packs of x, then of the
// residual, issued back to back so a thread has K * 16..64 bytes in flight), keeps h in
// registers through both reductions and writes y (and h) from registers. HBM traffic is the
// minimum: read x and residual, write y, h (optional) and two floats of statistics per row.
template <int kAccess, class X, class R, class H, class W>
__global__ void __launch_bounds__(kMaxThreads, kFwdMinBlocks<X>)
    add_norm_fwd_rows_kernel(const FwdArgs<X, R, H, W> a) {
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
      if (lane == 0) {
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
          y_pack<kAccess>(a, yrow, c, mean, rstd, v[k]);
        }
      }
    }
  }
}

// Rows too long for registers: one block per row, the row is re-read for every pass (sum,
// sum of squared deviations, output). The re-reads mostly hit L2; h is recomputed
// bit-identically in every pass, so the maths is exactly that of the register kernel.
template <class X, class R, class H, class W>
__global__ void __launch_bounds__(kMaxThreads)
    add_norm_fwd_long_rows_kernel(const FwdArgs<X, R, H, W> a) {
  using A = acc_t<X>;
  __shared__ A red[2][1][kMaxWarps];
  const int n = a.n;
  const int T = static_cast<int>(blockDim.x);
  const int stride = T * kPack;
  int pp = 0;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const X* xrow = a.x + row * a.x_stride;
    const R* rrow = a.has_r ? a.r + row * a.r_stride : nullptr;
    A mean = A(0);
    if (!a.rms) {
      A s[1] = {A(0)};
      for (int c = static_cast<int>(threadIdx.x) * kPack; c < n; c += stride) {
        A v[kPack];
        h_pack<kAnyAccess>(a, xrow, rrow, c, v);
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
      h_pack<kAnyAccess>(a, xrow, rrow, c, v);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const A d = v[j] - mean;
        ss[0] += (c + j < n) ? d * d : A(0);
      }
    }
    group_sum<1>(ss, T, red[pp]);
    pp ^= 1;
    const A rstd = rsqrt_acc(ss[0] * a.inv_n + a.eps);
    if (threadIdx.x == 0) {
      if (!a.rms) {
        a.mean[row] = mean;
      }
      a.rstd[row] = rstd;
    }
    X* yrow = a.y + row * n;
    for (int c = static_cast<int>(threadIdx.x) * kPack; c < n; c += stride) {
      A v[kPack];
      h_pack<kAnyAccess>(a, xrow, rrow, c, v);
      if (a.store_h) {
        store_pack<kAnyAccess>(a.h + row * n, c, n, a.vec, v);
      }
      y_pack<kAnyAccess>(a, yrow, c, mean, rstd, v);
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

// Backward of y = xhat * w + b with xhat = (h - mean) * rstd (RMSNorm: mean = 0), per row of
// N elements, with g = dy * w (g = dy without weight):
//
//   dL/dh_i = rstd * (g_i - mean_j(g_j) - xhat_i * mean_j(g_j * xhat_j))            LayerNorm
//   dL/dh_i = rstd * (g_i - xhat_i * mean_j(g_j * xhat_j))                          RMSNorm
//
// (differentiate xhat_i = (h_i - mu) * rstd through mu = mean(h) and
// rstd = (var + eps)^-1/2: dmu/dh_j = 1/N, drstd/dh_j = -rstd^3 (h_j - mu) / N; for RMSNorm
// mu = 0 and drstd/dh_j = -rstd^3 h_j / N.) With c1 = mean(g * xhat), c2 = mean(g) (0 for
// RMSNorm): dx = (g - (xhat * c1 + c2)) * rstd + dh, where dh is the gradient flowing into h
// directly (prenorm output). Since h = x + residual, dresidual = dx.
// dweight_i = sum over rows of dy_i * xhat_i, dbias_i = sum over rows of dy_i.
//
// The kernel computes u = g * rstd + dh before the row reduction, then
// dx = u - (xhat * c1 + c2) * rstd after it: the same value, but dh's loads are issued with
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
template <int kAccess, int K, class X, class H, class W>
__global__ void __launch_bounds__(kMaxThreads)
    add_norm_bwd_rows_kernel(const BwdArgs<X, H, W> a) {
  using A = acc_t<X>;
  __shared__ A red[2][2][kMaxWarps];
  const int T = a.T;
  const int G = a.G;
  const int n = a.n;
  const int g = static_cast<int>(threadIdx.x) / T;
  const int lane = static_cast<int>(threadIdx.x) - g * T;

  A dw[K][kPack];
  A db[K][kPack];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      dw[k][j] = A(0);
      db[k][j] = A(0);
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

    A xh[K][kPack];  // h, then xhat
    A u[K][kPack];   // dy, then g * rstd + dh
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * T + lane) * kPack;
      load_pack<kAccess, true>(hrow, c, n, a.vec, xh[k]);
      load_pack<kAccess, true>(dyrow, c, n, a.vec, u[k]);
    }
    A s[2] = {A(0), A(0)};  // sum(g * xhat), sum(g)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * T + lane) * kPack;
      A wv[kPack];
      if (a.w != nullptr) {
        load_pack<kAccess, false>(a.w, c, n, a.vec, wv);
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
        load_pack_x_or_f32<kAccess, X>(a.dh, row, a.dh_stride, a.dh_f32, (k * T + lane) * kPack,
                                       n, a.vec, t);
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
      X* dxrow = a.dx + row * n;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = (k * T + lane) * kPack;
        if (c < n) {
          A out[kPack];
#pragma unroll
          for (int j = 0; j < kPack; ++j) {
            out[j] = u[k][j] - (xh[k][j] * c1 + c2) * rs;
          }
          store_pack<kAccess>(dxrow, c, n, a.vec, out);
          if (a.dres_mode != 0) {
            store_pack_x_or_f32<kAccess, X>(a.dres, row, n, a.dres_mode, c, a.vec, out);
          }
        }
      }
    }
  }

  if (a.pw == nullptr && a.pb == nullptr) {
    return;
  }
  if (G == 1) {
    // Every column < n belongs to exactly one thread: write the registers directly.
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
        }
      }
    }
    return;
  }
  // G > 1 only when blockDim == kBwdRowsBlock: combine the groups' partials in shared
  // memory, slot = column, groups added in order 0..G-1.
  constexpr int kSlots = kBwdRowsBlock * K * kPack;
  __shared__ A comb[kSlots];
  const int span = T * K * kPack;  // columns covered by one group (>= n)
  const int lim = n < span ? n : span;
  for (int which = 0; which < 2; ++which) {
    A* dst = which == 0 ? a.pw : a.pb;
    if (dst == nullptr) {
      continue;
    }
    dst += static_cast<int64_t>(blockIdx.x) * n;
    __syncthreads();  // previous round's readers are done with comb
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        comb[g * span + (k * T + lane) * kPack + j] = which == 0 ? dw[k][j] : db[k][j];
      }
    }
    __syncthreads();
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
// dx), the second one mostly from L2. dweight/dbias come from add_norm_bwd_cols_kernel.
template <class X, class H, class W>
__global__ void __launch_bounds__(kMaxThreads)
    add_norm_bwd_long_rows_kernel(const BwdArgs<X, H, W> a) {
  using A = acc_t<X>;
  __shared__ A red[2][2][kMaxWarps];
  const int n = a.n;
  const int T = static_cast<int>(blockDim.x);
  const int stride = T * kPack;
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
        const A gw = a.w != nullptr ? d[j] * wv[j] : d[j];
        s[0] += gw * xhat;
        s[1] += gw;
      }
    }
    group_sum<2>(s, T, red[pp]);
    pp ^= 1;
    const A c1 = s[0] * a.inv_n;
    const A c2 = a.rms ? A(0) : s[1] * a.inv_n;
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
      A out[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const A xhat = (hv[j] - mu) * rs;
        const A gw = a.w != nullptr ? d[j] * wv[j] : d[j];
        out[j] = (gw - (xhat * c1 + c2)) * rs;
        if (a.dh != nullptr) {
          out[j] += t[j];
        }
      }
      store_pack<kAnyAccess>(dxrow, c, n, a.vec, out);
      if (a.dres_mode != 0) {
        store_pack_x_or_f32<kAnyAccess, X>(a.dres, row, n, a.dres_mode, c, a.vec, out);
      }
    }
  }
}

// dweight/dbias partials for rows too long for the register kernel: thread = column, block
// (x, y) = (256 columns, chunk of rows); reads dy and h once more. Partials (chunks, n).
template <class X, class H>
__global__ void __launch_bounds__(256)
    add_norm_bwd_cols_kernel(const X* __restrict__ dy, int64_t dy_stride, const H* __restrict__ h,
                             int64_t h_stride, const acc_t<X>* __restrict__ mean,
                             const acc_t<X>* __restrict__ rstd, bool rms, acc_t<X>* pw,
                             acc_t<X>* pb, int64_t rows, int n, int64_t rows_per_chunk) {
  using A = acc_t<X>;
  const int col = static_cast<int>(blockIdx.x) * 256 + static_cast<int>(threadIdx.x);
  if (col >= n) {
    return;
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A sw = A(0);
  A sb = A(0);
#pragma unroll 4
  for (int64_t row = r0; row < r1; ++row) {
    const A d = to_acc<A>(ld_stream(dy + row * dy_stride + col));
    const A hv = to_acc<A>(ld_stream(h + row * h_stride + col));
    const A mu = rms ? A(0) : __ldg(mean + row);
    sw += d * ((hv - mu) * __ldg(rstd + row));
    sb += d;
  }
  if (pw != nullptr) {
    pw[static_cast<int64_t>(blockIdx.y) * n + col] = sw;
  }
  if (pb != nullptr) {
    pb[static_cast<int64_t>(blockIdx.y) * n + col] = sb;
  }
}

// dweight and dbias from the (chunks, n) partials of the kernels above, in one launch. Lane ty
// of column col adds chunks ty, ty + kSumY, ... in order, then the kSumY lane sums are added
// in lane order: a fixed order for a given chunk count, so the grads are bitwise reproducible.
// The total is rounded once, from the accumulation type to the parameter's dtype (eager's
// sum(0).to(dtype)). No chunks (no rows): zeros. pw/pb and dw/db are null when absent.
constexpr int kSumX = 32;
constexpr int kSumY = 8;

template <class A>
__global__ void __launch_bounds__(kSumX * kSumY)
    param_grad_kernel(const A* __restrict__ pw, const A* __restrict__ pb, int64_t chunks, int n,
                      void* dw, int dw_code, void* db, int db_code) {
  __shared__ A sh[2][kSumY][kSumX];
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int col = static_cast<int>(blockIdx.x) * kSumX + tx;
  A sw = A(0);
  A sb = A(0);
  if (col < n) {
    for (int64_t k = ty; k < chunks; k += kSumY) {
      if (pw != nullptr) {
        sw += pw[k * n + col];
      }
      if (pb != nullptr) {
        sb += pb[k * n + col];
      }
    }
  }
  sh[0][ty][tx] = sw;
  sh[1][ty][tx] = sb;
  __syncthreads();
  if (ty != 0 || col >= n) {
    return;
  }
  for (int y = 1; y < kSumY; ++y) {
    sw += sh[0][y][tx];
    sb += sh[1][y][tx];
  }
  if (dw != nullptr) {
    st_any(dw, dw_code, col, sw);
  }
  if (db != nullptr) {
    st_any(db, db_code, col, sb);
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

// Host view of one forward call after dtype normalization.
struct FwdCall {
  const Tensor* x;
  const Tensor* r;  // null without residual
  const Tensor* w;
  const Tensor* b;
  Tensor* y;
  Tensor* h;  // the h buffer the kernel writes (of the storage dtype)
  Tensor* mean;
  Tensor* rstd;
  RowsView shape;
  double eps;
  bool rms;
  bool store_h;
  int hround;
  cudaStream_t stream;
};

template <class X, class R, class H, class W>
void run_fwd(const FwdCall& c) {
  using A = acc_t<X>;
  FwdArgs<X, R, H, W> a{};
  const int64_t M = c.shape.rows;
  const int N = static_cast<int>(c.shape.cols);
  a.x = static_cast<const X*>(c.x->const_data_ptr());
  a.r = c.r ? static_cast<const R*>(c.r->const_data_ptr()) : nullptr;
  a.w = c.w ? static_cast<const W*>(c.w->const_data_ptr()) : nullptr;
  a.b = c.b ? static_cast<const W*>(c.b->const_data_ptr()) : nullptr;
  a.y = static_cast<X*>(c.y->mutable_data_ptr());
  a.h = c.store_h ? static_cast<H*>(c.h->mutable_data_ptr()) : nullptr;
  a.mean = c.rms ? nullptr : static_cast<A*>(c.mean->mutable_data_ptr());
  a.rstd = static_cast<A*>(c.rstd->mutable_data_ptr());
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
      (!a.has_r || rows_aligned16(a.r, a.r_stride, sizeof(R), M)) &&
      (a.w == nullptr || aligned16(a.w)) && (a.b == nullptr || aligned16(a.b)) &&
      rows_aligned16(a.y, N, sizeof(X), M) && (!a.store_h || rows_aligned16(a.h, N, sizeof(H), M));

  const RowPlan plan = plan_rows(N, FwdPacks<X>::value, kFwdRowsBlock);
  if (plan.T > 0) {
    a.T = plan.T;
    a.G = plan.G;
    const unsigned int grid = row_grid((M + plan.G - 1) / plan.G);
    if (a.vec && N % kPack == 0) {
      add_norm_fwd_rows_kernel<kVecAccess, X, R, H, W><<<grid, plan.block, 0, c.stream>>>(a);
    } else {
      add_norm_fwd_rows_kernel<kScalarAccess, X, R, H, W><<<grid, plan.block, 0, c.stream>>>(a);
    }
    check_launch("add_norm_fwd_rows_kernel");
  } else {
    a.T = kMaxThreads;
    a.G = 1;
    add_norm_fwd_long_rows_kernel<X, R, H, W><<<row_grid(M), kMaxThreads, 0, c.stream>>>(a);
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

// Until the CUDA kernels implement them (issue 23): the residual features are refused here.
void refuse_features(const AddNormParams& p, bool store_mask) {
  STD_TORCH_CHECK(!p.features.any() && !store_mask,
      "fusedres: dropout_p, rowscale, colscale, weight_offset and the dropout mask are not implemented by the CUDA "
      "backend yet");
}

AddNormFwdResult<Tensor> add_norm_fwd_cuda(const AddNormFwd& a) {
  const AddNormParams p = check_add_norm(a);
  refuse_features(p, a.store_mask);
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
  // Kernels exist for residual / h / weight dtypes equal to x's or float32 (fp32 and fp64 x:
  // x's dtype only). Any other dtype is converted to the accumulation dtype first: exact for
  // fp16/bf16 inputs, and for wider inputs it is the very rounding eager's .to(acc) does, so
  // the results are unchanged; only speed suffers (an extra cast kernel) in these rare cases.
  auto has_kernel = [&](ScalarType t) {
    return t == xt || (t == ScalarType::Float && xt != ScalarType::Double);
  };
  std::optional<Tensor> r = a.residual;
  if (r && !has_kernel(r->scalar_type())) {
    r = torch::stable::to(*r, acc);
  }
  std::optional<Tensor> w = a.weight;
  std::optional<Tensor> b = a.bias;
  if (w && !has_kernel(w->scalar_type())) {
    w = torch::stable::to(*w, acc);
  }
  if (b && !has_kernel(b->scalar_type())) {
    b = torch::stable::to(*b, acc);
  }
  // check_add_norm_fwd guarantees bias has weight's dtype, and both went through the same
  // conversion rule, so one W type serves both.
  const ScalarType wt = w ? w->scalar_type() : (b ? b->scalar_type() : xt);
  const bool r_f32 = r && r->scalar_type() == ScalarType::Float && xt != ScalarType::Float;

  // h's storage dtype in the kernel. An h_dtype without a kernel is computed in acc precision,
  // rounded to h_dtype in registers (so the normalized values match eager exactly), written
  // to an acc-dtype buffer (exactly representable there) and copied into h afterwards.
  ScalarType hs = h_dtype;
  int hround = 0;
  if (!has_kernel(h_dtype) || (r_f32 && h_dtype == xt)) {
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
  call.shape = shape;
  call.eps = a.eps;
  call.rms = a.rms_norm;
  call.store_h = store_h;
  call.hround = hround;
  call.stream = current_stream(x.get_device_index());

  switch (xt) {
    case ScalarType::Float:
      run_fwd<float, float, float, float>(call);
      break;
    case ScalarType::Double:
      run_fwd<double, double, double, double>(call);
      break;
    case ScalarType::Half:
      run_fwd_16<__half>(call, r_f32, hs == ScalarType::Float, wt == ScalarType::Float);
      break;
    case ScalarType::BFloat16:
      run_fwd_16<__nv_bfloat16>(call, r_f32, hs == ScalarType::Float, wt == ScalarType::Float);
      break;
    default:
      STD_TORCH_CHECK(false, "fusedres: unsupported x dtype");
  }
  if (h_via_buffer) {
    torch::stable::copy_(h, h_buf);
  }
  return out;
}

struct BwdCall {
  const Tensor* dy;
  const Tensor* dh;  // null without dh
  const Tensor* h;
  const Tensor* w;
  const Tensor* mean;
  const Tensor* rstd;
  Tensor* dx;
  Tensor* dres;  // the buffer the kernel writes; null when not requested
  int dres_mode;
  bool need_dw;
  bool need_db;
  RowsView shape;
  bool rms;
  bool dh_f32;
  int device;
  cudaStream_t stream;
  // Outputs: the dweight / dbias partials, `chunks` rows of N accumulation-type values each
  // (pw / pb null when weight / bias are absent), in one buffer.
  Tensor partials;
  int64_t chunks;
  void* pw;
  void* pb;
};

// Allocates the partials of `chunks` rows: dweight's rows, then dbias's.
template <class A>
void alloc_partials(BwdCall& c, int64_t chunks) {
  c.chunks = chunks;
  const int64_t parts = (c.need_dw ? 1 : 0) + (c.need_db ? 1 : 0);
  if (parts == 0) {
    return;
  }
  const int64_t N = c.shape.cols;
  c.partials = empty_on(*c.dy, {parts * chunks * N}, stats_dtype(c.dy->scalar_type()));
  A* base = static_cast<A*>(c.partials.mutable_data_ptr());
  c.pw = c.need_dw ? base : nullptr;
  c.pb = c.need_db ? base + (c.need_dw ? chunks * N : 0) : nullptr;
}

// Launches the register backward kernel if a row fits in kMaxThreads threads with K packs each.
// One wave of resident blocks, each owning a contiguous range of rows: enough warps to keep HBM
// busy and as few partial rows as possible. Same device, kernel and M -> same block count and
// row split -> bitwise-identical dweight/dbias.
template <int kAccess, int K, class X, class H, class W>
bool launch_bwd_rows(BwdArgs<X, H, W>& a, BwdCall& c, int sms) {
  using A = acc_t<X>;
  const RowPlan plan = plan_rows(a.n, K, kBwdRowsBlock);
  if (plan.T == 0) {
    return false;
  }
  constexpr auto kernel = add_norm_bwd_rows_kernel<kAccess, K, X, H, W>;
  const int64_t M = a.rows;
  const int per_sm = blocks_per_sm<kernel>(c.device, plan.block);
  const int64_t groups = (M + plan.G - 1) / plan.G;
  int64_t blocks = std::min<int64_t>(groups, static_cast<int64_t>(sms) * per_sm);
  const int64_t rows_per_block = (groups + blocks - 1) / blocks * plan.G;
  blocks = (M + rows_per_block - 1) / rows_per_block;
  alloc_partials<A>(c, blocks);
  a.pw = static_cast<A*>(c.pw);
  a.pb = static_cast<A*>(c.pb);
  a.rows_per_block = rows_per_block;
  a.T = plan.T;
  a.G = plan.G;
  kernel<<<static_cast<unsigned int>(blocks), plan.block, 0, c.stream>>>(a);
  check_launch("add_norm_bwd_rows_kernel");
  return true;
}

template <class X, class H, class W>
void run_bwd(BwdCall& c) {
  using A = acc_t<X>;
  const int64_t M = c.shape.rows;
  const int N = static_cast<int>(c.shape.cols);
  BwdArgs<X, H, W> a{};
  a.dy = static_cast<const X*>(c.dy->const_data_ptr());
  a.dh = c.dh ? c.dh->const_data_ptr() : nullptr;
  a.h = static_cast<const H*>(c.h->const_data_ptr());
  a.w = c.w ? static_cast<const W*>(c.w->const_data_ptr()) : nullptr;
  a.mean = c.rms ? nullptr : static_cast<const A*>(c.mean->const_data_ptr());
  a.rstd = static_cast<const A*>(c.rstd->const_data_ptr());
  a.dx = static_cast<X*>(c.dx->mutable_data_ptr());
  a.dres = c.dres ? c.dres->mutable_data_ptr() : nullptr;
  a.rows = M;
  a.dy_stride = row_stride(*c.dy);
  a.dh_stride = c.dh ? row_stride(*c.dh) : 0;
  a.h_stride = row_stride(*c.h);
  a.n = N;
  a.inv_n = static_cast<A>(1.0 / static_cast<double>(N));
  a.dres_mode = c.dres ? c.dres_mode : 0;
  a.rms = c.rms;
  a.dh_f32 = c.dh_f32;
  a.vec = rows_aligned16(a.dy, a.dy_stride, sizeof(X), M) &&
      rows_aligned16(a.h, a.h_stride, sizeof(H), M) && (a.w == nullptr || aligned16(a.w)) &&
      (a.dh == nullptr ||
       rows_aligned16(a.dh, a.dh_stride, c.dh_f32 ? sizeof(float) : sizeof(X), M)) &&
      rows_aligned16(a.dx, N, sizeof(X), M) &&
      (a.dres_mode == 0 ||
       rows_aligned16(a.dres, N, a.dres_mode == 2 ? sizeof(float) : sizeof(X), M));

  const int sms = sm_count(c.device);
  // Register kernel: the vectorized one with one pack per thread while a row fits in 512
  // threads (N <= 4096: ~64 registers, so 2 blocks of 512 per SM), two packs beyond
  // (N <= 8192: ~105 registers, one block per SM); the masked scalar one with one pack.
  bool launched = false;
  if (a.vec && N % kPack == 0) {
    launched = launch_bwd_rows<kVecAccess, 1>(a, c, sms);
    if constexpr (!std::is_same_v<X, double>) {
      launched = launched || launch_bwd_rows<kVecAccess, 2>(a, c, sms);
    }
  } else {
    launched = launch_bwd_rows<kScalarAccess, 1>(a, c, sms);
  }
  if (launched) {
    return;
  }

  a.T = kMaxThreads;
  a.G = 1;
  add_norm_bwd_long_rows_kernel<X, H, W><<<row_grid(M), kMaxThreads, 0, c.stream>>>(a);
  check_launch("add_norm_bwd_long_rows_kernel");
  if (!c.need_dw && !c.need_db) {
    return;
  }
  const int64_t col_blocks = (N + 255) / 256;
  int64_t chunks = std::max<int64_t>(1, (4 * static_cast<int64_t>(sms) + col_blocks - 1) / col_blocks);
  chunks = std::min<int64_t>({chunks, M, 65535});
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  alloc_partials<A>(c, chunks);
  const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(chunks));
  add_norm_bwd_cols_kernel<X, H><<<grid, 256, 0, c.stream>>>(
      a.dy, a.dy_stride, a.h, a.h_stride, a.mean, a.rstd, a.rms, static_cast<A*>(c.pw),
      static_cast<A*>(c.pb), M, N, rows_per_chunk);
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

// dweight / dbias (null when absent) from c's partials: c.chunks rows, none when M == 0.
template <class A>
void launch_param_grads(const BwdCall& c, Tensor* dweight, Tensor* dbias) {
  if (dweight == nullptr && dbias == nullptr) {
    return;
  }
  const int64_t N = c.shape.cols;
  const unsigned int grid = static_cast<unsigned int>((N + kSumX - 1) / kSumX);
  param_grad_kernel<A><<<grid, dim3(kSumX, kSumY), 0, c.stream>>>(
      static_cast<const A*>(c.pw), static_cast<const A*>(c.pb), c.chunks, static_cast<int>(N),
      dweight ? dweight->mutable_data_ptr() : nullptr,
      dweight ? dtype_code(dweight->scalar_type()) : kF32,
      dbias ? dbias->mutable_data_ptr() : nullptr,
      dbias ? dtype_code(dbias->scalar_type()) : kF32);
  check_launch("param_grad_kernel");
}

// a + b. torch::stable has no add (and aten::add's Scalar alpha cannot be passed through the
// stable dispatcher); a - (-1) * b is the same IEEE operation, signed zeros included.
Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }

AddNormBwdResult<Tensor> add_norm_bwd_cuda(const AddNormBwd& a) {
  const AddNormParams p = check_add_norm(a);
  refuse_features(p, false);
  const RowsView shape = p.shape;
  const Tensor& dy = a.dy;
  STD_TORCH_CHECK(dy.is_cuda(), "fusedres: add_norm_bwd (CUDA) expects CUDA tensors");
  STD_TORCH_CHECK(shape.cols <= (int64_t{1} << 30), "fusedres: N is too large");
  const int device = dy.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const ScalarType xt = dy.scalar_type();
  const ScalarType acc = stats_dtype(xt);

  // GPUs have no reason to skip writing h in the forward (a write costs what a read does), so
  // the fused path reads it. Without it, h is recomputed from x (+ residual) (a cold path, in
  // torch ops) exactly as the forward formed it: both operands in the accumulation dtype, added
  // there, rounded to h_dtype; without a residual, x stands for h (x.to(h_dtype) only widens).
  Tensor h = a.h ? *a.h : *a.x;
  if (!a.h && a.residual && shape.rows > 0) {
    const Tensor sum = add(torch::stable::to(*a.x, acc), torch::stable::to(*a.residual, acc));
    h = torch::stable::to(sum, a.h_dtype);
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
  call.need_dw = weight.has_value();
  call.need_db = bias.has_value();
  call.shape = shape;
  call.rms = rms_norm;
  call.device = device;
  call.stream = current_stream(device);

  // dweight / dbias: the column sums of the partials the row kernels leave in `call` (with no
  // rows, over no partials: zeros).
  Tensor* dw_out = weight.has_value() ? &dweight : nullptr;
  Tensor* db_out = bias.has_value() ? &dbias : nullptr;
  auto param_grads = [&] {
    if (acc == ScalarType::Double) {
      launch_param_grads<double>(call, dw_out, db_out);
    } else {
      launch_param_grads<float>(call, dw_out, db_out);
    }
  };
  if (shape.rows == 0) {
    param_grads();
    return out;
  }

  // Same policy as the forward: kernels for h / weight of dy's dtype or float32, anything
  // else converted to the accumulation dtype (exactly, or with eager's own .to(acc) rounding).
  auto has_kernel = [&](ScalarType t) {
    return t == xt || (t == ScalarType::Float && xt != ScalarType::Double);
  };
  const Tensor hk = has_kernel(h.scalar_type()) ? h : torch::stable::to(h, acc);
  std::optional<Tensor> w = weight;
  if (w && !has_kernel(w->scalar_type())) {
    w = torch::stable::to(*w, acc);
  }
  // dh is read as dy's dtype or float32 (chosen at run time in the kernel).
  std::optional<Tensor> dhk = dh;
  if (dhk && dhk->scalar_type() != xt && dhk->scalar_type() != ScalarType::Float) {
    dhk = torch::stable::to(*dhk, ScalarType::Float);
  }

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
}

}  // namespace fusedres
