// BatchNorm (+ residual) (+ ReLU) CUDA kernels: batch statistics, the fused forward
// out = relu((xhat * weight + bias) * rowscale[n] + residual), and the two backward passes.
// Schemas and exact semantics: fusedres/spec/batch_norm.py. Eager spec:
// fusedres/reference/batch_norm.py.
//
// Every op is memory bound (a few flops per element), so each pass reads its inputs from HBM
// once and writes its output once; per-channel work (combining partials, the coefficients of
// the fused passes) happens in small kernels of C threads between them:
//   batch_norm_stats:      reduce (read x) -> combine (mean, var; running stats updated)
//   combine_stats:         combine (the processes' mean, var, count -> mean, var; running stats)
//   forward:               coefficients -> apply (read x, residual; write out)
//   backward, reduce:      reduce (read grad_out, out, x; write g) -> combine (sum_dy, sum_dy_xhat)
//   backward, grad_input:  coefficients -> apply (read g, or grad_out and out; read x; write dx)
// No torch op runs around them: outputs are allocated through the C shim (tensors.h) and every
// per-channel value, NaN statistics of an empty batch included, is written by these kernels.
//
// Layouts. An (N, C, *) activation is addressed as (N, C, S), S the product of the spatial
// sizes; both dense layouts are handled natively, never converted (a conversion would be one
// more full read and write):
//  - channels_last (strides S*C, 1, C) is an (N*S, C) row-major matrix. A thread owns V
//    consecutive channels (one 16-byte vector) and walks down the rows, so a warp reads whole
//    row segments (coalesced) and every per-channel quantity (partial sums, coefficients)
//    lives in that thread's registers for the whole pass.
//  - NCHW (strides C*S, S, 1) is N planes of S contiguous elements per channel. The reductions
//    give each block one channel and a slice of its N * S elements, addressed as a flat index
//    over (plane, position) that is advanced incrementally (no division per element). The
//    elementwise passes walk the whole tensor as one contiguous array and track the channel
//    of each vector the same way.
//  When S == 1 both layouts address memory identically; it is run as channels_last (C > 1),
//  whose row walk is coalesced where an NCHW plane walk would stride by C.
//
// Vectors: V = 16 / sizeof(T) elements (one 128-bit access) whenever every tensor of the pass
// is 16-byte aligned and the contiguous run (C for channels_last, S for NCHW) is a multiple of
// V, so no vector straddles a row or a plane; otherwise V = 1 with more loads in flight.
//
// Numerics: fp32 accumulation (fp64 for fp64 input), fp32 element maths, one rounding to the
// output dtype. Batch statistics are Welford per thread and Chan's pairwise combination across
// threads, blocks and partials, taken of x minus a per-channel shift, so a large mean does not
// cancel the variance away (never E[x^2] - E[x]^2). All reductions run in a fixed order over
// fixed-size partials (no atomics), so results are bitwise reproducible on a given device.
// Partials are combined and per-channel coefficients computed in fp64 (C threads, negligible):
// invstd = 1 / sqrt(var + eps) included, from mean / var of any float dtype (running stats).
#include "batch_norm.h"
#include "cuda/common.cuh"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fusedres {
namespace {

using namespace fusedres::cuda;

// Threads per block of every streaming kernel.
constexpr int kThreads = 256;
// Combine kernel: 32 channels x 16 partial lanes per block.
constexpr int kCombineX = 32;
constexpr int kCombineY = 16;

// ---------------------------------------------------------------------------------------------
// Element types, conversions, vector access
// ---------------------------------------------------------------------------------------------

// Scalar loads. kStream marks the last read of a tensor in the op (evict-first, so it does
// not push out data that a later pass re-reads); the others use the default L2 policy.
__device__ __forceinline__ float ld1(const float* p, bool stream) { return stream ? __ldcs(p) : __ldg(p); }
__device__ __forceinline__ double ld1(const double* p, bool stream) { return stream ? __ldcs(p) : __ldg(p); }
__device__ __forceinline__ __half ld1(const __half* p, bool stream) {
  const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
  return __ushort_as_half(stream ? __ldcs(q) : __ldg(q));
}
__device__ __forceinline__ __nv_bfloat16 ld1(const __nv_bfloat16* p, bool stream) {
  const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
  return __ushort_as_bfloat16(stream ? __ldcs(q) : __ldg(q));
}

// V elements in their storage bits between load and use: for 16-bit inputs that is half the
// registers of fp32 values, which matters with several vectors in flight per thread. Vector
// packs are one uint4 and are unpacked with 32-bit word operations (a bf16 is the top half of
// an fp32), never through 16-bit register fragments, which cost registers and instructions.
template <class T, int V>
struct Pack {
  uint4 q;
};
template <class T>
struct Pack<T, 1> {
  T v;
};

template <int V, bool kStream, class T>
__device__ __forceinline__ Pack<T, V> ld_pack(const T* base, int64_t off) {
  Pack<T, V> r;
  if constexpr (V == 1) {
    r.v = ld1(base + off, kStream);
  } else {
    static_assert(sizeof(T) * V == 16, "vector packs are one 128-bit access");
    const uint4* p = reinterpret_cast<const uint4*>(base + off);
    r.q = kStream ? __ldcs(p) : __ldg(p);
  }
  return r;
}

template <int V, class T>
__device__ __forceinline__ void st_pack(T* base, int64_t off, const Pack<T, V>& v) {
  if constexpr (V == 1) {
    base[off] = v.v;
  } else {
    *reinterpret_cast<uint4*>(base + off) = v.q;
  }
}

__device__ __forceinline__ void words_of(const uint4& q, uint32_t (&w)[4]) {
  w[0] = q.x;
  w[1] = q.y;
  w[2] = q.z;
  w[3] = q.w;
}

template <class A, class T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& p, A (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_acc<A>(p.v);
  } else {
    uint32_t w[4];
    words_of(p.q, w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else if constexpr (std::is_same_v<T, __half>) {
        __half2 h;
        memcpy(&h, &w[i], sizeof(h));
        const float2 f = __half22float2(h);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
      } else if constexpr (std::is_same_v<T, float>) {
        out[i] = __uint_as_float(w[i]);
      } else {
        if (i % 2 == 0) {
          out[i / 2] = __hiloint2double(static_cast<int>(w[i + 1]), static_cast<int>(w[i]));
        }
      }
    }
  }
}

template <class T, int V, class A>
__device__ __forceinline__ Pack<T, V> pack(const A (&in)[V]) {
  Pack<T, V> p;
  if constexpr (V == 1) {
    p.v = Cvt<T>::from(in[0]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 b = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
        memcpy(&w[i], &b, sizeof(w[i]));
      } else if constexpr (std::is_same_v<T, __half>) {
        const __half2 h = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
        memcpy(&w[i], &h, sizeof(w[i]));
      } else if constexpr (std::is_same_v<T, float>) {
        w[i] = __float_as_uint(in[i]);
      } else {
        w[i] = static_cast<uint32_t>(i % 2 == 0 ? __double2loint(in[i / 2]) : __double2hiint(in[i / 2]));
      }
    }
    p.q = make_uint4(w[0], w[1], w[2], w[3]);
  }
  return p;
}

