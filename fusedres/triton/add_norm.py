"""Add & Norm (h = residual + dropout(x) * rowscale * colscale, y = LayerNorm/RMSNorm(h) *
(weight + weight_offset) + bias) as Triton kernels, and its in-place form.

The operators' arguments and outputs are those of fusedres/spec/add_norm.py (the eager spec is
fusedres/reference/add_norm.py). Two ways in:

* Eager launchers, plain functions that launch the kernels directly (fusedres/ops calls them from
  its autograd.Function; the public entry point has validated the arguments):
  ``add_norm_fwd(*args)``, ``add_norm_bwd(*args)`` and ``add_norm_inplace(*args)``, args in the
  spec's order (``FwdArgs`` / ``BwdArgs`` / ``InplaceArgs``). Row operands have unit stride along
  N and leading dims that collapse into rows of one stride (a contiguous tensor, or a row-strided
  slice of one); M = numel / N rows; weight, bias, colscale and rowscale are N (M) contiguous
  elements of any shape. In the backward, h (stored) is read when given, else it is formed again
  from x (and residual) in the kernel, as the forward formed it; the dropout mask is always drawn
  again from seed_offset (Philox, fusedres/triton/philox.py), never read. In place, the forward
  kernel writes h over residual and y over x.

* The registered operators ``fusedres::add_norm_{fwd,bwd,inplace}_triton``,
  with the spec's schemas (for torch.compile and opcheck; fusedres/ops adds autograd). They
  validate their arguments with the spec's checks, then run the launcher: compiled, as
  ``torch.library.triton_op`` with ``wrap_triton`` applied to the kernels (the launcher's
  ``launch`` argument), so torch.compile sees the kernels; under Triton's interpreter
  (TRITON_INTERPRET=1, which ``wrap_triton`` does not accept) as an opaque
  ``torch.library.custom_op`` whose fake implementation only allocates the outputs
  (fusedres/triton/register.py).

Arithmetic is in float32, or float64 when x (forward) / dy (backward) is float64: the statistics
dtype, also that of mean and rstd. On CPU tensors the kernels run under the interpreter
(TRITON_INTERPRET=1 set before triton is imported), which is how CI tests them.

Launch configurations, pure functions of the shape and dtype (and the SM count), so that an
ahead-of-time compiler can enumerate every specialization ("interpreted": the interpreter's):

* ``add_norm_fwd_config(N, dtype) -> RowConfig(block_n, single_block, num_warps)``: one row per
  program. SINGLE_BLOCK when next_power_of_2(N) <= min(64 KiB / itemsize, 16384): the row stays
  in registers; else rows loop over blocks of 4096. num_warps = BLOCK_N / 512, clamped to 4..16.
* ``add_norm_bwd_config(N, dtype, transformed) -> RowConfig``: as the forward with a limit of
  8192 elements (4096 with x's branch transformed, 2048 for float64: wider blocks spill registers
  on sm_80 / sm_90), and BLOCK_N / 256 warps.
* ``add_norm_bwd_grid(M, block_n, sm_count) -> (programs, rows_per_program)``: programs share
  the rows (4, 2 or 1 waves of SMs for blocks <= 1024, <= 4096, wider); each writes one row of
  the (programs, N) dweight / dbias partials.
* ``column_sum_config() -> ColumnSumConfig(block_p, block_n, num_warps)``: the partials' sum.

Specializations: each kernel's constexprs, the dtypes of its pointers, and which optional
pointers are None (a constant to Triton; the kernels branch on it); Triton also specializes
integer arguments on == 1 and on divisibility by 16, except those in ``do_not_specialize``.

* ``_add_norm_fwd_kernel``: H_CODE (h_dtype as ``_DTYPE_CODE``), IS_RMS, SINGLE_BLOCK, BLOCK_N,
  ALIGNED (dropout with N % 4 == 0; False without dropout); optional residual, weight, bias, h
  (stored or not), mean (None for RMSNorm), rstd (None in place), seed_offset (dropout), rowscale,
  colscale, mask (asked for or not).
* ``_add_norm_bwd_kernel``: H_CODE (_KEEP unless h is formed from x), IS_RMS, SINGLE_BLOCK,
  BLOCK_N, ALIGNED; optional dh, h, x, residual, weight, mean, dresidual, seed_offset, rowscale,
  colscale, dweight / dbias / dcolscale partials.
* ``_column_sum_kernel``: BLOCK_P, BLOCK_N; optional dweight / dbias / dcolscale partials.

The dropout probability is not specialized: threshold(p) and scale(p) reach the kernels as ints
of one type whatever p (see _dropout_args); weight_offset reaches them as two floats, or as None
when it is 0. With every feature off (no seed_offset, rowscale, colscale, mask, weight_offset) the
kernels are the ones without the features: the same instructions for sm_90 (the register
allocation aside).
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fusedres.reference.philox import dropout_scale, dropout_threshold
from fusedres.spec import DTYPE_CODES
from fusedres.spec import add_norm as spec
from fusedres.spec.python import allocate, arguments, checker
from fusedres.triton.philox import philox_bits, philox_bits_aligned, philox_key_offset
from fusedres.triton.register import INTERPRETED as _INTERPRETED
from fusedres.triton.register import register_op

FwdArgs = arguments(spec.FWD)
BwdArgs = arguments(spec.BWD)
InplaceArgs = arguments(spec.INPLACE)
check_fwd = checker(spec.FWD)
check_bwd = checker(spec.BWD)
check_inplace = checker(spec.INPLACE)

# ----------------------------------------------------------------------------------------------
# Kernels: helpers shared with fusedres/triton/batch_norm.py
# ----------------------------------------------------------------------------------------------

# Triton's interpreter (3.x) converts float32 to bfloat16 by truncation (its rounding helper drops
# the low bits and does not carry), unlike the GPU's cvt.rn and torch; under the interpreter the
# kernels round to nearest even by hand so results match eager bit for bit.
_BF16_RNE_BY_HAND = tl.constexpr(_INTERPRETED)


@triton.jit
def _round_to(v, DST: tl.constexpr):
    # Round v (float32 or float64) to DST. Float64 goes to 16-bit types through float32, as torch
    # does (c10::Half and c10::BFloat16 are built from a float), so results match eager bit for
    # bit; it also avoids a direct fp64 -> bf16 truncation that the interpreter gets wrong.
    if DST == tl.bfloat16:
        v = v.to(tl.float32)
        if _BF16_RNE_BY_HAND:
            bits = v.to(tl.uint32, bitcast=True)
            rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            quiet_nan = (bits >> 16) | 0x40
            out = tl.where(v != v, quiet_nan, rne).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = v.to(DST)
    else:
        if DST == tl.float16:
            v = v.to(tl.float32)
        out = v.to(DST)
    return out


# A dtype as a kernel constant (the spec's DTYPE_CODES, shared with the C++ kernels): torch.compile's
# kernel wrapper passes ints, not Triton dtypes. _KEEP: no rounding.
_DTYPE_CODE = {getattr(torch, name): code for name, code in DTYPE_CODES.items()}
_KEEP = -1


@triton.jit
def _round_to_code(v, CODE: tl.constexpr):
    # _round_to the dtype of code CODE; _KEEP (or float64, which holds every value of v) keeps v.
    if CODE == 0:
        out = _round_to(v, tl.float32)
    elif CODE == 2:
        out = _round_to(v, tl.float16)
    elif CODE == 3:
        out = _round_to(v, tl.bfloat16)
    else:
        out = v
    return out


@triton.jit
def _rsqrt_rn(v):
    # 1 / sqrt(v) correctly rounded, as torch's 1 / std::sqrt (tl.sqrt and "/" are approximate in
    # float32 on GPU).
    if v.dtype == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.div_rn(1.0, tl.sqrt_rn(v))
    return r


@triton.jit
def _f64_arg(hi, lo, acc_ty: tl.constexpr):
    # A float argument passed as hi + lo (see _split_float): float arguments reach kernels as
    # float32, and float64 kernels need eps and momentum to float64 precision.
    return tl.cast(hi, acc_ty) + tl.cast(lo, acc_ty)


# ----------------------------------------------------------------------------------------------
# Kernels: x's branch (the residual features)
# ----------------------------------------------------------------------------------------------

# x reaches h through its branch, v = x * (keep ? scale : 0) * rowscale * colscale, multiplied in
# that order as the reference does (fusedres/reference/add_norm.py), then h = residual + v is
# rounded to h's dtype. keep(e), e = row * N + col, follows the Philox counter layout of
# fusedres/triton/philox.py; the mask is never stored for the backward, which draws it again.
#
# On a GPU, Triton contracts a product that feeds an add into one FMA (one rounding where eager
# rounds the product, then the sum); the branch's products go through mul_rn, which is never
# contracted, so h stays bitwise eager's. (The interpreter has no libdevice and no contraction.)
#
# Helpers take None for an absent operand (a compile-time constant) but return only tensors:
# Triton 3.6 cannot return None from a function.
_NO_LIBDEVICE = tl.constexpr(_INTERPRETED)


@triton.jit
def _f64_bits_arg(bits, acc_ty: tl.constexpr):
    # A double passed as the int64 of its bits (_dropout_args), rounded once to acc_ty.
    return bits.to(tl.float64, bitcast=True).to(acc_ty)


@triton.jit
def _mul_rn(a, b):
    # a * b, rounded on its own (never fused into an add).
    if _NO_LIBDEVICE:
        out = a * b
    else:
        out = libdevice.mul_rn(a, b)
    return out


@triton.jit
def _keep(SO, threshold, e0, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr):
    # keep(e) of the BLOCK_N elements from e0: one Philox block per 4 elements when ALIGNED
    # (N % 4 == 0, so that every block start e0 is a multiple of 4), else one per element.
    # threshold(p) arrives as the int32 of its bits (_dropout_args).
    k0, k1, offset = philox_key_offset(SO)
    if ALIGNED:
        bits = philox_bits_aligned(k0, k1, offset, e0, BLOCK_N)
    else:
        bits = philox_bits(k0, k1, offset, e0 + tl.arange(0, BLOCK_N))
    return bits >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def _branch(X, c, mask, keep, scale, rs):
    # x * (keep ? scale : 0) * rowscale at columns c of X's row, in scale's dtype (the
    # accumulation dtype; keep / rs None without dropout / rowscale): x's branch before colscale.
    # A dropped NaN or inf stays NaN, as in F.dropout (x * 0).
    v = tl.load(X + c, mask=mask, other=0.0).to(scale.dtype)
    if keep is not None:
        v = _mul_rn(v, tl.where(keep, scale, 0.0))
    if rs is not None:
        v = _mul_rn(v, rs)
    return v


@triton.jit
def _h_of(v, R, c, mask, cs, H_CODE: tl.constexpr):
    # h = residual + v * colscale at columns c of R's row (cs: colscale there, or None), rounded
    # to h's dtype (code H_CODE) and back, so that the norm sees eager's h exactly. Masked
    # columns are 0.
    if cs is not None:
        v = _mul_rn(v, cs)
    if R is not None:
        v = tl.load(R + c, mask=mask, other=0.0).to(v.dtype) + v
    return _round_to_code(v, H_CODE).to(v.dtype)


@triton.jit
def _through_branch(g, keep, scale, rs, cs):
    # g * (keep ? scale : 0) * rowscale * colscale: a grad of v taken back to x.
    if keep is not None:
        g = g * tl.where(keep, scale, 0.0)
    if rs is not None:
        g = g * rs
    if cs is not None:
        g = g * cs
    return g


# ----------------------------------------------------------------------------------------------
# Kernels: forward
# ----------------------------------------------------------------------------------------------

# Optional operands are None pointers (a compile-time constant to Triton: `R is not None` picks
# the code path). Forward maths, per row of N elements: h = round(residual + v) (v: x's branch,
# above), mean = sum(h) / N, var = sum((h - mean)^2) / N (RMSNorm: mean = 0), rstd = 1 /
# sqrt(var + eps) and y = (h - mean) * rstd * (w + weight_offset) + b. The variance is taken
# around the mean in a second pass (over registers, or over memory for wide rows), never as
# E[h^2] - mean^2, which cancels.


@triton.jit
def _fwd_h(X, R, CS, SO, MASK, c, mask, e0, threshold, scale, rs, H_CODE, ALIGNED, BLOCK_N):
    # h at the columns c of the row (X, R, MASK: the row's; e0: the element of c[0]); writes the
    # keep-mask there when MASK is given (all True without dropout).
    keep = None
    if SO is not None:
        keep = _keep(SO, threshold, e0, ALIGNED, BLOCK_N)
    if MASK is not None:
        if keep is not None:
            tl.store(MASK + c, keep, mask=mask)
        else:
            tl.store(MASK + c, mask, mask=mask)
    cs = None
    if CS is not None:
        cs = tl.load(CS + c, mask=mask, other=0.0).to(scale.dtype)
    return _h_of(_branch(X, c, mask, keep, scale, rs), R, c, mask, cs, H_CODE)


@triton.jit
def _fwd_h_again(X, R, H, CS, SO, c, mask, e0, threshold, scale, rs, H_CODE, ALIGNED, BLOCK_N):
    # A wide row's h after its first pass: read back from H (the row's) when it was written, else
    # formed again (bitwise the same values).
    if H is not None:
        h = tl.load(H + c, mask=mask, other=0.0).to(scale.dtype)
    else:
        h = _fwd_h(X, R, CS, SO, None, c, mask, e0, threshold, scale, rs, H_CODE, ALIGNED, BLOCK_N)
    return h


@triton.jit
def _weight_offset(offset_hi, offset_lo, acc_ty: tl.constexpr):
    # weight_offset in the accumulation dtype; None (no add at all) when the launcher passes
    # none, as it does for weight_offset == 0.
    w_offset = None
    if offset_hi is not None:
        w_offset = _f64_arg(offset_hi, offset_lo, acc_ty)
    return w_offset


@triton.jit
def _store_y(Y, W, B, c, mask, xhat, w_offset):
    # y = xhat * (w + weight_offset) + b, rounded once to y's dtype. Y points at the row.
    y = xhat
    if W is not None:
        w = tl.load(W + c, mask=mask, other=0.0).to(xhat.dtype)
        if w_offset is not None:
            w = w + w_offset
        y = y * w
    if B is not None:
        y = y + tl.load(B + c, mask=mask, other=0.0).to(xhat.dtype)
    tl.store(Y + c, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["threshold", "scale_bits"])
def _add_norm_fwd_kernel(
    X,  # (M, N) rows of stride stride_x
    R,  # (M, N) residual (rows of stride stride_r) or None
    W,  # (N,) weight or None
    B,  # (N,) bias or None
    Y,  # (M, N) contiguous, x's dtype (in place: X itself)
    H,  # (M, N) contiguous h, or None when h is not stored (in place: R itself)
    Mean,  # (M,) statistics dtype; None for RMSNorm (and in place)
    Rstd,  # (M,) statistics dtype: float32, or float64 for float64 x; None in place
    SO,  # (2,) int64 [seed, offset] of dropout, or None without dropout
    RS,  # (M,) rowscale, or None
    CS,  # (N,) colscale, or None
    MASK,  # (M, N) contiguous bool keep-mask, or None when it is not asked for
    stride_x,
    stride_r,
    N,
    eps_hi,
    eps_lo,
    threshold,  # dropout's threshold(p), its uint32 bits as an int32
    scale_bits,  # dropout's scale 1 / (1 - p), the bits of the double as an int64
    offset_hi,  # weight_offset as hi + lo; None for 0 (no add)
    offset_lo,
    H_CODE: tl.constexpr,  # h's dtype (_DTYPE_CODE)
    IS_RMS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the row stays in registers
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,  # dropout with N % 4 == 0: a Philox block serves 4 elements
):
    # One program per row.
    row = tl.program_id(0).to(tl.int64)
    # The accumulation dtype, that of the statistics (which in place are not written).
    if X.dtype.element_ty == tl.float64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    X += row * stride_x
    if R is not None:
        R += row * stride_r
    Y += row * N
    if H is not None:
        H += row * N
    if MASK is not None:
        MASK += row * N
    e_row = row * N  # the row's first element in the counter layout
    eps = _f64_arg(eps_hi, eps_lo, acc_ty)
    scale = _f64_bits_arg(scale_bits, acc_ty)
    w_offset = _weight_offset(offset_hi, offset_lo, acc_ty)
    rs = None
    if RS is not None:
        rs = tl.load(RS + row).to(acc_ty)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        mask = cols < N
        h = _fwd_h(X, R, CS, SO, MASK, cols, mask, e_row, threshold, scale, rs, H_CODE, ALIGNED, BLOCK_N)
        if H is not None:
            tl.store(H + cols, _round_to(h, H.dtype.element_ty), mask=mask)  # exact: h is rounded already
        if IS_RMS:
            rstd = _rsqrt_rn(tl.sum(h * h, axis=0) / N + eps)
            xhat = h * rstd
        else:
            mean = tl.sum(h, axis=0) / N
            d = tl.where(mask, h - mean, 0.0)
            rstd = _rsqrt_rn(tl.sum(d * d, axis=0) / N + eps)
            xhat = d * rstd
        _store_y(Y, W, B, cols, mask, xhat, w_offset)
    else:
        # Wide rows: pass 1 forms h (writing it, and the mask) and sums h (LN) or h^2 (RMS);
        # LN's pass 2 sums squared deviations from the mean; the last pass normalizes. Later
        # passes read back the h that pass 1 wrote (one load instead of x's and residual's, no
        # Philox; and in place, where H is R, residual no longer holds residual).
        acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h = _fwd_h(X, R, CS, SO, MASK, c, mask, e_row + start, threshold, scale, rs, H_CODE, ALIGNED, BLOCK_N)
            if H is not None:
                tl.store(H + c, _round_to(h, H.dtype.element_ty), mask=mask)
            if IS_RMS:
                acc += h * h
            else:
                acc += h
        total = tl.sum(acc, axis=0) / N  # the mean (LN) or the mean square (RMS)
        mean = 0.0
        var = total
        if not IS_RMS:
            mean = total
            acc = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                e0 = e_row + start
                h = _fwd_h_again(X, R, H, CS, SO, c, mask, e0, threshold, scale, rs, H_CODE, ALIGNED, BLOCK_N)
                d = tl.where(mask, h - mean, 0.0)
                acc += d * d
            var = tl.sum(acc, axis=0) / N
        rstd = _rsqrt_rn(var + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h = _fwd_h_again(X, R, H, CS, SO, c, mask, e_row + start, threshold, scale, rs, H_CODE, ALIGNED, BLOCK_N)
            _store_y(Y, W, B, c, mask, (h - mean) * rstd, w_offset)

    if Mean is not None:
        tl.store(Mean + row, mean)
    if Rstd is not None:
        tl.store(Rstd + row, rstd)


# ----------------------------------------------------------------------------------------------
# Kernels: backward
# ----------------------------------------------------------------------------------------------

# Backward maths, per row of length N (all sums over the row's N columns, in the accumulation
# dtype). The forward computed xhat = (h - mean) * rstd for LayerNorm (xhat = h * rstd for
# RMSNorm, where there is no mean) and y = xhat * w' + b with w' = w + weight_offset. The rounding
# of h is treated as the identity.
#
# With gw = dy * w' (gw = dy when there is no weight), the gradient through the normalization is
#   LayerNorm: g = rstd * (gw - (xhat * mean(xhat * gw) + mean(gw)))
#   RMSNorm:   g = rstd * (gw - xhat * mean(xhat * gw))
# (the mean(gw) term comes from the mean subtraction, the xhat * mean(xhat * gw) term from rstd's
# dependence on h). In the prenorm case the caller also used h itself, whose incoming gradient
# dh_in is added: g += dh_in. g = dL/dh is the residual's grad (stored as dresidual, in the
# residual's dtype, when asked), and x's is g taken back through x's branch: dx = g * (keep ?
# scale : 0) * rowscale * colscale, keep drawn again from the forward's seed_offset. Each is
# rounded once from the accumulation dtype.
#
# Parameter gradients are sums over all rows: dweight = sum_rows(dy * xhat) (d(w + offset)/dw =
# 1), dbias = sum_rows(dy), dcolscale = sum_rows(g * x * (keep ? scale : 0) * rowscale). Each of
# the P programs owns a contiguous range of rows, accumulates its rows' terms column by column
# (in registers for one-block rows, in its own row of the partials for wide rows) and writes one
# (N,) row of the (P, N) fp32 (fp64) partials; _column_sum_kernel then sums the partials over P
# in a fixed order and rounds once to the parameters' dtype: no atomics, so the result is
# deterministic.


@triton.jit
def _bwd_h(H, X, R, c, mask, keep, scale, rs, cs, H_CODE: tl.constexpr):
    # The normalized h at columns c (H, X, R: the row's): H's, the stored h, when given; else
    # formed from X (and R) as the forward formed it.
    if H is not None:
        h = tl.load(H + c, mask=mask, other=0.0).to(scale.dtype)
    else:
        h = _h_of(_branch(X, c, mask, keep, scale, rs), R, c, mask, cs, H_CODE)
    return h


@triton.jit
def _bwd_terms(DY, h, c, mask, w, mean, rstd, IS_RMS: tl.constexpr):
    # (xhat, dy, gw = dy * w') at columns c of the row (DY: the row's); masked columns are 0.
    if IS_RMS:
        xhat = h * rstd
    else:
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    dy = tl.load(DY + c, mask=mask, other=0.0).to(rstd.dtype)
    return xhat, dy, dy * w  # w = 1.0 without weight


@triton.jit
def _weight(W, c, mask, w_offset, acc_ty: tl.constexpr):
    # w' = w + weight_offset at columns c (1.0 without weight: weight_offset needs one).
    w = 1.0
    if W is not None:
        w = tl.load(W + c, mask=mask, other=0.0).to(acc_ty)
        if w_offset is not None:
            w = w + w_offset
    return w


@triton.jit
def _grad_h(DH, c, mask, xhat, gw, c1, c2, rstd, IS_RMS: tl.constexpr):
    # g = dL/dh = rstd * (gw - (xhat * c1 + c2)) (+ dh_in, DH: the row's), c1 = mean(xhat * gw),
    # c2 = mean(gw) (LN only).
    if IS_RMS:
        g = (gw - xhat * c1) * rstd
    else:
        g = (gw - (xhat * c1 + c2)) * rstd
    if DH is not None:
        g += tl.load(DH + c, mask=mask, other=0.0).to(rstd.dtype)
    return g


@triton.jit
def _store_grads(DX, DRES, c, mask, g, keep, scale, rs, cs):
    # dresidual = g when asked, dx = g through x's branch, each rounded once (DX, DRES: the rows).
    if DRES is not None:
        tl.store(DRES + c, _round_to(g, DRES.dtype.element_ty), mask=mask)
    tl.store(DX + c, _round_to(_through_branch(g, keep, scale, rs, cs), DX.dtype.element_ty), mask=mask)


@triton.jit
def _add_to_partials(P, off, mask, seen, v):
    # P[off] += v where seen (a program's later rows), P[off] = v elsewhere in mask (its first row).
    tl.store(P + off, tl.load(P + off, mask=seen, other=0.0) + v, mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_program", "threshold", "scale_bits"])
def _add_norm_bwd_kernel(
    DY,  # (M, N) rows of stride stride_dy
    DH,  # (M, N) upstream gradient of h (prenorm) or None
    H,  # (M, N) the h that was normalized (rows of stride stride_h), or None: formed from X (and R)
    X,  # (M, N) the forward's x (rows of stride stride_x) when H is None or dcolscale is asked; else None
    R,  # (M, N) residual when H is None, else None
    W,  # (N,) weight or None
    Mean,  # (M,) statistics; None for RMSNorm
    Rstd,  # (M,) statistics dtype, also the accumulation dtype
    DX,  # (M, N) contiguous, dy's dtype
    DRES,  # (M, N) contiguous dresidual, or None
    DWP,  # (P, N) dweight partials (accumulation dtype), or None
    DBP,  # (P, N) dbias partials, or None
    SO,  # (2,) int64 [seed, offset] of the forward's dropout, or None
    RS,  # (M,) rowscale, or None
    CS,  # (N,) colscale, or None
    DCP,  # (P, N) dcolscale partials, or None
    stride_dy,
    stride_dh,
    stride_h,
    stride_x,
    stride_r,
    M,
    N,
    rows_per_program,
    threshold,  # as in the forward
    scale_bits,
    offset_hi,
    offset_lo,
    H_CODE: tl.constexpr,  # h_dtype (_DTYPE_CODE) when h is formed from X, else _KEEP
    IS_RMS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_ty = Rstd.dtype.element_ty
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(rows_per_program, M - row_start)  # >= 1 by the launcher's grid size
    cols = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N  # this program's row of the partials
    scale = _f64_bits_arg(scale_bits, acc_ty)
    w_offset = _weight_offset(offset_hi, offset_lo, acc_ty)

    if SINGLE_BLOCK:
        mask = cols < N
        w = _weight(W, cols, mask, w_offset, acc_ty)
        cs = None
        if CS is not None:
            cs = tl.load(CS + cols, mask=mask, other=0.0).to(acc_ty)
        dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        dcs_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    for i in range(0, n_rows):
        # The row's operands; its rowscale and keep-mask.
        row = row_start + i
        rstd = tl.load(Rstd + row)
        mean = 0.0 if Mean is None else tl.load(Mean + row)
        dy_row = DY + row * stride_dy
        dh_row = None if DH is None else DH + row * stride_dh
        h_row = None if H is None else H + row * stride_h
        x_row = None if X is None else X + row * stride_x
        r_row = None if R is None else R + row * stride_r
        dx_row = DX + row * N
        dres_row = None if DRES is None else DRES + row * N
        rs = None
        if RS is not None:
            rs = tl.load(RS + row).to(acc_ty)
        if SINGLE_BLOCK:
            keep = None
            if SO is not None:
                keep = _keep(SO, threshold, row * N, ALIGNED, BLOCK_N)
            h = _bwd_h(h_row, x_row, r_row, cols, mask, keep, scale, rs, cs, H_CODE)
            xhat, dy, gw = _bwd_terms(dy_row, h, cols, mask, w, mean, rstd, IS_RMS)
            c1 = tl.sum(xhat * gw, axis=0) / N
            c2 = tl.sum(gw, axis=0) / N
            g = _grad_h(dh_row, cols, mask, xhat, gw, c1, c2, rstd, IS_RMS)
            _store_grads(dx_row, dres_row, cols, mask, g, keep, scale, rs, cs)
            dw_acc += dy * xhat
            db_acc += dy
            if DCP is not None:
                dcs_acc += g * _branch(x_row, cols, mask, keep, scale, rs)
        else:
            # Wide rows: pass 1 reduces mean(xhat * gw) and mean(gw) (x and the mask only when h
            # is formed again); pass 2 writes dx and adds into this program's partials row, which
            # its first row initializes (only this program reads or writes that row, with the
            # same layout: no synchronization needed).
            s1 = tl.zeros([BLOCK_N], dtype=acc_ty)
            s2 = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                keep = None
                cs = None
                if H is None:
                    if SO is not None:
                        keep = _keep(SO, threshold, row * N + start, ALIGNED, BLOCK_N)
                    if CS is not None:
                        cs = tl.load(CS + c, mask=mask, other=0.0).to(acc_ty)
                h = _bwd_h(h_row, x_row, r_row, c, mask, keep, scale, rs, cs, H_CODE)
                xhat, _, gw = _bwd_terms(dy_row, h, c, mask, _weight(W, c, mask, w_offset, acc_ty), mean, rstd, IS_RMS)
                s1 += xhat * gw
                s2 += gw
            c1 = tl.sum(s1, axis=0) / N
            c2 = tl.sum(s2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                keep = None
                if SO is not None:
                    keep = _keep(SO, threshold, row * N + start, ALIGNED, BLOCK_N)
                cs = None
                if CS is not None:
                    cs = tl.load(CS + c, mask=mask, other=0.0).to(acc_ty)
                h = _bwd_h(h_row, x_row, r_row, c, mask, keep, scale, rs, cs, H_CODE)
                xhat, dy, gw = _bwd_terms(dy_row, h, c, mask, _weight(W, c, mask, w_offset, acc_ty), mean, rstd, IS_RMS)
                g = _grad_h(dh_row, c, mask, xhat, gw, c1, c2, rstd, IS_RMS)
                _store_grads(dx_row, dres_row, c, mask, g, keep, scale, rs, cs)
                seen = mask & (i > 0)  # the first row writes the partials, later rows add
                if DWP is not None:
                    _add_to_partials(DWP, part + c, mask, seen, dy * xhat)
                if DBP is not None:
                    _add_to_partials(DBP, part + c, mask, seen, dy)
                if DCP is not None:
                    _add_to_partials(DCP, part + c, mask, seen, g * _branch(x_row, c, mask, keep, scale, rs))
    if SINGLE_BLOCK:
        if DWP is not None:
            tl.store(DWP + part + cols, dw_acc, mask=mask)
        if DBP is not None:
            tl.store(DBP + part + cols, db_acc, mask=mask)
        if DCP is not None:
            tl.store(DCP + part + cols, dcs_acc, mask=mask)


@triton.jit(do_not_specialize=["P"])
def _column_sum_kernel(
    DWP,  # (P, N) dweight partials (accumulation dtype), or None
    DBP,  # (P, N) dbias partials, or None
    DCP,  # (P, N) dcolscale partials, or None
    DW,  # (N,) dweight, weight's dtype
    DB,  # (N,) dbias, bias's dtype
    DC,  # (N,) dcolscale, colscale's dtype
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per block of columns: sums the P partials in a fixed order (each lane its
    # rows in order, then a fixed tree over the lanes) and rounds once to the parameter dtype.
    # P == 0 (no rows) writes zeros. One loop loads every partial that is given.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    rp = tl.arange(0, BLOCK_P)[:, None]
    if DWP is not None:
        acc_ty = DWP.dtype.element_ty
    elif DBP is not None:
        acc_ty = DBP.dtype.element_ty
    else:
        acc_ty = DCP.dtype.element_ty
    aw = tl.zeros([BLOCK_P, BLOCK_N], dtype=acc_ty)
    ab = tl.zeros([BLOCK_P, BLOCK_N], dtype=acc_ty)
    ac = tl.zeros([BLOCK_P, BLOCK_N], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        m = (p0 + rp < P) & cmask[None, :]
        off = (p0 + rp).to(tl.int64) * N + cols[None, :]
        if DWP is not None:
            aw += tl.load(DWP + off, mask=m, other=0.0)
        if DBP is not None:
            ab += tl.load(DBP + off, mask=m, other=0.0)
        if DCP is not None:
            ac += tl.load(DCP + off, mask=m, other=0.0)
    if DWP is not None:
        tl.store(DW + cols, _round_to(tl.sum(aw, axis=0), DW.dtype.element_ty), mask=cmask)
    if DBP is not None:
        tl.store(DB + cols, _round_to(tl.sum(ab, axis=0), DB.dtype.element_ty), mask=cmask)
    if DCP is not None:
        tl.store(DC + cols, _round_to(tl.sum(ac, axis=0), DC.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launch configuration: pure functions of the shape and dtype
# ----------------------------------------------------------------------------------------------

# A row is held in registers as one block when next_power_of_2(N) fits both in _MAX_FUSED_BYTES
# of x's (dy's) dtype, as in flash-attention / Liger, and in the element limits below: beyond
# those, ptxas (sm_80/sm_90, num_warps <= 16) spills registers (the backward also keeps the
# dweight/dbias accumulators live; in float64, with a separate residual grad to write, it spills at
# 4096 on sm_90; with x's branch transformed, the keep bits, colscale and the dcolscale
# accumulator too: it spills at 8192 on sm_80 and sm_90). Wider rows loop over blocks. A float64
# element takes two registers: float64 rows get twice the warps per column.
_MAX_FUSED_BYTES = 65536
_MAX_FUSED_N_FWD = 16384
_MAX_FUSED_N_BWD = 8192
_MAX_FUSED_N_BWD_TRANSFORMED = 4096
_MAX_FUSED_N_BWD_FP64 = 2048
_LOOP_BLOCK_N = 4096
# Smallest block: keeps tiny rows (N = 1, 7) on well-trodden layouts on GPU; masked anyway.
_MIN_BLOCK_N = 16


class RowConfig(NamedTuple):
    block_n: int  # BLOCK_N
    single_block: bool  # SINGLE_BLOCK
    num_warps: int


class ColumnSumConfig(NamedTuple):
    block_p: int
    block_n: int
    num_warps: int

    @property
    def meta(self) -> dict:
        """The launch's block constexprs and num_warps."""
        return {"BLOCK_P": self.block_p, "BLOCK_N": self.block_n, "num_warps": self.num_warps}


