"""Add & Norm (h = x + residual, y = LayerNorm/RMSNorm(h) * weight + bias) as Triton kernels.

The operators' arguments and outputs are those of fusedres/spec/add_norm.py (the eager spec is
fusedres/reference/add_norm.py). Two ways in:

* Eager launchers, plain functions that launch the kernels directly (fusedres/ops calls them from
  its autograd.Function; the public entry point has validated the arguments):
  ``add_norm_fwd(*args)`` and ``add_norm_bwd(*args)``, args in the spec's order (``FwdArgs`` /
  ``BwdArgs``). Row operands have unit stride along N and leading dims that collapse into rows
  of one stride (a contiguous tensor, or a row-strided slice of one); M = numel / N rows; weight
  and bias are N contiguous elements of any shape. In the backward, h (stored) is read when
  given, else h = x + residual (rounded to h_dtype) is recomputed in the kernel.

* The registered operators ``fusedres::add_norm_fwd_triton`` / ``fusedres::add_norm_bwd_triton``,
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
* ``add_norm_bwd_config(N, dtype) -> RowConfig``: as the forward with a limit of 8192 elements
  (4096 for float64: wider float64 blocks spill registers on sm_90), and BLOCK_N / 256 warps.
* ``add_norm_bwd_grid(M, block_n, sm_count) -> (programs, rows_per_program)``: programs share
  the rows (4, 2 or 1 waves of SMs for blocks <= 1024, <= 4096, wider); each writes one row of
  the (programs, N) dweight / dbias partials.
* ``column_sum_config() -> ColumnSumConfig(block_p, block_n, num_warps)``: the partials' sum.

Specializations: each kernel's constexprs, the dtypes of its pointers, and which optional
pointers are None (a constant to Triton; the kernels branch on it); Triton also specializes
integer arguments on == 1 and on divisibility by 16, except those in ``do_not_specialize``.

* ``_add_norm_fwd_kernel``: H_CODE (h_dtype as ``_DTYPE_CODE``), IS_RMS, SINGLE_BLOCK, BLOCK_N;
  optional residual, weight, bias, h (stored or not), mean (None for RMSNorm).
* ``_add_norm_bwd_kernel``: H_CODE (_KEEP unless h is recomputed from x + residual), IS_RMS,
  SINGLE_BLOCK, BLOCK_N; optional dh, residual, weight, mean, dresidual, dweight / dbias partials.
* ``_column_sum_kernel``: BLOCK_P, BLOCK_N; optional dweight / dbias partials.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusedres.spec import DTYPE_CODES
from fusedres.spec import add_norm as spec
from fusedres.spec.python import allocate, arguments, checker
from fusedres.triton.register import INTERPRETED as _INTERPRETED
from fusedres.triton.register import register_op

FwdArgs = arguments(spec.FWD)
BwdArgs = arguments(spec.BWD)
check_fwd = checker(spec.FWD)
check_bwd = checker(spec.BWD)

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
# Kernels: forward
# ----------------------------------------------------------------------------------------------

# Optional operands are None pointers (a compile-time constant to Triton: `R is not None` picks
# the code path). Forward maths, per row of N elements: h = round(x + residual), mean = sum(h) /
# N, var = sum((h - mean)^2) / N (RMSNorm: mean = 0), rstd = 1 / sqrt(var + eps) and
# y = (h - mean) * rstd * w + b. The variance is taken around the mean in a second pass (over
# registers, or over memory for wide rows), never as E[h^2] - mean^2, which cancels.


@triton.jit
def _load_h(X, R, x_off, r_off, mask, acc_ty: tl.constexpr, H_CODE: tl.constexpr):
    # h = x + residual in the accumulation dtype, rounded to h's dtype (code H_CODE) and back, so
    # the norm sees round(x + residual) exactly as eager does. Masked columns are 0.
    h = tl.load(X + x_off, mask=mask, other=0.0).to(acc_ty)
    if R is not None:
        h += tl.load(R + r_off, mask=mask, other=0.0).to(acc_ty)
    return _round_to_code(h, H_CODE).to(acc_ty)


@triton.jit
def _store_y(Y, W, B, c, mask, xhat):
    # y = xhat * w + b, rounded once to y's dtype. Y points at the row.
    y = xhat
    if W is not None:
        y = y * tl.load(W + c, mask=mask, other=0.0).to(xhat.dtype)
    if B is not None:
        y = y + tl.load(B + c, mask=mask, other=0.0).to(xhat.dtype)
    tl.store(Y + c, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_fwd_kernel(
    X,  # (M, N) rows of stride stride_x
    R,  # (M, N) residual (rows of stride stride_r) or None
    W,  # (N,) weight or None
    B,  # (N,) bias or None
    Y,  # (M, N) contiguous, x's dtype
    H,  # (M, N) contiguous h, or None when h is not stored
    Mean,  # (M,) statistics dtype; None for RMSNorm
    Rstd,  # (M,) statistics dtype: float32, or float64 for float64 x; the accumulation dtype
    stride_x,
    stride_r,
    N,
    eps_hi,
    eps_lo,
    H_CODE: tl.constexpr,  # h's dtype (_DTYPE_CODE)
    IS_RMS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the row stays in registers
    BLOCK_N: tl.constexpr,
):
    # One program per row.
    row = tl.program_id(0).to(tl.int64)
    acc_ty = Rstd.dtype.element_ty
    x_row = row * stride_x
    r_row = row * stride_r
    Y += row * N
    if H is not None:
        H += row * N
    eps = _f64_arg(eps_hi, eps_lo, acc_ty)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        mask = cols < N
        h = _load_h(X, R, x_row + cols, r_row + cols, mask, acc_ty, H_CODE)
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
        _store_y(Y, W, B, cols, mask, xhat)
    else:
        # Wide rows: pass 1 sums h (LN) or h^2 (RMS) and stores h; LN's pass 2 sums squared
        # deviations from the mean; the last pass normalizes. h is recomputed from x and
        # residual in each pass (bitwise the same values), not re-read from H.
        acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h = _load_h(X, R, x_row + c, r_row + c, mask, acc_ty, H_CODE)
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
                d = tl.where(mask, _load_h(X, R, x_row + c, r_row + c, mask, acc_ty, H_CODE) - mean, 0.0)
                acc += d * d
            var = tl.sum(acc, axis=0) / N
        rstd = _rsqrt_rn(var + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h = _load_h(X, R, x_row + c, r_row + c, mask, acc_ty, H_CODE)
            _store_y(Y, W, B, c, mask, (h - mean) * rstd)

    if Mean is not None:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


# ----------------------------------------------------------------------------------------------
# Kernels: backward
# ----------------------------------------------------------------------------------------------

# Backward maths, per row of length N (all sums over the row's N columns, in the accumulation
# dtype). The forward computed xhat = (h - mean) * rstd for LayerNorm (xhat = h * rstd for
# RMSNorm, where there is no mean) and y = xhat * w + b. The rounding of h = x + residual is
# treated as the identity, so the gradient of h flows unchanged to both x and residual.
#
# With g = dy * w (g = dy when there is no weight), the gradient through the normalization is
#   LayerNorm: dh = rstd * (g - (xhat * mean(xhat * g) + mean(g)))
#   RMSNorm:   dh = rstd * (g - xhat * mean(xhat * g))
# (the mean(g) term comes from the mean subtraction, the xhat * mean(xhat * g) term from rstd's
# dependence on h). In the prenorm case the caller also used h itself, whose incoming gradient
# dh_in is added: dx = dh + dh_in. dx is stored in dy's dtype and, when requested, the same
# values are stored as dresidual in the residual's dtype (each rounded once from the
# accumulation dtype).
#
# Parameter gradients are sums over all rows: dweight = sum_rows(dy * xhat), dbias =
# sum_rows(dy). Each of the P programs owns a contiguous range of rows, accumulates its rows'
# dy * xhat and dy column by column (in registers for one-block rows, in its own row of the
# partials for wide rows) and writes one (N,) row of the (P, N) fp32 (fp64) partials;
# _column_sum_kernel then sums the partials over P in a fixed order and rounds once to the
# parameters' dtype: no atomics, so the result is deterministic.


@triton.jit
def _bwd_terms(DY, H, R, row, c, mask, w, mean, rstd, stride_dy, stride_h, stride_r, H_CODE, IS_RMS):
    # (xhat, dy, g = dy * w) of the columns c of one row, in rstd's dtype; masked columns are 0.
    h = _load_h(H, R, row * stride_h + c, row * stride_r + c, mask, rstd.dtype, H_CODE)
    if IS_RMS:
        xhat = h * rstd
    else:
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(rstd.dtype)
    return xhat, dy, dy * w  # w = 1.0 without weight


@triton.jit
def _bwd_block_terms(DY, H, R, W, row, start, cols, N, mean, rstd, stride_dy, stride_h, stride_r, H_CODE, IS_RMS):
    # _bwd_terms of the block of a wide row that begins at column `start`, with its columns.
    c = start + cols
    mask = c < N
    w = 1.0
    if W is not None:
        w = tl.load(W + c, mask=mask, other=0.0).to(rstd.dtype)
    xhat, dy, g = _bwd_terms(DY, H, R, row, c, mask, w, mean, rstd, stride_dy, stride_h, stride_r, H_CODE, IS_RMS)
    return c, mask, xhat, dy, g


@triton.jit
def _bwd_store_dx(DX, DRES, DH, row, c, mask, xhat, g, c1, c2, rstd, N, stride_dh, IS_RMS):
    # dx = rstd * (g - (xhat * c1 + c2)) (+ dh_in), c1 = mean(xhat * g), c2 = mean(g) (LN only);
    # stored as dx and, when asked, as dresidual (both contiguous).
    if IS_RMS:
        dx = (g - xhat * c1) * rstd
    else:
        dx = (g - (xhat * c1 + c2)) * rstd
    if DH is not None:
        dx += tl.load(DH + row * stride_dh + c, mask=mask, other=0.0).to(rstd.dtype)
    tl.store(DX + row * N + c, _round_to(dx, DX.dtype.element_ty), mask=mask)
    if DRES is not None:
        tl.store(DRES + row * N + c, _round_to(dx, DRES.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_program"])
def _add_norm_bwd_kernel(
    DY,  # (M, N) rows of stride stride_dy
    DH,  # (M, N) upstream gradient of h (prenorm) or None
    H,  # (M, N) the h that was normalized, or x when R is given (h is then recomputed)
    R,  # (M, N) residual, or None
    W,  # (N,) weight or None
    Mean,  # (M,) statistics; None for RMSNorm
    Rstd,  # (M,) statistics dtype, also the accumulation dtype
    DX,  # (M, N) contiguous, dy's dtype
    DRES,  # (M, N) contiguous dresidual, or None
    DWP,  # (P, N) dweight partials (accumulation dtype), or None
    DBP,  # (P, N) dbias partials, or None
    stride_dy,
    stride_dh,
    stride_h,
    stride_r,
    M,
    N,
    rows_per_program,
    H_CODE: tl.constexpr,  # h_dtype (_DTYPE_CODE) when R is given, else _KEEP
    IS_RMS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_ty = Rstd.dtype.element_ty
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(rows_per_program, M - row_start)  # >= 1 by the launcher's grid size
    cols = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N  # this program's row of the partials

    if SINGLE_BLOCK:
        mask = cols < N
        w = 1.0
        if W is not None:
            w = tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
        dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for i in range(0, n_rows):
            row = row_start + i
            rstd = tl.load(Rstd + row)
            mean = 0.0 if Mean is None else tl.load(Mean + row)
            xhat, dy, g = _bwd_terms(
                DY, H, R, row, cols, mask, w, mean, rstd, stride_dy, stride_h, stride_r, H_CODE, IS_RMS
            )
            c1 = tl.sum(xhat * g, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            _bwd_store_dx(DX, DRES, DH, row, cols, mask, xhat, g, c1, c2, rstd, N, stride_dh, IS_RMS)
            dw_acc += dy * xhat
            db_acc += dy
        if DWP is not None:
            tl.store(DWP + part + cols, dw_acc, mask=mask)
        if DBP is not None:
            tl.store(DBP + part + cols, db_acc, mask=mask)
    else:
        # Wide rows: per row, pass 1 reduces mean(xhat * g) and mean(g); pass 2 writes dx and
        # adds into this program's partials row, which its first row initializes (only this
        # program reads or writes that row, with the same layout: no synchronization needed).
        for i in range(0, n_rows):
            row = row_start + i
            rstd = tl.load(Rstd + row)
            mean = 0.0 if Mean is None else tl.load(Mean + row)
            s1 = tl.zeros([BLOCK_N], dtype=acc_ty)
            s2 = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                _, _, xhat, _, g = _bwd_block_terms(
                    DY, H, R, W, row, start, cols, N, mean, rstd, stride_dy, stride_h, stride_r, H_CODE, IS_RMS
                )
                s1 += xhat * g
                s2 += g
            c1 = tl.sum(s1, axis=0) / N
            c2 = tl.sum(s2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                c, mask, xhat, dy, g = _bwd_block_terms(
                    DY, H, R, W, row, start, cols, N, mean, rstd, stride_dy, stride_h, stride_r, H_CODE, IS_RMS
                )
                _bwd_store_dx(DX, DRES, DH, row, c, mask, xhat, g, c1, c2, rstd, N, stride_dh, IS_RMS)
                seen = mask & (i > 0)  # the first row writes the partials, later rows add
                if DWP is not None:
                    tl.store(DWP + part + c, tl.load(DWP + part + c, mask=seen, other=0.0) + dy * xhat, mask=mask)
                if DBP is not None:
                    tl.store(DBP + part + c, tl.load(DBP + part + c, mask=seen, other=0.0) + dy, mask=mask)


@triton.jit(do_not_specialize=["P"])
def _column_sum_kernel(
    DWP,  # (P, N) dweight partials (accumulation dtype), or None
    DBP,  # (P, N) dbias partials, or None
    DW,  # (N,) dweight, weight's dtype
    DB,  # (N,) dbias, bias's dtype
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per block of columns: sums the P partials in a fixed order (each lane its
    # rows in order, then a fixed tree over the lanes) and rounds once to the parameter dtype.
    # P == 0 (no rows) writes zeros.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    rp = tl.arange(0, BLOCK_P)[:, None]
    acc_ty = DWP.dtype.element_ty if DWP is not None else DBP.dtype.element_ty
    aw = tl.zeros([BLOCK_P, BLOCK_N], dtype=acc_ty)
    ab = tl.zeros([BLOCK_P, BLOCK_N], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        m = (p0 + rp < P) & cmask[None, :]
        off = (p0 + rp).to(tl.int64) * N + cols[None, :]
        if DWP is not None:
            aw += tl.load(DWP + off, mask=m, other=0.0)
        if DBP is not None:
            ab += tl.load(DBP + off, mask=m, other=0.0)
    if DWP is not None:
        tl.store(DW + cols, _round_to(tl.sum(aw, axis=0), DW.dtype.element_ty), mask=cmask)
    if DBP is not None:
        tl.store(DB + cols, _round_to(tl.sum(ab, axis=0), DB.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launch configuration: pure functions of the shape and dtype
# ----------------------------------------------------------------------------------------------

# A row is held in registers as one block when next_power_of_2(N) fits both in _MAX_FUSED_BYTES
# of x's (dy's) dtype, as in flash-attention / Liger, and in the element limits below: beyond
# those, ptxas (sm_80/sm_90, num_warps <= 16) spills registers (the backward also keeps the
# dweight/dbias accumulators live; in float64, with a separate residual grad to write, it spills at
# 4096 on sm_90). Wider rows loop over blocks. A float64 element takes two registers: float64 rows
# get twice the warps per column.
_MAX_FUSED_BYTES = 65536
_MAX_FUSED_N_FWD = 16384
_MAX_FUSED_N_BWD = 8192
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
def add_norm_bwd_config(n: int, dtype: torch.dtype, interpreted: bool = False) -> RowConfig:
    """Backward launch configuration for rows of n elements of dy's dtype (see the module doc)."""
    if dtype == torch.float64:
        return _row_config(n, dtype.itemsize, _MAX_FUSED_N_BWD_FP64, 128, interpreted)
    return _row_config(n, dtype.itemsize, _MAX_FUSED_N_BWD, 256, interpreted)


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