// weight, bias, mean, var and the running stats may be of any supported float dtype; they are
// read once per channel (by the per-channel kernels, or once per thread), so ld_any / st_any's
// run-time switch (common.cuh) is cheaper than instantiating the streaming kernels for every
// combination.

// A channel's normalization: mean, and invstd = 1 / sqrt(var + eps) computed in double, from
// mean / var of any float dtype (the batch statistics, or the running statistics in eval).
// Without mean and var (the tail of a conv with BN folded in): mean 0, invstd 1.
struct ChanNorm {
  const void* mean;  // null: no normalization
  const void* var;
  int mean_code;
  int var_code;
  double eps;

  __device__ __forceinline__ double mean_at(int64_t c) const {
    return mean != nullptr ? ld_any(mean, mean_code, c) : 0.0;
  }
  __device__ __forceinline__ double invstd_at(int64_t c) const {
    return var != nullptr ? 1.0 / sqrt(ld_any(var, var_code, c) + eps) : 1.0;
  }
};

// Coefficients of a per-channel affine pass, written by the per-channel kernels and read by
// the streaming ones with one 16-byte (fp64: two) load per channel.
//   forward:     p = {mean, invstd * weight, bias, 0}:   y = (x - p0) * p1 + p2
//   grad_input:  p = {mean, a, b, c0}:                   dx = a * g - (b * (x - p0) + c0)
// (x - mean) is kept as a difference rather than folded into a shift (x * s + t): with a
// mean far from zero, x * s and t would be large and cancel in fp32.
template <class A>
struct alignas(4 * sizeof(A)) ChanParams {
  A p[4];
};

__device__ __forceinline__ ChanParams<float> ld_params(const ChanParams<float>* base, int64_t c) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(base + c));
  return ChanParams<float>{{q.x, q.y, q.z, q.w}};
}
__device__ __forceinline__ ChanParams<double> ld_params(const ChanParams<double>* base, int64_t c) {
  const double2* p = reinterpret_cast<const double2*>(base + c);
  const double2 a = __ldg(p);
  const double2 b = __ldg(p + 1);
  return ChanParams<double>{{a.x, a.y, b.x, b.y}};
}

// The ReLU mask of the backward, exactly eager's threshold_backward: the gradient is blocked
// where out <= 0 (so a NaN output passes its gradient through, as in eager).
template <class A>
__device__ __forceinline__ bool relu_blocks(A out) {
  return out <= A(0);
}

// 1 / n, correctly rounded: one reciprocal per vector serves its V lanes.
__device__ __forceinline__ float recip(float n) { return __frcp_rn(n); }
__device__ __forceinline__ double recip(double n) { return __drcp_rn(n); }

// The per-sample scale of the normalized branch (rowscale, a drop path's kept-and-rescaled
// mask), of any float dtype. Sample n's elements are [n * C * S, (n + 1) * C * S) in both
// layouts, and a vector never straddles a row or a plane, so one value (one division of the
// element offset, one load, L1-resident) serves a vector's V lanes. The ops that take it have a
// kRowScale template flag: without a rowscale their code and registers are exactly as before.
struct RowScale {
  const void* ptr;
  int code;
  int64_t per_sample;     // C * S
  double inv_per_sample;  // 1 / per_sample

  // off / per_sample without a 64-bit integer division, which is a called routine (a stack frame:
  // local memory in every kernel that takes a rowscale): the quotient from the reciprocal, off by
  // at most one (off < 2^53), then corrected.
  template <class A>
  __device__ __forceinline__ A at(int64_t off) const {
    int64_t n = static_cast<int64_t>(static_cast<double>(off) * inv_per_sample);
    const int64_t start = n * per_sample;
    n += start > off ? -1 : (start + per_sample <= off ? 1 : 0);
    return static_cast<A>(ld_any(ptr, code, n));
  }
};

// The minimum blocks per SM a kernel over `Op` asks ptxas for: 1 for the rowscale variants, whose
// heuristic register budget (64) spilled (a few bytes of local memory); 0, ptxas's own choice (as
// without the hint), for every other op.
template <class Op, class = void>
inline constexpr int min_blocks = 0;
template <class Op>
inline constexpr int min_blocks<Op, std::void_t<decltype(Op::kMinBlocks)>> = Op::kMinBlocks;

// ---------------------------------------------------------------------------------------------
// Pairwise combination
// ---------------------------------------------------------------------------------------------