def _row_config(n: int, itemsize: int, max_n: int, cols_per_warp: int, interpreted: bool) -> RowConfig:
    block = max(triton.next_power_of_2(n), _MIN_BLOCK_N)
    max_fused = max(min(_MAX_FUSED_BYTES // itemsize, max_n), _MIN_BLOCK_N)
    single = block <= max_fused
    if not single:
        block = min(_LOOP_BLOCK_N, max_fused)
    if interpreted:
        return RowConfig(block, single, 1)
    return RowConfig(block, single, max(4, min(16, block // cols_per_warp)))


@functools.cache
def add_norm_fwd_config(n: int, dtype: torch.dtype, interpreted: bool = False) -> RowConfig:
    """Forward launch configuration for rows of n elements of x's dtype (see the module doc)."""
    return _row_config(n, dtype.itemsize, _MAX_FUSED_N_FWD, 128 if dtype == torch.float64 else 512, interpreted)


@functools.cache
def add_norm_bwd_config(n: int, dtype: torch.dtype, interpreted: bool = False, transformed: bool = False) -> RowConfig:
    """Backward launch configuration for rows of n elements of dy's dtype (see the module doc);
    transformed: x's branch is (dropout, rowscale or colscale)."""
    if dtype == torch.float64:
        return _row_config(n, dtype.itemsize, _MAX_FUSED_N_BWD_FP64, 128, interpreted)
    limit = _MAX_FUSED_N_BWD_TRANSFORMED if transformed else _MAX_FUSED_N_BWD
    return _row_config(n, dtype.itemsize, limit, 256, interpreted)


def add_norm_bwd_grid(m: int, block_n: int, sm_count: int, interpreted: bool = False) -> tuple[int, int]:
    """(programs, rows_per_program) for the backward over m rows: on GPU a few waves of SMs (more
    for narrow rows, whose programs are cheap); under the interpreter at most 4 programs. Every
    program gets at least one row."""
    if interpreted:
        programs = min(m, 4)
    else:
        programs = min(m, sm_count * (4 if block_n <= 1024 else 2 if block_n <= 4096 else 1))
    rows_per_program = max(_cdiv(m, max(programs, 1)), 1)
    return _cdiv(m, rows_per_program), rows_per_program


def column_sum_config(interpreted: bool = False) -> ColumnSumConfig:
    """The dweight / dbias partials' sum: [32, 64] tiles, one program per 64 columns (under the
    interpreter [4, 1024], few programs: each costs milliseconds there)."""
    return ColumnSumConfig(4, 1024, 1) if interpreted else ColumnSumConfig(32, 64, 4)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if _INTERPRETED or device.type != "cuda":
        return 1
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except Exception:  # fake CUDA tensors traced on a machine without a GPU
        return 132


def _hint(v) -> int:
    """v as an int for the launch configuration: a symbolic size (torch.compile with dynamic
    shapes) gives its hint, without adding a guard. Configurations never change results."""
    if type(v) is int:
        return v
    hint = getattr(getattr(v, "node", None), "hint", None)
    return int(hint) if hint is not None else int(v)


@functools.lru_cache(maxsize=64)
def _split_float(v: float) -> tuple[float, float]:
    """v as hi + lo with hi representable in float32 (kernels get float arguments as float32)."""
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return v, 0.0
    lo = v - hi
    return hi, (lo if math.isfinite(lo) else 0.0)


def _offset_args(weight_offset: float) -> tuple:
    """weight_offset as the kernels take it: hi + lo, or None (a constant to Triton: the kernel
    without the add, the plain one) for 0."""
    return _split_float(weight_offset) if weight_offset != 0.0 else (None, None)


def _row_stride(t: torch.Tensor) -> int:
    """The row stride of a (..., N) tensor whose leading dims collapse into rows of one stride (as
    row_stride in csrc/add_norm.cpp): the stride of the innermost leading dim of size > 1."""
    shape, strides = t.shape, t.stride()
    for d in range(t.dim() - 2, -1, -1):
        if shape[d] > 1:
            return strides[d]
    return shape[-1]  # a single row: any stride addresses it


def _direct(kernel):
    return kernel


def _cdiv(a, b):
    """ceil(a / b) for ints or symbolic sizes (triton.cdiv costs ~2 us a call from Python)."""
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------
# Eager launchers
# ----------------------------------------------------------------------------------------------


def _empty(shape, dtype, like, strides=None):
    return torch.empty(shape, dtype=dtype, device=like.device)


@functools.lru_cache(maxsize=64)
def _dropout_args(p: float) -> tuple[int, int]:
    """(threshold, scale_bits) of dropout_p as the kernels take them, so that every p binds the
    same kernel (Triton types an int argument i32 or i64 by its value): threshold(p), a uint32, as
    the int32 of its bits; scale(p) = 1 / (1 - p) >= 1 as the int64 of its double's bits (exact, where
    a float argument would reach the kernel as a float32). p == 0: no dropout (the kernels get no
    seed_offset)."""
    threshold = dropout_threshold(p) if p > 0.0 else 0
    scale_bits = struct.unpack("q", struct.pack("d", dropout_scale(p)))[0]
    return threshold - (1 << 32) if threshold >= 1 << 31 else threshold, scale_bits


def add_norm_fwd(*args, launch=_direct):
    """fusedres/spec/add_norm.py's add_norm_fwd: h = residual + dropout(x) * rowscale * colscale
    (rounded to h_dtype), y = norm(h) * (weight + weight_offset) + bias, the keep-mask when asked.
    `launch` wraps each kernel before it is launched (wrap_triton inside the registered operator)."""
    a = FwdArgs(*args)
    outputs = allocate(spec.FWD, args, _empty)
    y, h, mean, rstd, mask = outputs
    x, residual = a.x, a.residual
    m = rstd.shape[0]
    if m == 0:
        return outputs
    n = x.shape[-1]
    # int(n): under torch.compile with a dynamic N this guards on N, since the block must cover it
    cfg = add_norm_fwd_config(int(n), x.dtype, _INTERPRETED)
    dropout = a.dropout_p > 0.0
    launch(_add_norm_fwd_kernel)[(m,)](
        x,
        residual,
        a.weight,
        a.bias,
        y,
        h if a.store_h else None,
        None if a.rms_norm else mean,
        rstd,
        a.seed_offset if dropout else None,
        a.rowscale,
        a.colscale,
        mask if a.store_mask else None,
        _row_stride(x),
        0 if residual is None else _row_stride(residual),
        n,
        *_split_float(a.eps),
        *_dropout_args(a.dropout_p),
        *_offset_args(a.weight_offset),
        H_CODE=_DTYPE_CODE[a.h_dtype],
        IS_RMS=a.rms_norm,
        SINGLE_BLOCK=cfg.single_block,
        BLOCK_N=cfg.block_n,
        ALIGNED=dropout and int(n) % 4 == 0,
        num_warps=cfg.num_warps,
    )
    return outputs


def add_norm_bwd(*args, launch=_direct, sm_count=None):
    """Backward of add_norm_fwd (fusedres/spec/add_norm.py's add_norm_bwd): the dropout mask is drawn
    again from seed_offset. `launch` as in add_norm_fwd; `sm_count`: plan the grid for that many SMs
    instead of dy's device's (fusedres/triton/aot.py plans for a target GPU)."""
    a = BwdArgs(*args)
    dx, dresidual, dweight, dbias, dcolscale = outputs = allocate(spec.BWD, args, _empty)
    dy, weight, bias, rstd = a.dy, a.weight, a.bias, a.rstd
    dropout = a.dropout_p > 0.0
    transformed = dropout or a.rowscale is not None or a.colscale is not None
    # The normalized h: the stored one, or formed again from x (and residual) as the forward did.
    formed = a.h is None
    x = a.x if formed or a.colscale_grad else None
    residual = a.residual if formed else None
    n = dy.shape[-1]
    m = rstd.shape[0]
    cfg = add_norm_bwd_config(int(n), dy.dtype, _INTERPRETED, transformed)
    sms = sm_count or _sm_count(dy.device)
    programs, rows_per_program = add_norm_bwd_grid(_hint(m), cfg.block_n, sms, _INTERPRETED)
    programs = _cdiv(m, rows_per_program)  # the sizes' own value when symbolic
    stats = rstd.dtype

    def partials(wanted):
        return torch.empty((programs, n), dtype=stats, device=dy.device) if wanted else None

    dw_part, db_part, dcs_part = partials(weight is not None), partials(bias is not None), partials(a.colscale_grad)
    if m > 0:
        # h = x (no residual, x's branch untransformed) needs no rounding: h_dtype holds x's values.
        h_code = _DTYPE_CODE[a.h_dtype] if formed and (residual is not None or transformed) else _KEEP
        launch(_add_norm_bwd_kernel)[(programs,)](
            dy,
            a.dh,
            a.h,
            x,
            residual,
            weight,
            None if a.rms_norm else a.mean,
            rstd,
            dx,
            None if a.dresidual_dtype is None else dresidual,
            dw_part,
            db_part,
            a.seed_offset if dropout else None,
            a.rowscale,
            a.colscale,
            dcs_part,
            _row_stride(dy),
            0 if a.dh is None else _row_stride(a.dh),
            0 if a.h is None else _row_stride(a.h),
            0 if x is None else _row_stride(x),
            0 if residual is None else _row_stride(residual),
            m,
            n,
            rows_per_program,
            *_dropout_args(a.dropout_p),
            *_offset_args(a.weight_offset),
            H_CODE=h_code,
            IS_RMS=a.rms_norm,
            SINGLE_BLOCK=cfg.single_block,
            BLOCK_N=cfg.block_n,
            ALIGNED=dropout and int(n) % 4 == 0,
            num_warps=cfg.num_warps,
        )
    if weight is not None or bias is not None or a.colscale_grad:
        sums = column_sum_config(_INTERPRETED)
        launch(_column_sum_kernel)[(_cdiv(n, sums.block_n),)](
            dw_part, db_part, dcs_part, dweight, dbias, dcolscale, programs, n, **sums.meta
        )
    return outputs


def add_norm_inplace(*args, launch=_direct):
    """fusedres/spec/add_norm.py's add_norm_inplace: h = residual + x * colscale into residual, y =
    norm(h) * (weight + weight_offset) + bias into x, nothing else written. The forward kernel with
    H = residual and Y = x: it reads each element before it writes it, and wide rows read back the
    h they wrote, not residual."""
    a = InplaceArgs(*args)
    x, residual = a.x, a.residual
    n = int(x.shape[-1])
    m = x.numel() // n
    if m == 0:
        return
    cfg = add_norm_fwd_config(n, x.dtype, _INTERPRETED)
    launch(_add_norm_fwd_kernel)[(m,)](
        x,
        residual,
        a.weight,
        a.bias,
        x,
        residual,
        None,
        None,
        None,
        None,
        a.colscale,
        None,
        n,
        n,
        n,
        *_split_float(a.eps),
        *_dropout_args(0.0),
        *_offset_args(a.weight_offset),
        H_CODE=_DTYPE_CODE[residual.dtype],
        IS_RMS=a.rms_norm,
        SINGLE_BLOCK=cfg.single_block,
        BLOCK_N=cfg.block_n,
        ALIGNED=False,
        num_warps=cfg.num_warps,
    )


# ----------------------------------------------------------------------------------------------
# Registered operators
# ----------------------------------------------------------------------------------------------


add_norm_fwd_triton = register_op(spec.FWD, add_norm_fwd, check_fwd, (_add_norm_fwd_kernel,))
add_norm_bwd_triton = register_op(spec.BWD, add_norm_bwd, check_bwd, (_add_norm_bwd_kernel, _column_sum_kernel))
add_norm_inplace_triton = register_op(spec.INPLACE, add_norm_inplace, check_inplace, (_add_norm_fwd_kernel,))