def _refuse_features(a) -> None:
    # Until the Triton kernels implement them (issue 23).
    if a.dropout_p > 0.0 or a.rowscale is not None or a.colscale is not None or a.weight_offset != 0.0:
        raise NotImplementedError(
            "fusedres: dropout_p, rowscale, colscale and weight_offset are not implemented by the Triton backend yet"
        )


def add_norm_fwd(*args, launch=_direct):
    """fusedres/spec/add_norm.py's add_norm_fwd: h = x + residual (rounded to h_dtype), y =
    norm(h) * weight + bias. `launch` wraps each kernel before it is launched (wrap_triton inside
    the registered operator)."""
    a = FwdArgs(*args)
    _refuse_features(a)
    outputs = allocate(spec.FWD, args, _empty)
    y, h, mean, rstd, mask = outputs
    if a.store_mask:
        mask.fill_(True)  # no dropout: every element kept
    x, residual = a.x, a.residual
    m = rstd.shape[0]
    if m == 0:
        return outputs
    n = x.shape[-1]
    # int(n): under torch.compile with a dynamic N this guards on N, since the block must cover it
    cfg = add_norm_fwd_config(int(n), x.dtype, _INTERPRETED)
    strides = (_row_stride(x), 0 if residual is None else _row_stride(residual))
    launch(_add_norm_fwd_kernel)[(m,)](
        x,
        residual,
        a.weight,
        a.bias,
        y,
        h if a.store_h else None,
        None if a.rms_norm else mean,
        rstd,
        *strides,
        n,
        *_split_float(a.eps),
        H_CODE=_DTYPE_CODE[a.h_dtype],
        IS_RMS=a.rms_norm,
        SINGLE_BLOCK=cfg.single_block,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    return outputs


def add_norm_bwd(*args, launch=_direct, sm_count=None):
    """Backward of add_norm_fwd (fusedres/spec/add_norm.py's add_norm_bwd). `launch` as in
    add_norm_fwd; `sm_count`: plan the grid for that many SMs instead of dy's device's
    (fusedres/triton/aot.py plans for a target GPU)."""
    a = BwdArgs(*args)
    _refuse_features(a)
    dx, dresidual, dweight, dbias, dcolscale = outputs = allocate(spec.BWD, args, _empty)
    dy, weight, bias, rstd = a.dy, a.weight, a.bias, a.rstd
    # The normalized h: the stored one, or x (+ residual, added back and rounded as the forward did).
    h = a.h if a.h is not None else a.x
    residual = a.residual if a.h is None else None
    n = h.shape[-1]
    m = rstd.shape[0]
    cfg = add_norm_bwd_config(int(n), dy.dtype, _INTERPRETED)
    sms = sm_count or _sm_count(dy.device)
    programs, rows_per_program = add_norm_bwd_grid(_hint(m), cfg.block_n, sms, _INTERPRETED)
    programs = _cdiv(m, rows_per_program)  # the sizes' own value when symbolic
    stats = rstd.dtype
    dw_part = None if weight is None else torch.empty((programs, n), dtype=stats, device=dy.device)
    db_part = None if bias is None else torch.empty((programs, n), dtype=stats, device=dy.device)
    if m > 0:
        strides = (_row_stride(dy), 0 if a.dh is None else _row_stride(a.dh), _row_stride(h))
        launch(_add_norm_bwd_kernel)[(programs,)](
            dy,
            a.dh,
            h,
            residual,
            weight,
            None if a.rms_norm else a.mean,
            rstd,
            dx,
            None if a.dresidual_dtype is None else dresidual,
            dw_part,
            db_part,
            *strides,
            0 if residual is None else _row_stride(residual),
            m,
            n,
            rows_per_program,
            H_CODE=_KEEP if residual is None else _DTYPE_CODE[a.h_dtype],
            IS_RMS=a.rms_norm,
            SINGLE_BLOCK=cfg.single_block,
            BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps,
        )
    if weight is not None or bias is not None:
        sums = column_sum_config(_INTERPRETED)
        launch(_column_sum_kernel)[(_cdiv(n, sums.block_n),)](
            dw_part, db_part, dweight, dbias, programs, n, **sums.meta
        )
    return outputs


# ----------------------------------------------------------------------------------------------
# Registered operators
# ----------------------------------------------------------------------------------------------


def add_norm_inplace(*args, launch=_direct):
    """fusedres/spec/add_norm.py's add_norm_inplace: h into residual, y into x."""
    raise NotImplementedError("fusedres: add_norm_inplace is not implemented by the Triton backend yet")


add_norm_fwd_triton = register_op(spec.FWD, add_norm_fwd, check_fwd, (_add_norm_fwd_kernel,))
add_norm_bwd_triton = register_op(spec.BWD, add_norm_bwd, check_bwd, (_add_norm_bwd_kernel, _column_sum_kernel))
add_norm_inplace_triton = register_op(spec.INPLACE, add_norm_inplace, checker(spec.INPLACE), (_add_norm_fwd_kernel,))