// Merges (b0, b1, nb) into (m0, m1, n). Welford: (mean, M2 = sum of squared deviations,
// count), Chan et al.'s parallel update, exact for empty sides; else plain sums.
template <bool kWelford, class T>
__device__ __forceinline__ void merge(T& m0, T& m1, T& n, T b0, T b1, T nb) {
  if constexpr (kWelford) {
    if (nb == T(0)) {
      return;
    }
    if (n == T(0)) {
      m0 = b0;
      m1 = b1;
      n = nb;
      return;
    }
    const T nt = n + nb;
    const T d = b0 - m0;
    const T f = nb / nt;
    m0 += d * f;
    m1 += b1 + d * d * n * f;
    n = nt;
  } else {
    m0 += b0;
    m1 += b1;
    n += nb;
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming ops
// ---------------------------------------------------------------------------------------------

//
// A reduction op accumulates per lane j < V a pair (s0[j], s1[j]) around a per-lane channel
// value mu[j] (center), all lanes sharing the element count n. In channels_last the lanes of a
// thread are V different channels; in NCHW they are V positions of one channel and are merged
// at the end. An elementwise op applies per-lane ChanParams. Loads are issued for kUnroll
// items before any of them is used, so each thread keeps kUnroll vectors per tensor in flight.

// kUnroll: 4 x 16 bytes per tensor with vectors; more of the narrower scalar loads (but not for
// fp64, whose coefficients would then take too many registers).
template <class X, int V>
constexpr int unroll_for() {
  return V > 1 || sizeof(X) == 8 ? 4 : 8;
}

// Batch statistics: Welford (s0 = mean, s1 = M2) of x - shift, shift = the channel's first
// element. The shift costs one subtraction per element and removes the mean's magnitude before
// anything is rounded (x - shift is exact for x near shift): the running mean stays small, so
// its rounding no longer leaks into M2 when |mean| >> std. The count is shared by the lanes,
// so the reciprocal is computed once per vector.
template <class X, int V_>
struct StatsOp {
  using A = acc_t<X>;
  static constexpr int V = V_;
  static constexpr bool kWelford = true;
  static constexpr int kUnroll = unroll_for<X, V_>();
  struct Loaded {
    Pack<X, V_> x;
  };
  const X* x;
  int64_t shift_stride;  // channel c's first element is x[c * shift_stride]

  __device__ __forceinline__ A center(int64_t c) const { return to_acc<A>(ld1(x + c * shift_stride, false)); }
  __device__ __forceinline__ void load(Loaded& l, int64_t off) const {
    // Default caching: the forward's apply pass re-reads x right after, and for the smaller
    // ResNet stages part of it is still in L2.
    l.x = ld_pack<V, false>(x, off);
  }
  __device__ __forceinline__ void accumulate(
      const Loaded& l, int64_t, const A (&shift)[V], A (&s0)[V], A (&s1)[V], A& n) const {
    n += A(1);
    const A inv = recip(n);
    A xv[V];
    unpack(l.x, xv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A v = xv[j] - shift[j];
      const A d = v - s0[j];
      s0[j] += d * inv;
      s1[j] += d * (v - s0[j]);
    }
  }
};

// Backward maths. Per channel, over its m = count elements (m = N*S, or the global count of
// sync BatchNorm), with xhat_i = (x_i - mean) * invstd, y_i = w * xhat_i + b and g_i the
// upstream gradient of y_i after the ReLU mask (g_i = 0 unless out_i > 0):
//
//   dL/dx_i = w * invstd * (g_i - sum_j g_j / m - xhat_i * sum_j (g_j * xhat_j) / m)
//
// (mean and invstd depend on every x_j: dmean/dx_i = 1/m, dvar/dx_i = 2 (x_i - mean) / m, so
// d(xhat_j)/dx_i = invstd * (delta_ij - 1/m - xhat_i xhat_j / m).) The first pass computes
// sum_dy = sum g and sum_dy_xhat = sum g * xhat, which are also dbias and dweight, and g itself
// is the residual's gradient (the residual enters before the ReLU). In eval mode mean and invstd
// are constants and dL/dx_i = w * invstd * g_i. The second pass uses, per channel,
//   a = w * invstd,  b = a * invstd * sum_dy_xhat / m,  c0 = a * sum_dy / m
//   dx_i = a * g_i - (b * (x_i - mean) + c0)
// which is the formula above with the channel constants folded (fp64 here, fp32 per element).
//
// With a rowscale (out = relu(y * rs_n + residual)), the residual's gradient is still g, and the
// normalized branch's is g * rs_n: every g above, in both passes, becomes g * rs_n (the sums,
// dweight and dbias included).
//
// Backward, first pass. s0 = sum g, s1 = sum g * (x - mean); the final * invstd is applied per
// channel in the combine kernel (one multiply per channel instead of per element).
template <class X, int V_, bool kRowScale>
struct BwdReduceOp {
  using A = acc_t<X>;
  static constexpr int V = V_;
  static constexpr int kMinBlocks = kRowScale ? 1 : 0;  // see min_blocks
  static constexpr bool kWelford = false;
  static constexpr int kUnroll = unroll_for<X, V_>();
  struct Loaded {
    Pack<X, V_> g;
    Pack<X, V_> o;
    Pack<X, V_> x;
  };
  const X* grad;
  const X* out;  // read only with relu
  const X* x;
  ChanNorm norm;  // its mean centres the sums (rounded to A, as the forward's coefficients)
  X* g_out;       // grad_residual; null when not requested
  bool relu;
  RowScale rs;  // read when kRowScale

  // Training passes batch statistics, of type A: that case is a plain load, because ld_any's
  // switch here costs the NCHW kernels registers (and an fp32 one, occupancy).
  __device__ __forceinline__ A center(int64_t c) const {
    if (norm.mean == nullptr) {
      return A(0);
    }
    if (norm.mean_code == (std::is_same_v<A, double> ? kF64 : kF32)) {
      return static_cast<const A*>(norm.mean)[c];
    }
    return static_cast<A>(ld_any(norm.mean, norm.mean_code, c));
  }
  __device__ __forceinline__ void load(Loaded& l, int64_t off) const {
    // grad_out, out and x are all read again by the grad_input pass (x always, the other two
    // when g is not written), so they keep the default L2 policy.
    l.g = ld_pack<V, false>(grad, off);
    if (relu) {
      l.o = ld_pack<V, false>(out, off);
    }
    l.x = ld_pack<V, false>(x, off);
  }
  __device__ __forceinline__ void accumulate(
      const Loaded& l, int64_t off, const A (&mu)[V], A (&s0)[V], A (&s1)[V], A&) const {
    A gv[V];
    A xv[V];
    unpack(l.g, gv);
    unpack(l.x, xv);
    if (relu) {
      A ov[V];
      unpack(l.o, ov);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        // An exact zero (not grad * 0, which is NaN for an infinite grad).
        gv[j] = relu_blocks(ov[j]) ? A(0) : gv[j];
      }
    }
    if (g_out != nullptr) {
      // gv holds grad_out's values or zeros, so re-rounding to X is exact.
      st_pack<V>(g_out, off, pack<X>(gv));
    }
    if constexpr (kRowScale) {
      const A r = rs.at<A>(off);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        gv[j] *= r;
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      s0[j] += gv[j];
      s1[j] += gv[j] * (xv[j] - mu[j]);
    }
  }
};

// Forward apply: out = relu(((x - mean) * invstd * w + b) * rs + residual).
template <class X, int V_, bool kRowScale>
struct FwdOp {
  using A = acc_t<X>;
  static constexpr int V = V_;
  static constexpr int kMinBlocks = kRowScale ? 1 : 0;  // see min_blocks
  static constexpr int kUnroll = unroll_for<X, V_>();
  struct Loaded {
    Pack<X, V_> x;
    Pack<X, V_> r;
  };
  const X* x;
  const X* r;  // null without residual
  X* out;
  const ChanParams<A>* params;
  bool relu;
  RowScale rs;  // read when kRowScale

  __device__ __forceinline__ void load(Loaded& l, int64_t off) const {
    l.x = ld_pack<V, true>(x, off);
    if (r != nullptr) {
      l.r = ld_pack<V, true>(r, off);
    }
  }
  __device__ __forceinline__ void apply(const Loaded& l, int64_t off, const ChanParams<A> (&pr)[V]) const {
    A v[V];
    unpack(l.x, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] = (v[j] - pr[j].p[0]) * pr[j].p[1] + pr[j].p[2];
    }
    if constexpr (kRowScale) {
      const A s = rs.at<A>(off);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[j] *= s;
      }
    }
    if (r != nullptr) {
      A rv[V];
      unpack(l.r, rv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[j] += rv[j];
      }
    }
    if (relu) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[j] = v[j] < A(0) ? A(0) : v[j];  // NaN propagates, as torch.relu
      }
    }
    st_pack<V>(out, off, pack<X>(v));
  }
};

// Backward, second pass (maths above BwdReduceOp).
template <class X, int V_, bool kRowScale>
struct BwdInputOp {
  using A = acc_t<X>;
  static constexpr int V = V_;
  static constexpr int kMinBlocks = kRowScale ? 1 : 0;  // see min_blocks
  static constexpr int kUnroll = unroll_for<X, V_>();
  struct Loaded {
    Pack<X, V_> g;
    Pack<X, V_> o;
    Pack<X, V_> x;
  };
  const X* grad;
  const X* out;  // null: grad is already masked (or no relu)
  const X* x;    // null in eval mode, where dx does not depend on x
  X* dx;
  const ChanParams<A>* params;
  RowScale rs;  // read when kRowScale

  __device__ __forceinline__ void load(Loaded& l, int64_t off) const {
    l.g = ld_pack<V, true>(grad, off);
    if (out != nullptr) {
      l.o = ld_pack<V, true>(out, off);
    }
    if (x != nullptr) {
      l.x = ld_pack<V, true>(x, off);
    }
  }
  __device__ __forceinline__ void apply(const Loaded& l, int64_t off, const ChanParams<A> (&pr)[V]) const {
    A v[V];
    unpack(l.g, v);
    if (out != nullptr) {
      A ov[V];
      unpack(l.o, ov);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[j] = relu_blocks(ov[j]) ? A(0) : v[j];
      }
    }
    if constexpr (kRowScale) {
      const A s = rs.at<A>(off);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[j] *= s;
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] *= pr[j].p[1];
    }
    if (x != nullptr) {
      A xv[V];
      unpack(l.x, xv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[j] -= pr[j].p[2] * (xv[j] - pr[j].p[0]) + pr[j].p[3];
      }
    }
    st_pack<V>(dx, off, pack<X>(v));
  }
};

// ---------------------------------------------------------------------------------------------
// Streaming kernels
// ---------------------------------------------------------------------------------------------

// channels_last: rows of C elements, R = N * S rows.
struct ClGeom {
  int64_t C;
  int64_t R;
  int64_t rows_per_chunk;  // reductions: rows of one partial
};

// NCHW: per channel `units` vectors of V elements, SV = S / V per plane. The (q, r, qc) triple
// advances a flat vector index by the kernel's fixed step: q = step / SV planes and r = step %
// SV positions (qc = q % C channels for the elementwise walk over all planes).
struct NchwGeom {
  int64_t C;
  int64_t S;
  int64_t SV;
  int64_t CS;
  int64_t units;  // reductions: vectors per channel (N * SV); elementwise: in the tensor
  int64_t per;    // reductions: vectors of one partial
  int64_t q;
  int64_t r;
  int64_t qc;
};

// Reduction over an (N*S, C) matrix. Block (tile, chunk): TX threads x V channels, TY threads
// down the chunk's rows; the TY per-thread results of each channel are combined in shared
// memory in ty order and written as one partial (chunk, c): no atomics, same order each run.
template <class Op>
__global__ void __launch_bounds__(kThreads, min_blocks<Op>)
    reduce_cl_kernel(const Op op, const ClGeom g, typename Op::A* __restrict__ part) {
  using A = typename Op::A;
  constexpr int V = Op::V;
  constexpr int U = Op::kUnroll;
  __shared__ A sh0[kThreads * V];
  __shared__ A sh1[kThreads * V];
  __shared__ A shn[kThreads];
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int TX = static_cast<int>(blockDim.x);
  const int TY = static_cast<int>(blockDim.y);
  const int64_t cbase = static_cast<int64_t>(blockIdx.x) * TX * V;
  const int64_t c0 = cbase + static_cast<int64_t>(tx) * V;
  const bool active = c0 < g.C;  // V > 1 implies C % V == 0, so the whole vector is in range

  A mu[V];
  A s0[V];
  A s1[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mu[j] = active ? op.center(c0 + j) : A(0);
    s0[j] = A(0);
    s1[j] = A(0);
  }
  A n = A(0);

  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * g.rows_per_chunk;
  const int64_t r1 = r0 + g.rows_per_chunk < g.R ? r0 + g.rows_per_chunk : g.R;
  if (active) {
    for (int64_t r = r0 + ty; r < r1; r += static_cast<int64_t>(TY) * U) {
      typename Op::Loaded ld[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t rr = r + static_cast<int64_t>(u) * TY;
        if (rr < r1) {
          op.load(ld[u], rr * g.C + c0);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t rr = r + static_cast<int64_t>(u) * TY;
        if (rr < r1) {
          op.accumulate(ld[u], rr * g.C + c0, mu, s0, s1, n);
        }
      }
    }
  }

  // Thread (tx, ty) saw the rows = ty (mod TY) of the chunk: its count depends on ty only, and
  // tx == 0 is always active (a tile starts below C).
  const int slots = TX * V;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sh0[ty * slots + tx * V + j] = s0[j];
    sh1[ty * slots + tx * V + j] = s1[j];
  }
  if (tx == 0) {
    shn[ty] = n;
  }
  __syncthreads();
  for (int s = ty * TX + tx; s < slots; s += TX * TY) {
    const int64_t c = cbase + s;
    if (c < g.C) {
      A m0 = sh0[s];
      A m1 = sh1[s];
      A cnt = shn[0];
      for (int y = 1; y < TY; ++y) {
        merge<Op::kWelford>(m0, m1, cnt, sh0[y * slots + s], sh1[y * slots + s], shn[y]);
      }
      part[static_cast<int64_t>(blockIdx.y) * g.C + c] = m0;
      part[(static_cast<int64_t>(gridDim.y) + blockIdx.y) * g.C + c] = m1;
    }
  }
}

// Reduction of one NCHW channel (blockIdx.x) over a slice (blockIdx.y) of its N * SV vectors.
// Thread t takes vectors t, t + 256, ... of the slice; the V lanes, then the warp (shuffle
// tree), then the 8 warps (in order) are combined into the partial (chunk, c).
template <class Op>
__global__ void __launch_bounds__(kThreads, min_blocks<Op>)
    reduce_nchw_kernel(const Op op, const NchwGeom g, typename Op::A* __restrict__ part) {
  using A = typename Op::A;
  constexpr int V = Op::V;
  constexpr int U = Op::kUnroll;
  constexpr int kWarps = kThreads / 32;
  __shared__ A sh[3][kWarps];
  const int64_t c = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);

  A mu[V];
  A s0[V];
  A s1[V];
  const A center = op.center(c);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mu[j] = center;
    s0[j] = A(0);
    s1[j] = A(0);
  }
  A n = A(0);

  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * g.per;
  const int64_t j1 = j0 + g.per < g.units ? j0 + g.per : g.units;
  const int64_t cbase = c * g.S;
  int64_t j = j0 + tid;
  int64_t plane = j / g.SV;
  int64_t pos = j - plane * g.SV;
  while (j < j1) {
    typename Op::Loaded ld[U];
    int64_t off[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ok[u] = j < j1;
      off[u] = plane * g.CS + cbase + pos * V;
      if (ok[u]) {
        op.load(ld[u], off[u]);
      }
      j += kThreads;
      pos += g.r;
      plane += g.q;
      if (pos >= g.SV) {
        pos -= g.SV;
        ++plane;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ok[u]) {
        op.accumulate(ld[u], off[u], mu, s0, s1, n);
      }
    }
  }

  A m0 = s0[0];
  A m1 = s1[0];
  A cnt = n;
#pragma unroll
  for (int l = 1; l < V; ++l) {
    merge<Op::kWelford>(m0, m1, cnt, s0[l], s1[l], n);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A b0 = __shfl_down_sync(0xffffffffu, m0, o);
    const A b1 = __shfl_down_sync(0xffffffffu, m1, o);
    const A bn = __shfl_down_sync(0xffffffffu, cnt, o);
    merge<Op::kWelford>(m0, m1, cnt, b0, b1, bn);
  }
  const int warp = tid >> 5;
  if ((tid & 31) == 0) {
    sh[0][warp] = m0;
    sh[1][warp] = m1;
    sh[2][warp] = cnt;
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < kWarps; ++w) {
      merge<Op::kWelford>(m0, m1, cnt, sh[0][w], sh[1][w], sh[2][w]);
    }
    part[static_cast<int64_t>(blockIdx.y) * g.C + c] = m0;
    part[(static_cast<int64_t>(gridDim.y) + blockIdx.y) * g.C + c] = m1;
  }
}

// Elementwise pass over an (N*S, C) matrix: the V channels' coefficients are loaded once per
// thread, then the thread strides down the rows (grid-stride over row tiles of TY * U rows).
template <class Op>
__global__ void __launch_bounds__(kThreads, min_blocks<Op>)
    ew_cl_kernel(const Op op, const int64_t C, const int64_t R) {
  using A = typename Op::A;
  constexpr int V = Op::V;
  constexpr int U = Op::kUnroll;
  const int ty = static_cast<int>(threadIdx.y);
  const int TY = static_cast<int>(blockDim.y);
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) {
    return;
  }
  ChanParams<A> pr[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    pr[j] = ld_params(op.params, c0 + j);
  }
  const int64_t step = static_cast<int64_t>(gridDim.y) * TY * U;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * TY * U + ty; r < R; r += step) {
    typename Op::Loaded ld[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + static_cast<int64_t>(u) * TY;
      if (rr < R) {
        op.load(ld[u], rr * C + c0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + static_cast<int64_t>(u) * TY;
      if (rr < R) {
        op.apply(ld[u], rr * C + c0, pr);
      }
    }
  }
}

// Elementwise pass over a dense NCHW tensor seen as one array of vectors (grid-stride); the
// channel of each vector is tracked incrementally and its coefficients come from L1.
template <class Op>
__global__ void __launch_bounds__(kThreads, min_blocks<Op>) ew_nchw_kernel(const Op op, const NchwGeom g) {
  using A = typename Op::A;
  constexpr int V = Op::V;
  constexpr int U = Op::kUnroll;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t plane = j / g.SV;
  int64_t pos = j - plane * g.SV;
  int64_t c = plane % g.C;
  while (j < g.units) {
    typename Op::Loaded ld[U];
    ChanParams<A> pu[U];
    bool ok[U];
    int64_t off[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ok[u] = j < g.units;
      off[u] = j * V;
      if (ok[u]) {
        op.load(ld[u], off[u]);
        pu[u] = ld_params(op.params, c);
      }
      j += step;
      pos += g.r;
      c += g.qc;
      if (pos >= g.SV) {
        pos -= g.SV;
        ++c;
      }
      if (c >= g.C) {
        c -= g.C;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ok[u]) {
        ChanParams<A> pr[V];
#pragma unroll
        for (int l = 0; l < V; ++l) {
          pr[l] = pu[u];
        }
        op.apply(ld[u], off[u], pr);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel kernels
// ---------------------------------------------------------------------------------------------

// In-place update of the running statistics, when tracked, as F.batch_norm does: per channel,
// in double, running = (1 - momentum) * running + momentum * batch with the unbiased batch
// variance var * count / (count - 1) (var itself for count <= 1); each running tensor is
// loaded and stored in its own dtype.
struct RunningStats {
  void* mean;  // null: not tracked
  void* var;
  int mean_code;
  int var_code;
  double momentum;

  __device__ void update(int64_t c, double batch_mean, double batch_var, double count) const {
    if (mean == nullptr) {
      return;
    }
    const double unbiased = count > 1.0 ? batch_var * count / (count - 1.0) : batch_var;
    st_any(mean, mean_code, c, (1.0 - momentum) * ld_any(mean, mean_code, c) + momentum * batch_mean);
    st_any(var, var_code, c, (1.0 - momentum) * ld_any(var, var_code, c) + momentum * unbiased);
  }
};

// A channel's batch statistics from (mean, M2, count): the mean and the biased variance
// M2 / count (what batch_norm normalizes with), stored in the stats dtype; the running stats
// are updated from the fp64 values, as the CPU backend does. count 0: NaN, as torch's mean /
// var of nothing, and the running stats are left as they are.
template <class A>
struct BatchStatsOut {
  A* mean;
  A* var;
  RunningStats running;

  __device__ void operator()(int64_t c, double m, double m2, double count) const {
    if (count == 0.0) {
      mean[c] = static_cast<A>(CUDART_NAN);
      var[c] = static_cast<A>(CUDART_NAN);
      return;
    }
    const double v = m2 / count;
    mean[c] = static_cast<A>(m);
    var[c] = static_cast<A>(v);
    running.update(c, m, v, count);
  }
};

template <class X>
struct StatsFinish {
  using A = acc_t<X>;
  const X* x;  // for the shift, see StatsOp
  int64_t shift_stride;
  BatchStatsOut<A> out;
  __device__ void operator()(int64_t c, double m, double m2, double n) const {
    // An empty batch has no first element to shift by (and no statistics).
    const double shift = n > 0.0 ? static_cast<double>(to_acc<A>(x[c * shift_stride])) : 0.0;
    out(c, shift + m, m2, n);
  }
};

template <class A>
struct SumsFinish {
  A* sum_dy;
  A* sum_dy_xhat;
  ChanNorm norm;
  __device__ void operator()(int64_t c, double s0, double s1, double n) const {
    // n == 0: sums over nothing are 0, whatever invstd is.
    sum_dy[c] = static_cast<A>(s0);
    sum_dy_xhat[c] = n > 0.0 ? static_cast<A>(s1 * norm.invstd_at(c)) : A(0);
  }
};

// Combines the (2, chunks, C) partials of a reduction per channel in fp64: lane ty takes
// chunks ty, ty + 16, ... in order, then the 16 lanes are merged in order. Partial k holds
// (min(units, (k + 1) * per) - k * per) * unit_elems elements (Welford needs the counts).
// No chunks (an empty batch; part may then be null): fin sees (0, 0, 0).
template <bool kWelford, class A, class Fin>
__global__ void __launch_bounds__(kCombineX* kCombineY) combine_kernel(const A* __restrict__ part, int64_t chunks,
    int64_t C, int64_t per, int64_t units, int64_t unit_elems, const Fin fin) {
  __shared__ double sh[3][kCombineY][kCombineX];
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCombineX + tx;
  double m0 = 0.0;
  double m1 = 0.0;
  double n = 0.0;
  if (c < C) {
    for (int64_t k = ty; k < chunks; k += kCombineY) {
      const int64_t lo = k * per;
      const int64_t hi = lo + per < units ? lo + per : units;
      merge<kWelford>(m0, m1, n, static_cast<double>(part[k * C + c]), static_cast<double>(part[(chunks + k) * C + c]),
          static_cast<double>((hi - lo) * unit_elems));
    }
  }
  sh[0][ty][tx] = m0;
  sh[1][ty][tx] = m1;
  sh[2][ty][tx] = n;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int y = 1; y < kCombineY; ++y) {
      merge<kWelford>(m0, m1, n, sh[0][y][tx], sh[1][y][tx], sh[2][y][tx]);
    }
    fin(c, m0, m1, n);
  }
}

// Synchronized BatchNorm: channel c of the (W, 2C + 1) stats rows (mean, biased var, count) of
// every process, merged in row order in fp64 with Chan et al.'s formula (M2 = var * count; rows
// with no values skipped), then stored and the running stats updated as by batch_norm_stats,
// with the total count.
template <class A>
__global__ void __launch_bounds__(kThreads)
    combine_stats_kernel(const A* __restrict__ stats, int64_t W, int64_t C, const BatchStatsOut<A> out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  const int64_t row = 2 * C + 1;
  double m = 0.0;
  double m2 = 0.0;
  double n = 0.0;
  for (int64_t w = 0; w < W; ++w) {
    const A* s = stats + w * row;
    const double count = static_cast<double>(s[2 * C]);
    if (count > 0.0) {
      merge<true>(m, m2, n, static_cast<double>(s[c]), static_cast<double>(s[C + c]) * count, count);
    }
  }
  out(c, m, m2, n);
}

// Forward coefficients {mean, invstd * weight, bias, 0}, weight/bias converted on load.
template <class A>
__global__ void fwd_params_kernel(const ChanNorm norm, const void* weight, int w_code, const void* bias, int b_code,
    ChanParams<A>* params, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  const double w = weight != nullptr ? ld_any(weight, w_code, c) : 1.0;
  const double b = bias != nullptr ? ld_any(bias, b_code, c) : 0.0;
  params[c] =
      ChanParams<A>{{static_cast<A>(norm.mean_at(c)), static_cast<A>(norm.invstd_at(c) * w), static_cast<A>(b), A(0)}};
}

// Coefficients of the grad_input pass (maths above BwdReduceOp); sum_dy / sum_dy_xhat are read
// in training only (they may be null in eval).
template <class A>
__global__ void bwd_params_kernel(const ChanNorm norm, const void* weight, int w_code, const A* sum_dy,
    const A* sum_dy_xhat, double inv_count, bool training, ChanParams<A>* params, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  const double is = norm.invstd_at(c);
  const double a = (weight != nullptr ? ld_any(weight, w_code, c) : 1.0) * is;
  double b = 0.0;
  double c0 = 0.0;
  if (training) {
    b = a * is * static_cast<double>(sum_dy_xhat[c]) * inv_count;
    c0 = a * static_cast<double>(sum_dy[c]) * inv_count;
  }
  params[c] =
      ChanParams<A>{{static_cast<A>(norm.mean_at(c)), static_cast<A>(a), static_cast<A>(b), static_cast<A>(c0)}};
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

const void* ptr_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }
int code_or_f32(const std::optional<Tensor>& t) { return t.has_value() ? dtype_code(t->scalar_type()) : kF32; }

ChanNorm make_norm(const std::optional<Tensor>& mean, const std::optional<Tensor>& var, double eps) {
  return ChanNorm{ptr_or_null(mean), ptr_or_null(var), code_or_f32(mean), code_or_f32(var), eps};
}

RunningStats make_running(const std::optional<Tensor>& mean, const std::optional<Tensor>& var, double momentum) {
  return RunningStats{mean.has_value() ? mean->mutable_data_ptr() : nullptr,
      var.has_value() ? var->mutable_data_ptr() : nullptr, code_or_f32(mean), code_or_f32(var), momentum};
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<X>{}) with X the CUDA element type of t.
template <class F>
void dispatch_float(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Float:
      f(Tag<float>{});
      break;
    case ScalarType::Double:
      f(Tag<double>{});
      break;
    case ScalarType::Half:
      f(Tag<__half>{});
      break;
    case ScalarType::BFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    default:
      STD_TORCH_CHECK(false, "fusedres: unsupported dtype");
  }
}

// One op call's geometry and launch context.
struct Launch {
  const Tensor* like;  // allocations (partials) follow its device
  int64_t N;
  int64_t C;
  int64_t S;
  bool cl;  // (N*S, C) row-major addressing; also used for S == 1
  int device;
  cudaStream_t stream;
  int sms;
};

Launch make_launch(const Tensor& input, const ChannelsView& v) {
  STD_TORCH_CHECK(v.channels < (int64_t{1} << 31), "fusedres: too many channels");
  Launch L{};
  L.like = &input;
  L.N = v.batch;
  L.C = v.channels;
  L.S = v.spatial;
  L.cl = v.channels_last || (v.spatial == 1 && v.channels > 1);
  L.device = input.get_device_index();
  L.stream = current_stream(L.device);
  L.sms = sm_count(L.device);
  return L;
}

// Whether the 16-byte vector kernels apply to these tensors (null entries are ignored).
bool use_vectors(const Launch& L, size_t elem, std::initializer_list<const void*> ptrs) {
  const int64_t V = 16 / static_cast<int64_t>(elem);
  if ((L.cl ? L.C : L.S) % V != 0) {
    return false;
  }
  for (const void* p : ptrs) {
    if (!aligned16(p)) {
      return false;
    }
  }
  return true;
}

// channels_last thread tile: TX threads x V channels, TY = kThreads / TX rows. A narrow matrix
// (<= 64 vectors per row) is one tile, whole rows per warp step (contiguous); wider ones are
// cut into 32-vector tiles (512 contiguous bytes per warp and row).
struct ClTile {
  int tx;
  int ty;
  int64_t ctiles;
};

ClTile cl_tile(int64_t C, int V) {
  const int64_t cv = ceil_div(C, V);
  ClTile t{};
  if (cv <= 64) {
    t.tx = static_cast<int>(cv);
    t.ctiles = 1;
  } else {
    t.tx = 32;
    t.ctiles = ceil_div(cv, 32);
  }
  t.ty = std::max(1, kThreads / t.tx);
  return t;
}

ScalarType acc_scalar_type(bool is_double) { return is_double ? ScalarType::Double : ScalarType::Float; }

// Reduction over every channel, then the per-channel combine that hands (c, s0, s1, n) to fin.
// The grid is one wave of resident blocks (split between channel tiles and row chunks), each
// block streaming a long contiguous slice; the partials are (2, chunks, C), written once per
// block. Same device and shape -> same split -> bitwise-identical results. An empty batch
// launches only the combine, over no partials.
template <class Op, class Fin>
void run_reduce(const Op& op, const Launch& L, const Fin& fin) {
  using A = typename Op::A;
  constexpr int V = Op::V;
  constexpr int U = Op::kUnroll;
  const ScalarType acc = acc_scalar_type(std::is_same_v<A, double>);
  const int64_t C = L.C;
  int64_t chunks = 0;
  int64_t per = 1;
  int64_t units = 0;
  int64_t unit_elems = 1;
  Tensor part;
  A* part_ptr = nullptr;
  if (L.N * L.S == 0) {
    // Nothing to reduce.
  } else if (L.cl) {
    const ClTile t = cl_tile(C, V);
    constexpr auto kernel = reduce_cl_kernel<Op>;
    const int64_t wave = static_cast<int64_t>(L.sms) * blocks_per_sm<kernel>(L.device, t.tx * t.ty);
    const int64_t R = L.N * L.S;
    chunks = std::max<int64_t>(1, wave / t.ctiles);
    chunks = std::min<int64_t>({chunks, ceil_div(R, static_cast<int64_t>(t.ty) * U), 65535});
    per = ceil_div(R, chunks);
    chunks = ceil_div(R, per);
    units = R;
    part = empty_on(*L.like, {2, chunks, C}, acc);
    part_ptr = static_cast<A*>(part.mutable_data_ptr());
    const dim3 grid(static_cast<unsigned int>(t.ctiles), static_cast<unsigned int>(chunks));
    kernel<<<grid, dim3(t.tx, t.ty), 0, L.stream>>>(op, ClGeom{C, R, per}, part_ptr);
    check_launch("reduce_cl_kernel");
  } else {
    constexpr auto kernel = reduce_nchw_kernel<Op>;
    const int64_t wave = static_cast<int64_t>(L.sms) * blocks_per_sm<kernel>(L.device, kThreads);
    const int64_t SV = L.S / V;
    units = L.N * SV;
    unit_elems = V;
    chunks = std::max<int64_t>(1, wave / C);
    chunks = std::min<int64_t>({chunks, ceil_div(units, static_cast<int64_t>(kThreads) * U), 65535});
    per = ceil_div(units, chunks);
    chunks = ceil_div(units, per);
    part = empty_on(*L.like, {2, chunks, C}, acc);
    part_ptr = static_cast<A*>(part.mutable_data_ptr());
    const NchwGeom g{C, L.S, SV, C * L.S, units, per, kThreads / SV, kThreads % SV, 0};
    const dim3 grid(static_cast<unsigned int>(C), static_cast<unsigned int>(chunks));
    kernel<<<grid, kThreads, 0, L.stream>>>(op, g, part_ptr);
    check_launch("reduce_nchw_kernel");
  }
  const unsigned int cgrid = static_cast<unsigned int>(ceil_div(C, kCombineX));
  combine_kernel<Op::kWelford, A, Fin>
      <<<cgrid, dim3(kCombineX, kCombineY), 0, L.stream>>>(part_ptr, chunks, C, per, units, unit_elems, fin);
  check_launch("combine_kernel");
}

// Elementwise pass; one wave of resident blocks with a grid-stride loop (equal shares, no tail).
template <class Op>
void run_elementwise(const Op& op, const Launch& L) {
  constexpr int V = Op::V;
  constexpr int U = Op::kUnroll;
  const int64_t C = L.C;
  if (L.cl) {
    const ClTile t = cl_tile(C, V);
    constexpr auto kernel = ew_cl_kernel<Op>;
    const int64_t wave = static_cast<int64_t>(L.sms) * blocks_per_sm<kernel>(L.device, t.tx * t.ty);
    const int64_t R = L.N * L.S;
    int64_t gy = std::max<int64_t>(1, wave / t.ctiles);
    gy = std::min<int64_t>({gy, ceil_div(R, static_cast<int64_t>(t.ty) * U), 65535});
    const dim3 grid(static_cast<unsigned int>(t.ctiles), static_cast<unsigned int>(gy));
    kernel<<<grid, dim3(t.tx, t.ty), 0, L.stream>>>(op, C, R);
    check_launch("ew_cl_kernel");
  } else {
    constexpr auto kernel = ew_nchw_kernel<Op>;
    const int64_t wave = static_cast<int64_t>(L.sms) * blocks_per_sm<kernel>(L.device, kThreads);
    const int64_t SV = L.S / V;
    const int64_t total = L.N * C * SV;
    const int64_t blocks = std::max<int64_t>(1, std::min(wave, ceil_div(total, static_cast<int64_t>(kThreads) * U)));
    const int64_t step = blocks * kThreads;
    const int64_t q = step / SV;
    const NchwGeom g{C, L.S, SV, C * L.S, total, 0, q, step % SV, q % C};
    kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, L.stream>>>(op, g);
    check_launch("ew_nchw_kernel");
  }
}

// Calls f(integral_constant<int, V>) with V the 16-byte vector width when `vec`, else 1.
template <class X, class F>
void with_width(bool vec, F&& f) {
  constexpr int kV = 16 / static_cast<int>(sizeof(X));
  if (vec) {
    f(std::integral_constant<int, kV>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f(bool_constant<b>): the ops' kRowScale flag from whether a rowscale was given.
template <class F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

RowScale make_rowscale(const std::optional<Tensor>& rowscale, const Launch& L) {
  return RowScale{ptr_or_null(rowscale), code_or_f32(rowscale), L.C * L.S, 1.0 / static_cast<double>(L.C * L.S)};
}

unsigned int channel_grid(int64_t C) { return static_cast<unsigned int>(ceil_div(C, kThreads)); }

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, double momentum) {
  const ChannelsView v = check_bn_stats_args(input, running_mean, running_var);
  STD_TORCH_CHECK(input.is_cuda(), "fusedres: batch_norm_stats (CUDA) expects CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  const ScalarType acc = bn_stats_dtype(input);
  Tensor mean = empty_on(input, {v.channels}, acc);
  Tensor var = empty_on(input, {v.channels}, acc);
  const Launch L = make_launch(input, v);
  const RunningStats running = make_running(running_mean, running_var, momentum);
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    using A = acc_t<X>;
    const X* x = static_cast<const X*>(input.const_data_ptr());
    const int64_t shift_stride = L.cl ? 1 : L.S;
    const StatsFinish<X> fin{x, shift_stride,
        BatchStatsOut<A>{static_cast<A*>(mean.mutable_data_ptr()), static_cast<A*>(var.mutable_data_ptr()), running}};
    with_width<X>(use_vectors(L, sizeof(X), {x}),
        [&](auto w) { run_reduce(StatsOp<X, decltype(w)::value>{x, shift_stride}, L, fin); });
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> batch_norm_combine_stats_cuda(const Tensor& stats, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, double momentum) {
  const int64_t C = check_bn_combine_args(stats, running_mean, running_var);
  STD_TORCH_CHECK(stats.is_cuda(), "fusedres: batch_norm_combine_stats (CUDA) expects CUDA tensors");
  const int device = stats.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const ScalarType dt = stats.scalar_type();
  Tensor mean = empty_on(stats, {C}, dt);
  Tensor var = empty_on(stats, {C}, dt);
  const RunningStats running = make_running(running_mean, running_var, momentum);
  const cudaStream_t stream = current_stream(device);
  auto launch = [&](auto tag) {
    using A = typename decltype(tag)::type;
    combine_stats_kernel<A><<<channel_grid(C), kThreads, 0, stream>>>(static_cast<const A*>(stats.const_data_ptr()),
        stats.size(0), C,
        BatchStatsOut<A>{static_cast<A*>(mean.mutable_data_ptr()), static_cast<A*>(var.mutable_data_ptr()), running});
    check_launch("combine_stats_kernel");
  };
  if (dt == ScalarType::Double) {
    launch(Tag<double>{});
  } else {
    launch(Tag<float>{});
  }
  return {mean, var};
}

Tensor batch_norm_add_relu_fwd_cuda(const Tensor& input, const std::optional<Tensor>& residual,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& mean, const std::optional<Tensor>& var, double eps, bool relu, bool /*training*/,
    int64_t /*count*/) {
  const ChannelsView v = check_bn_fwd_args(input, residual, rowscale, weight, bias, mean, var);
  STD_TORCH_CHECK(input.is_cuda(), "fusedres: batch_norm_add_relu_fwd (CUDA) expects CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  Tensor out = empty_strided_like(input, input.scalar_type());
  if (v.per_channel() == 0) {
    return out;
  }
  const Launch L = make_launch(input, v);
  const int64_t C = v.channels;
  Tensor params = empty_on(input, {C, 4}, bn_stats_dtype(input));
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    using A = acc_t<X>;
    ChanParams<A>* p = static_cast<ChanParams<A>*>(params.mutable_data_ptr());
    fwd_params_kernel<A><<<channel_grid(C), kThreads, 0, L.stream>>>(make_norm(mean, var, eps), ptr_or_null(weight),
        code_or_f32(weight), ptr_or_null(bias), code_or_f32(bias), p, C);
    check_launch("fwd_params_kernel");
    const X* x = static_cast<const X*>(input.const_data_ptr());
    const X* r = residual.has_value() ? static_cast<const X*>(residual->const_data_ptr()) : nullptr;
    X* o = static_cast<X*>(out.mutable_data_ptr());
    const RowScale rs = make_rowscale(rowscale, L);
    with_width<X>(use_vectors(L, sizeof(X), {x, r, o}), [&](auto w) {
      with_flag(rowscale.has_value(),
          [&](auto k) { run_elementwise(FwdOp<X, decltype(w)::value, decltype(k)::value>{x, r, o, p, relu, rs}, L); });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_add_relu_bwd_reduce_cuda(const Tensor& grad_out, const Tensor& out,
    const Tensor& input, const std::optional<Tensor>& rowscale, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& var, double eps, bool relu, bool write_grad_residual) {
  const ChannelsView v = check_bn_bwd_args(grad_out, out, input, rowscale, mean, var, std::nullopt);
  STD_TORCH_CHECK(input.is_cuda(), "fusedres: batch_norm_add_relu_bwd_reduce (CUDA) expects CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  const ScalarType acc = bn_stats_dtype(input);
  Tensor sum_dy = empty_on(input, {v.channels}, acc);
  Tensor sum_dy_xhat = empty_on(input, {v.channels}, acc);
  Tensor grad_residual =
      write_grad_residual ? empty_strided_like(input, input.scalar_type()) : empty_on(input, {0}, input.scalar_type());
  // An empty batch still runs the combine, which writes zero sums.
  const Launch L = make_launch(input, v);
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    using A = acc_t<X>;
    const X* g = static_cast<const X*>(grad_out.const_data_ptr());
    const X* o = relu ? static_cast<const X*>(out.const_data_ptr()) : nullptr;
    const X* x = static_cast<const X*>(input.const_data_ptr());
    X* gr = write_grad_residual ? static_cast<X*>(grad_residual.mutable_data_ptr()) : nullptr;
    const ChanNorm norm = make_norm(mean, var, eps);
    const SumsFinish<A> fin{
        static_cast<A*>(sum_dy.mutable_data_ptr()), static_cast<A*>(sum_dy_xhat.mutable_data_ptr()), norm};
    const RowScale rs = make_rowscale(rowscale, L);
    with_width<X>(use_vectors(L, sizeof(X), {g, o, x, gr}), [&](auto w) {
      with_flag(rowscale.has_value(), [&](auto k) {
        run_reduce(BwdReduceOp<X, decltype(w)::value, decltype(k)::value>{g, o, x, norm, gr, relu, rs}, L, fin);
      });
    });
  });
  return {sum_dy, sum_dy_xhat, grad_residual};
}

Tensor batch_norm_add_relu_bwd_input_cuda(const Tensor& grad, const std::optional<Tensor>& out, const Tensor& input,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& mean, const std::optional<Tensor>& var,
    double eps, const std::optional<Tensor>& weight, const std::optional<Tensor>& sum_dy,
    const std::optional<Tensor>& sum_dy_xhat, int64_t count, bool training, bool relu) {
  const ChannelsView v = check_bn_bwd_args(grad, out, input, rowscale, mean, var, weight);
  const int64_t C = v.channels;
  check_bn_sums(sum_dy, sum_dy_xhat, input, C, training, count);
  STD_TORCH_CHECK(input.is_cuda(), "fusedres: batch_norm_add_relu_bwd_input (CUDA) expects CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  Tensor dx = empty_strided_like(input, input.scalar_type());
  if (v.per_channel() == 0) {
    return dx;
  }
  const Launch L = make_launch(input, v);
  Tensor params = empty_on(input, {C, 4}, bn_stats_dtype(input));
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    using A = acc_t<X>;
    ChanParams<A>* p = static_cast<ChanParams<A>*>(params.mutable_data_ptr());
    // The sums are read in training only (check_bn_sums: then both are given).
    bwd_params_kernel<A><<<channel_grid(C), kThreads, 0, L.stream>>>(make_norm(mean, var, eps), ptr_or_null(weight),
        code_or_f32(weight), training ? static_cast<const A*>(sum_dy->const_data_ptr()) : nullptr,
        training ? static_cast<const A*>(sum_dy_xhat->const_data_ptr()) : nullptr,
        training ? 1.0 / static_cast<double>(count) : 0.0, training, p, C);
    check_launch("bwd_params_kernel");
    const X* g = static_cast<const X*>(grad.const_data_ptr());
    const X* o = relu && out.has_value() ? static_cast<const X*>(out->const_data_ptr()) : nullptr;
    // Eval: dx = a * g does not depend on x, so x is not read at all.
    const X* x = training ? static_cast<const X*>(input.const_data_ptr()) : nullptr;
    X* d = static_cast<X*>(dx.mutable_data_ptr());
    const RowScale rs = make_rowscale(rowscale, L);
    with_width<X>(use_vectors(L, sizeof(X), {g, o, x, d}), [&](auto w) {
      with_flag(rowscale.has_value(), [&](auto k) {
        run_elementwise(BwdInputOp<X, decltype(w)::value, decltype(k)::value>{g, o, x, d, p, rs}, L);
      });
    });
  });
  return dx;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("batch_norm_stats", TORCH_BOX(&batch_norm_stats_cuda));
  m.impl("batch_norm_combine_stats", TORCH_BOX(&batch_norm_combine_stats_cuda));
  m.impl("batch_norm_add_relu_fwd", TORCH_BOX(&batch_norm_add_relu_fwd_cuda));
  m.impl("batch_norm_add_relu_bwd_reduce", TORCH_BOX(&batch_norm_add_relu_bwd_reduce_cuda));
  m.impl("batch_norm_add_relu_bwd_input", TORCH_BOX(&batch_norm_add_relu_bwd_input_cuda));
}

}  // namespace fusedres
