"""BatchNorm (+ residual) (+ ReLU) as Triton kernels.

Registers four operators with the same signatures and semantics as the C++ ones declared in
csrc/ops.cpp (see fusedres/reference/batch_norm.py for the eager spec):

* ``fusedres::batch_norm_stats_triton(input) -> (mean, var)``
* ``fusedres::batch_norm_add_relu_fwd_triton(input, residual, weight, bias, mean, invstd, relu,
  training, count) -> out``
* ``fusedres::batch_norm_add_relu_bwd_reduce_triton(grad_out, out, input, mean, invstd, relu,
  write_grad_residual) -> (sum_dy, sum_dy_xhat, grad_residual)``
* ``fusedres::batch_norm_add_relu_bwd_input_triton(grad, out, input, mean, invstd, weight, sum_dy,
  sum_dy_xhat, count, training, relu) -> grad_input``

Registration, interpreter handling and numerics follow fusedres/triton/add_norm.py (whose helpers
are reused): ``triton_op`` with compiled Triton, an opaque ``custom_op`` under the interpreter; no
autograd here (fusedres/ops does it).

Activations (input, residual, out, grad_out, grad) are 3-D (N, C, S) views, NCHW-dense (strides
C*S, S, 1) or channels_last-dense (strides S*C, 1, C); outputs of that shape are allocated with
``torch.empty_like(input)`` and so keep input's strides. Each layout has kernels shaped for it:

* NCHW: a channel's data is N contiguous planes of S elements. Reductions tile a channel's
  (N, S) planes; elementwise passes tile the (N*C, S) matrix of planes, with one channel per row.
* channels_last (and any S == 1 input, whose addressing is the same): the activation is the
  row-major (N*S, C) matrix. Reductions walk down the rows of a block of channels, vectorized
  across C; elementwise passes tile the matrix, with one channel per column.

Both are addressed as row * row_len + col. A size-1 dim is never stepped through, so its stride
does not matter, and tensors whose layouts differ only where S == 1 or C == 1 address memory
identically.

Arithmetic is in float32, or float64 for float64 input: the statistics dtype, which is also the
dtype of mean / var / invstd and of the backward sums. Activations other than input (residual,
out, grads) have input's dtype, as the C++ ops require; weight and bias may be float32 with
float16 / bfloat16 input (autocast). Reductions are split across many programs that each write
per-channel partials, combined in a fixed order by a second small kernel: no atomics, so every
result is deterministic. Empty input (N*S == 0): NaN statistics and zero backward sums, as the
C++ ops.
"""

# The op signatures keep typing.Optional (UP045 is ignored file-wide): torch.library infers the
# operator schema from these annotations (see add_norm.py).
# ruff: noqa: UP045
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from fusedres.triton.add_norm import (
    _on_interpreter,
    _register,
    _round_to,
    _skip_launch,
    _sm_count,
    _stats_dtype,
    triton_usable,
)

__all__ = [
    "batch_norm_stats_triton",
    "batch_norm_add_relu_fwd_triton",
    "batch_norm_add_relu_bwd_reduce_triton",
    "batch_norm_add_relu_bwd_input_triton",
    "triton_usable",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Kernels: statistics
# ----------------------------------------------------------------------------------------------

# Statistics are Welford's, on data shifted by the channel's first element K (y = x - K, exact in
# floating point when x is close to K): every lane of a program's tile keeps (count, mean, M2) of
# the y it has seen (M2 = sum of squared deviations from the lane's mean). The shift keeps the
# running means small, so their rounding does not drift: with fp32 data of mean 1e4 and std 1,
# unshifted per-lane Welford loses ~1e-4 of the variance, shifted ~1e-6. At the end the program
# merges its lanes, and the merge kernel merges the programs, with the multi-way form of Chan et
# al.'s parallel combine:
#   n = sum n_i,  mean = sum(n_i * mean_i) / n,  M2 = sum(M2_i + n_i * (mean_i - mean)^2)
# (deviations are taken from the merged mean, so nothing cancels). var = M2 / n (biased), and
# the mean is K + mean(y). The partials are a (3, P, C) tensor: count, mean(y) and M2 of each
# program p and channel c.


@triton.jit
def _welford_nchw_kernel(
    X,  # (N, C, S) NCHW-dense input
    Part,  # (3, P, C) partials, statistics dtype
    N,
    C,
    S,
    stride_n,  # C * S
    n_per,  # batch items per program (a multiple of BLOCK_N)
    s_per,  # spatial positions per program (a multiple of BLOCK_S)
    splits_s,  # programs along S; P = programs along N * splits_s
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Grid (C, P): program (c, p) reduces the [n_lo, n_hi) x [s_lo, s_hi) block of channel c.
    # n_per and s_per are multiples of the tile, so a tile never crosses into the next block and
    # the masks only need the tensor's bounds (n < N, s < S): with S a multiple of 16 the mask is
    # then uniform over vector-width groups and the loads are vectorized.
    c = tl.program_id(0)
    p = tl.program_id(1)
    acc_ty = Part.dtype.element_ty
    n_lo = (p // splits_s) * n_per
    s_lo = (p % splits_s) * s_per
    n_hi = tl.minimum(n_lo + n_per, N)
    s_hi = tl.minimum(s_lo + s_per, S)
    X += c.to(tl.int64) * S
    shift = tl.load(X).to(acc_ty)
    rn = tl.arange(0, BLOCK_N)[:, None]
    rs = tl.arange(0, BLOCK_S)[None, :]
    # Lane (i, j) sees column j in cs[j] of the S tiles of each N tile it is valid in, and a lane
    # is only ever masked in the last tile along N or S; so at N tile a, S tile b a valid lane
    # holds a * cs[j] + b earlier values: counts are per column, not carried per lane.
    cs = tl.maximum(s_hi - s_lo - rs + BLOCK_S - 1, 0) // BLOCK_S
    mean = tl.zeros([BLOCK_N, BLOCK_S], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_N, BLOCK_S], dtype=acc_ty)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + rn
        nmask = n < N
        row = X + n.to(tl.int64) * stride_n
        seen = ((n0 - n_lo) // BLOCK_N) * cs
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + rs
            mask = nmask & (s < S)
            x = tl.load(row + s, mask=mask, other=0.0).to(acc_ty) - shift
            rcp = 1.0 / (seen + ((s0 - s_lo) // BLOCK_S + 1)).to(acc_ty)
            delta = tl.where(mask, x - mean, 0.0)  # masked lanes keep their state
            mean += delta * rcp
            m2 += delta * (x - mean)
    rows = tl.maximum(n_hi - n_lo - rn + BLOCK_N - 1, 0) // BLOCK_N  # N tiles each row is valid in
    cnt = (rows * cs).to(acc_ty)
    tot = tl.maximum(n_hi - n_lo, 0).to(acc_ty) * tl.maximum(s_hi - s_lo, 0).to(acc_ty)
    mean_p = tl.sum(tl.sum(cnt * mean, axis=1), axis=0) / tl.maximum(tot, 1.0)
    d = mean - mean_p
    m2_p = tl.sum(tl.sum(m2 + cnt * d * d, axis=1), axis=0)
    plane = tl.num_programs(1) * C
    off = p * C + c
    tl.store(Part + off, tot)
    tl.store(Part + plane + off, mean_p)
    tl.store(Part + 2 * plane + off, m2_p)


@triton.jit
def _welford_cl_kernel(
    X,  # (M, C) row-major: the channels_last input, M = N * S
    Part,  # (3, P, C) partials
    M,
    C,
    rows_per,  # rows per program (a multiple of BLOCK_M)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Grid (cdiv(C, BLOCK_C), P): program (b, p) reduces rows [r_lo, r_hi) of channel block b,
    # each lane walking down one column.
    pc = tl.program_id(0)
    p = tl.program_id(1)
    acc_ty = Part.dtype.element_ty
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    r_lo = p.to(tl.int64) * rows_per
    r_hi = tl.minimum(r_lo + rows_per, M)
    shift = tl.load(X + cols, mask=cmask, other=0.0).to(acc_ty)[None, :]  # row 0
    rr = tl.arange(0, BLOCK_M)[:, None]
    mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        r = r0 + rr
        rmask = r < r_hi
        x = tl.load(X + r * C + cols[None, :], mask=rmask & cmask[None, :], other=0.0).to(acc_ty) - shift
        # Only the last tile has masked rows: every valid lane has seen one value per tile.
        rcp = 1.0 / ((r0 - r_lo) // BLOCK_M + 1).to(acc_ty)
        delta = tl.where(rmask, x - mean, 0.0)
        mean += delta * rcp
        m2 += delta * (x - mean)
    cnt = (tl.maximum(r_hi - r_lo - rr + BLOCK_M - 1, 0) // BLOCK_M).to(acc_ty)  # values per lane
    tot = tl.maximum(r_hi - r_lo, 0).to(acc_ty)
    mean_p = tl.sum(cnt * mean, axis=0) / tl.maximum(tot, 1.0)
    d = mean - mean_p[None, :]
    m2_p = tl.sum(m2 + cnt * d * d, axis=0)
    plane = tl.num_programs(1) * C
    off = p * C + cols
    tl.store(Part + off, tl.zeros([BLOCK_C], dtype=acc_ty) + tot, mask=cmask)
    tl.store(Part + plane + off, mean_p, mask=cmask)
    tl.store(Part + 2 * plane + off, m2_p, mask=cmask)


@triton.jit
def _merge_stats_kernel(
    Part,  # (3, P, C) Welford partials of the shifted data
    X,  # the input: channel c's shift is X[c * shift_stride]
    Mean,  # (C,) statistics dtype
    Var,  # (C,) biased variance
    P,
    C,
    shift_stride,  # S (NCHW) or 1 (channels_last)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program per block of channels: merges the P partials in a fixed order, in two passes
    # over them (the merged mean, then M2). The launcher never runs it on empty input.
    pc = tl.program_id(0)
    acc_ty = Mean.dtype.element_ty
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    plane = P * C
    rp = tl.arange(0, BLOCK_P)[:, None]
    acc_n = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    acc_s = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + rp
        m = (p < P) & cmask[None, :]
        off = p * C + cols[None, :]
        n_p = tl.load(Part + off, mask=m, other=0.0)
        acc_n += n_p
        acc_s += n_p * tl.load(Part + plane + off, mask=m, other=0.0)
    n = tl.maximum(tl.sum(acc_n, axis=0), 1.0)
    mean = tl.sum(acc_s, axis=0) / n
    acc_m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + rp
        m = (p < P) & cmask[None, :]
        off = p * C + cols[None, :]
        n_p = tl.load(Part + off, mask=m, other=0.0)
        d = tl.load(Part + plane + off, mask=m, other=0.0) - mean[None, :]
        acc_m2 += tl.load(Part + 2 * plane + off, mask=m, other=0.0) + n_p * d * d
    shift = tl.load(X + cols.to(tl.int64) * shift_stride, mask=cmask, other=0.0).to(acc_ty)
    tl.store(Mean + cols, shift + mean, mask=cmask)
    tl.store(Var + cols, tl.sum(acc_m2, axis=0) / n, mask=cmask)


# ----------------------------------------------------------------------------------------------
# Kernels: elementwise passes (one kernel per pass; CHANNELS_LAST picks the layout)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(n_rows, row_len, C, tiles_c, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # This program's tile of the (n_rows, row_len) matrix: NCHW (N*C planes, S), one channel per
    # row; channels_last (N*S, C), one channel per column. Returns the element offsets, their
    # mask, and the channel of each row / column with its mask (shaped to broadcast).
    pid = tl.program_id(0)
    rows = (pid // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    cmask = cols < row_len
    offs = rows.to(tl.int64)[:, None] * row_len + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if CHANNELS_LAST:
        ch = cols[None, :]
        chmask = cmask[None, :]
    else:
        ch = (rows % C)[:, None]
        chmask = rmask[:, None]
    return offs, mask, ch, chmask


@triton.jit
def _fwd_apply_kernel(
    X,  # (N, C, S) input
    R,  # residual (input's layout) or None
    W,  # (C,) weight or None
    B,  # (C,) bias or None
    Mean,  # (C,) statistics dtype, also the accumulation dtype
    Invstd,  # (C,)
    Y,  # out, input's dtype and strides
    n_rows,
    row_len,
    C,
    tiles_c,  # tiles along a row; the grid is 1-D over (row tiles) x tiles_c
    CHANNELS_LAST: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out = relu((x - mean) * (invstd * w) + b + residual): one read of x (and residual), one
    # write. x - mean first, so a large mean does not cancel against the scaled x.
    acc_ty = Mean.dtype.element_ty
    offs, mask, ch, chmask = _tile(n_rows, row_len, C, tiles_c, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    mean = tl.load(Mean + ch, mask=chmask, other=0.0)
    scale = tl.load(Invstd + ch, mask=chmask, other=0.0)
    if HAS_W:
        scale = scale * tl.load(W + ch, mask=chmask, other=0.0).to(acc_ty)
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty)
    y = (x - mean) * scale
    if HAS_B:
        y = y + tl.load(B + ch, mask=chmask, other=0.0).to(acc_ty)
    if HAS_R:
        y = y + tl.load(R + offs, mask=mask, other=0.0).to(acc_ty)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(Y + offs, _round_to(y, Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Kernels: backward
# ----------------------------------------------------------------------------------------------

# Backward maths, per channel c (all sums over the n = N*S elements of the channel, in the
# statistics dtype). The forward computed xhat = (x - mean) * invstd, y = xhat * w + b and
# out = relu(y + residual). With g = grad_out zeroed where out <= 0 (threshold_backward's rule;
# g = grad_out without relu), g is the
# gradient of y + residual, so grad_residual = g (rounded once to grad_out's dtype, exact since g
# is grad_out or 0), dbias = sum_dy = sum g and dweight = sum_dy_xhat = sum g * xhat.
#
# Training (mean and invstd depend on x): dxhat = g * w, and through xhat = (x - mean) * invstd
#   grad_input = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
#              = w * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count)
# with count the number of elements the statistics were taken over (N*S, or the global count of
# sync BatchNorm, whose sums are all-reduced between the two passes). In eval the statistics are
# constants: grad_input = w * invstd * g.
#
# Pass 1 (bwd_reduce) reads grad_out, out and input once: each program accumulates g and
# g * (x - mean) over its block in per-lane registers and writes one partial per channel to a
# (2, P, C) tensor (the same block decomposition as the statistics); a second small kernel sums
# the P partials in a fixed order and scales the second sum by invstd. Pass 2 (bwd_input) reads
# g (or grad_out and out), input and the per-channel sums and writes grad_input.


@triton.jit
def _bwd_reduce_nchw_kernel(
    DY,  # grad_out (N, C, S) NCHW-dense
    O,  # out, read when RELU
    X,  # input
    Mean,  # (C,) statistics dtype
    GR,  # grad_residual (grad_out's dtype, input's strides) when WRITE_GR, else None
    Part,  # (2, P, C) partials: sum g, sum g * (x - mean)
    N,
    C,
    S,
    stride_n,
    n_per,
    s_per,
    splits_s,
    RELU: tl.constexpr,
    WRITE_GR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Grid (C, P), blocks as in _welford_nchw_kernel.
    c = tl.program_id(0)
    p = tl.program_id(1)
    acc_ty = Part.dtype.element_ty
    n_lo = (p // splits_s) * n_per
    s_lo = (p % splits_s) * s_per
    n_hi = tl.minimum(n_lo + n_per, N)
    s_hi = tl.minimum(s_lo + s_per, S)
    mean = tl.load(Mean + c)
    base = c.to(tl.int64) * S
    rn = tl.arange(0, BLOCK_N)[:, None]
    rs = tl.arange(0, BLOCK_S)[None, :]
    sg = tl.zeros([BLOCK_N, BLOCK_S], dtype=acc_ty)
    sgx = tl.zeros([BLOCK_N, BLOCK_S], dtype=acc_ty)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + rn
        nmask = n < N
        row = base + n.to(tl.int64) * stride_n
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + rs
            mask = nmask & (s < S)
            offs = row + s
            dy = tl.load(DY + offs, mask=mask, other=0.0)
            if RELU:
                o = tl.load(O + offs, mask=mask, other=0.0).to(acc_ty)
                dy = tl.where(o <= 0.0, tl.zeros_like(dy), dy)
            if WRITE_GR:
                tl.store(GR + offs, dy.to(GR.dtype.element_ty), mask=mask)
            g = dy.to(acc_ty)
            x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty)
            sg += g
            sgx += g * (x - mean)
    plane = tl.num_programs(1) * C
    off = p * C + c
    tl.store(Part + off, tl.sum(tl.sum(sg, axis=1), axis=0))
    tl.store(Part + plane + off, tl.sum(tl.sum(sgx, axis=1), axis=0))


@triton.jit
def _bwd_reduce_cl_kernel(
    DY,  # grad_out as the (M, C) row-major matrix
    O,
    X,
    Mean,
    GR,
    Part,  # (2, P, C)
    M,
    C,
    rows_per,
    RELU: tl.constexpr,
    WRITE_GR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Grid (cdiv(C, BLOCK_C), P), blocks as in _welford_cl_kernel.
    pc = tl.program_id(0)
    p = tl.program_id(1)
    acc_ty = Part.dtype.element_ty
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(Mean + cols, mask=cmask, other=0.0)[None, :]
    r_lo = p.to(tl.int64) * rows_per
    r_hi = tl.minimum(r_lo + rows_per, M)
    rr = tl.arange(0, BLOCK_M)[:, None]
    sg = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    sgx = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        r = r0 + rr
        mask = (r < r_hi) & cmask[None, :]
        offs = r * C + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0)
        if RELU:
            o = tl.load(O + offs, mask=mask, other=0.0).to(acc_ty)
            dy = tl.where(o <= 0.0, tl.zeros_like(dy), dy)
        if WRITE_GR:
            tl.store(GR + offs, dy.to(GR.dtype.element_ty), mask=mask)
        g = dy.to(acc_ty)
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty)
        sg += g
        sgx += g * (x - mean)
    plane = tl.num_programs(1) * C
    off = p * C + cols
    tl.store(Part + off, tl.sum(sg, axis=0), mask=cmask)
    tl.store(Part + plane + off, tl.sum(sgx, axis=0), mask=cmask)


@triton.jit
def _sum_partials_kernel(
    Part,  # (2, P, C)
    Invstd,  # (C,)
    SumDy,  # (C,) statistics dtype
    SumDyXhat,  # (C,)
    P,
    C,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program per block of channels; fixed-order sum over the P partials.
    pc = tl.program_id(0)
    acc_ty = SumDy.dtype.element_ty
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    plane = P * C
    rp = tl.arange(0, BLOCK_P)[:, None]
    a = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    b = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + rp
        m = (p < P) & cmask[None, :]
        off = p * C + cols[None, :]
        a += tl.load(Part + off, mask=m, other=0.0)
        b += tl.load(Part + plane + off, mask=m, other=0.0)
    invstd = tl.load(Invstd + cols, mask=cmask, other=0.0)
    tl.store(SumDy + cols, tl.sum(a, axis=0), mask=cmask)
    tl.store(SumDyXhat + cols, tl.sum(b, axis=0) * invstd, mask=cmask)


@triton.jit
def _bwd_input_kernel(
    G,  # grad (grad_out, or the already-masked g)
    O,  # out when MASK_OUT, else None
    X,  # input, read when TRAINING
    Mean,  # (C,) statistics dtype, also the accumulation dtype
    Invstd,
    W,  # (C,) weight or None
    SumDy,  # (C,)
    SumDyXhat,  # (C,)
    GI,  # grad_input, input's dtype and strides
    n_rows,
    row_len,
    C,
    tiles_c,
    count,
    CHANNELS_LAST: tl.constexpr,
    MASK_OUT: tl.constexpr,
    HAS_W: tl.constexpr,
    TRAINING: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grad_input = k * (g - sum_dy / count - (x - mean) * invstd * sum_dy_xhat / count) with
    # k = w * invstd (training), k * g (eval); the per-channel factors are formed per row/column.
    acc_ty = Mean.dtype.element_ty
    offs, mask, ch, chmask = _tile(n_rows, row_len, C, tiles_c, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    invstd = tl.load(Invstd + ch, mask=chmask, other=0.0)
    k = invstd
    if HAS_W:
        k = k * tl.load(W + ch, mask=chmask, other=0.0).to(acc_ty)
    g = tl.load(G + offs, mask=mask, other=0.0).to(acc_ty)
    if MASK_OUT:
        o = tl.load(O + offs, mask=mask, other=0.0).to(acc_ty)
        g = tl.where(o <= 0.0, 0.0, g)
    if TRAINING:
        cnt = tl.cast(count, acc_ty)
        mean = tl.load(Mean + ch, mask=chmask, other=0.0)
        mean_dy = tl.load(SumDy + ch, mask=chmask, other=0.0).to(acc_ty) / cnt
        a = invstd * (tl.load(SumDyXhat + ch, mask=chmask, other=0.0).to(acc_ty) / cnt)
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty)
        gi = k * (g - mean_dy - (x - mean) * a)
    else:
        gi = k * g
    tl.store(GI + offs, _round_to(gi, GI.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch heuristics
# ----------------------------------------------------------------------------------------------


def _hint(v) -> int:
    """v as an int for the launch heuristics: a symbolic size (torch.compile with dynamic shapes)
    gives its hint, without adding a guard. Block shapes never affect results, only speed."""
    node = getattr(v, "node", None)
    if node is not None:
        hint = getattr(node, "hint", None)
        return int(hint) if hint is not None else 4096
    return int(v)


class _Launch(NamedTuple):
    block_r: int  # tile rows: N*S rows (channels_last), planes (NCHW: a channel's N, or N*C), partials (merge)
    block_c: int  # tile columns: channels (channels_last), spatial positions (NCHW)
    num_warps: int
    split: int  # reductions: programs sharing one channel (block)'s N*S elements


def _least_padding(n: int, lo: int, hi: int) -> int:
    """The power of two in [lo, hi] whose multiple covers n with the least padding (the larger on
    ties); e.g. 64 for n = 3136 = 49 * 64."""
    best, b = hi, hi
    while b >= lo:
        if triton.cdiv(n, b) * b < triton.cdiv(n, best) * best:
            best = b
        b //= 2
    return best


def _launch_heuristics(
    kind: str, channels_last: bool, n: int, c: int, s: int, device: torch.device, p: int = 0
) -> _Launch:
    """Tile shape, warps and (reductions) the split of each channel's N*S elements, for kind
    "apply" (elementwise passes), "reduce" (statistics, bwd_reduce) or "merge" (the kernels that
    merge p partials per channel; block_r then tiles the partials).

    GPU: tiles of 4096 elements for the elementwise passes (8 warps, 16 per thread) and 2048 for
    reductions (4 warps; 2-3 live accumulators per element), halved for NCHW with S not a
    multiple of 8, whose unvectorized per-element addresses cost registers. channels_last tiles
    span up to 128 (apply) / 64 (reduce) channels, i.e. 256 / 128 contiguous bytes of bf16 per
    row. NCHW tiles span the power of two that covers S with the least padding (S = 3136 -> 64,
    S = 49 -> 64), widened when the N*C (or N) planes cannot fill the tile. Reductions split
    N*S so that about 8 programs per SM run, each over at least 4 tiles; the merge reads
    [64, 32] tiles of partials, one program per 32 channels. Sizes may be symbolic (torch.compile
    with dynamic shapes): their hints choose the configuration. Interpreter: tiles of 64 / 32
    elements and at most 3 programs per channel, so that small tests still cover several
    programs, loop iterations and masked tails."""
    interp = _on_interpreter(device)
    n, c, s, p = _hint(n), _hint(c), _hint(s), _hint(p)
    if kind == "merge":
        if interp:
            return _Launch(min(triton.next_power_of_2(p), 4), min(triton.next_power_of_2(c), 16), 1, 1)
        return _Launch(min(triton.next_power_of_2(p), 64), min(triton.next_power_of_2(c), 32), 4, 1)
    reduction = kind == "reduce"
    tile = (32 if reduction else 64) if interp else (2048 if reduction else 4096)
    if not (interp or channels_last) and s % 8 != 0:
        tile //= 2  # NCHW rows that cannot be loaded in 16-byte vectors: per-element addresses
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 8 if interp else 64 if reduction else 128)
        block_r = max(tile // block_c, 1)
    else:
        rows = n if reduction else n * c
        cap = min(triton.next_power_of_2(max(s, 1)), 16 if interp else 1024)
        block_c = _least_padding(max(s, 1), min(cap, 4 if interp else 32), cap)
        block_r = max(min(tile // block_c, triton.next_power_of_2(max(rows, 1))), 1)
        # Few planes: widen the tile along S while that pads S by at most 1/8.
        wide = min(triton.next_power_of_2(max(s, 1)), tile // block_r)
        while wide > block_c and triton.cdiv(s, wide) * wide > s + s // 8:
            wide //= 2
        block_c = max(wide, block_c)
    num_warps = 1 if interp else (4 if reduction else 8)
    split = 1
    if reduction:
        # Tiles along one channel (block)'s N*S elements.
        tiles = triton.cdiv(n * s, block_r if channels_last else block_r * block_c)
        if interp:
            split = max(1, min(3, tiles))
        else:
            blocks = triton.cdiv(c, block_c) if channels_last else c
            split = max(1, min(triton.cdiv(8 * _sm_count(device), blocks), triton.cdiv(tiles, 4), 65535))
    return _Launch(block_r, block_c, num_warps, split)


def _split_nchw(n, s, cfg: _Launch) -> tuple:
    """(n_per, s_per, splits_s, programs) for an NCHW reduction: N split first, then S, into
    multiples of the tile. n_per and s_per come from the sizes' hints; splits_s and programs
    follow the sizes themselves (symbolic under torch.compile with dynamic shapes)."""
    hn, hs = _hint(n), _hint(s)
    splits_n = max(min(cfg.split, triton.cdiv(hn, cfg.block_r)), 1)
    n_per = max(triton.cdiv(triton.cdiv(hn, splits_n), cfg.block_r), 1) * cfg.block_r
    splits_n = max(triton.cdiv(hn, n_per), 1)
    splits_s = max(min(triton.cdiv(cfg.split, splits_n), triton.cdiv(hs, cfg.block_c)), 1)
    s_per = max(triton.cdiv(triton.cdiv(hs, splits_s), cfg.block_c), 1) * cfg.block_c
    splits_s = triton.cdiv(s, s_per)
    return n_per, s_per, splits_s, triton.cdiv(n, n_per) * splits_s


def _split_rows(m, cfg: _Launch) -> tuple:
    """(rows_per, programs) for a channels_last reduction over m rows (as _split_nchw)."""
    rows_per = max(triton.cdiv(triton.cdiv(_hint(m), cfg.split), cfg.block_r), 1) * cfg.block_r
    return rows_per, triton.cdiv(m, rows_per)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _activation_layout(t: Tensor, name: str) -> bool:
    """Checks that t is a (N, C, S) view, dense NCHW or channels_last, and says which kernels read
    it: True for the channels_last ones (also used for S == 1, where both address alike)."""
    torch._check(t.dim() == 3, lambda: f"batch_norm (triton): {name} must be a 3-D (N, C, S) view, got {t.dim()} dims")
    torch._check(
        t.dtype in _FLOAT_DTYPES,
        lambda: f"batch_norm (triton): {name} must be float32, float64, float16 or bfloat16, got {t.dtype}",
    )
    n, c, s = t.shape
    torch._check(c > 0, lambda: f"batch_norm (triton): {name} must have at least one channel")

    def ok(dim, expected):
        return t.size(dim) <= 1 or t.stride(dim) == expected

    nchw = ok(2, 1) and ok(1, s) and ok(0, c * s)
    nhwc = ok(1, 1) and ok(2, c) and ok(0, c * s)
    torch._check(nchw or nhwc, lambda: f"batch_norm (triton): {name} must be dense in NCHW or channels_last layout")
    return s == 1 or not nchw


def _check_like_input(t: Tensor, name: str, input: Tensor) -> None:
    """t is an activation of input's shape, dtype, device and memory format."""
    torch._check(
        t.dim() == 3 and t.shape == input.shape,
        lambda: f"batch_norm (triton): {name} must have input's shape {tuple(input.shape)}, got {tuple(t.shape)}",
    )
    torch._check(t.device == input.device, lambda: f"batch_norm (triton): {name} must be on {input.device}")
    torch._check(
        t.dtype == input.dtype,
        lambda: f"batch_norm (triton): {name} must have input's dtype {input.dtype}, got {t.dtype}",
    )
    cl = _activation_layout(t, name)
    _, c, s = input.shape
    torch._check(
        cl == _activation_layout(input, "input") or s == 1 or c == 1,
        lambda: f"batch_norm (triton): {name} must have input's memory format",
    )


def _check_channel_vector(t: Optional[Tensor], name: str, input: Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """t is None or a contiguous (C,) vector on input's device; of `dtype` when given (the
    statistics), else of any floating dtype (weight, bias: fp32 with fp16/bf16 input under
    autocast, or input's dtype)."""
    if t is None:
        return
    c = input.size(1)
    torch._check(
        t.dim() == 1 and t.size(0) == c,
        lambda: f"batch_norm (triton): {name} must have shape ({c},), got {tuple(t.shape)}",
    )
    torch._check(c <= 1 or t.stride(0) == 1, lambda: f"batch_norm (triton): {name} must be contiguous")
    torch._check(t.device == input.device, lambda: f"batch_norm (triton): {name} must be on {input.device}")
    if dtype is None:
        torch._check(t.dtype in _FLOAT_DTYPES, lambda: f"batch_norm (triton): {name} must be a floating tensor")
    else:
        torch._check(t.dtype == dtype, lambda: f"batch_norm (triton): {name} must be {dtype}, got {t.dtype}")


def _elementwise_grid(cl: bool, n: int, c: int, s: int, cfg: _Launch) -> tuple[int, int, int]:
    """(n_rows, row_len, tiles_c) of the matrix an elementwise pass tiles; the grid is
    cdiv(n_rows, BLOCK_R) * tiles_c programs."""
    n_rows, row_len = (n * s, c) if cl else (n * c, s)
    return n_rows, row_len, triton.cdiv(row_len, cfg.block_c)


@_register("fusedres::batch_norm_stats_triton")
def batch_norm_stats_triton(input: Tensor) -> tuple[Tensor, Tensor]:
    cl = _activation_layout(input, "input")
    n, c, s = input.shape
    device = input.device
    stats = _stats_dtype(input.dtype)
    if n * s == 0:  # as the C++ ops: no values, NaN statistics
        return torch.full((c,), float("nan"), dtype=stats, device=device), torch.full(
            (c,), float("nan"), dtype=stats, device=device
        )
    mean = torch.empty((c,), dtype=stats, device=device)
    var = torch.empty((c,), dtype=stats, device=device)
    if _skip_launch(input):
        return mean, var

    cfg = _launch_heuristics("reduce", cl, n, c, s, device)
    if cl:
        rows_per, programs = _split_rows(n * s, cfg)
        part = torch.empty((3, programs, c), dtype=stats, device=device)
        wrap_triton(_welford_cl_kernel)[(triton.cdiv(c, cfg.block_c), programs)](
            input, part, n * s, c, rows_per, BLOCK_M=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps
        )
    else:
        n_per, s_per, splits_s, programs = _split_nchw(n, s, cfg)
        part = torch.empty((3, programs, c), dtype=stats, device=device)
        wrap_triton(_welford_nchw_kernel)[(c, programs)](
            input,
            part,
            n,
            c,
            s,
            c * s,
            n_per,
            s_per,
            splits_s,
            BLOCK_N=cfg.block_r,
            BLOCK_S=cfg.block_c,
            num_warps=cfg.num_warps,
        )
    merge = _launch_heuristics("merge", cl, n, c, s, device, programs)
    wrap_triton(_merge_stats_kernel)[(triton.cdiv(c, merge.block_c),)](
        part,
        input,
        mean,
        var,
        programs,
        c,
        1 if cl else s,
        BLOCK_P=merge.block_r,
        BLOCK_C=merge.block_c,
        num_warps=merge.num_warps,
    )
    return mean, var


@_register("fusedres::batch_norm_add_relu_fwd_triton")
def batch_norm_add_relu_fwd_triton(
    input: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
    training: bool,
    count: int,
) -> Tensor:
    # training and count only matter to the autograd formula (fusedres/ops).
    cl = _activation_layout(input, "input")
    n, c, s = input.shape
    device = input.device
    stats = _stats_dtype(input.dtype)
    if residual is not None:
        _check_like_input(residual, "residual", input)
    _check_channel_vector(weight, "weight", input)
    _check_channel_vector(bias, "bias", input)
    _check_channel_vector(mean, "mean", input, stats)
    _check_channel_vector(invstd, "invstd", input, stats)

    out = torch.empty_like(input)
    if n * s == 0 or _skip_launch(input):
        return out
    cfg = _launch_heuristics("apply", cl, n, c, s, device)
    n_rows, row_len, tiles_c = _elementwise_grid(cl, n, c, s, cfg)
    wrap_triton(_fwd_apply_kernel)[(triton.cdiv(n_rows, cfg.block_r) * tiles_c,)](
        input,
        residual,
        weight,
        bias,
        mean,
        invstd,
        out,
        n_rows,
        row_len,
        c,
        tiles_c,
        CHANNELS_LAST=cl,
        HAS_R=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        RELU=relu,
        BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps,
    )
    return out


@_register("fusedres::batch_norm_add_relu_bwd_reduce_triton")
def batch_norm_add_relu_bwd_reduce_triton(
    grad_out: Tensor,
    out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
    write_grad_residual: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    cl = _activation_layout(input, "input")
    n, c, s = input.shape
    device = input.device
    stats = _stats_dtype(input.dtype)
    _check_like_input(grad_out, "grad_out", input)
    if relu:
        _check_like_input(out, "out", input)
    _check_channel_vector(mean, "mean", input, stats)
    _check_channel_vector(invstd, "invstd", input, stats)

    sum_dy = torch.empty((c,), dtype=stats, device=device)
    sum_dy_xhat = torch.empty((c,), dtype=stats, device=device)
    if write_grad_residual:
        grad_residual = torch.empty_like(input, dtype=grad_out.dtype)
    else:
        grad_residual = torch.empty((0,), dtype=grad_out.dtype, device=device)
    if n * s == 0:
        return sum_dy.zero_(), sum_dy_xhat.zero_(), grad_residual
    if _skip_launch(input):
        return sum_dy, sum_dy_xhat, grad_residual

    cfg = _launch_heuristics("reduce", cl, n, c, s, device)
    gr = grad_residual if write_grad_residual else None
    o = out if relu else None
    if cl:
        rows_per, programs = _split_rows(n * s, cfg)
        part = torch.empty((2, programs, c), dtype=stats, device=device)
        wrap_triton(_bwd_reduce_cl_kernel)[(triton.cdiv(c, cfg.block_c), programs)](
            grad_out,
            o,
            input,
            mean,
            gr,
            part,
            n * s,
            c,
            rows_per,
            RELU=relu,
            WRITE_GR=write_grad_residual,
            BLOCK_M=cfg.block_r,
            BLOCK_C=cfg.block_c,
            num_warps=cfg.num_warps,
        )
    else:
        n_per, s_per, splits_s, programs = _split_nchw(n, s, cfg)
        part = torch.empty((2, programs, c), dtype=stats, device=device)
        wrap_triton(_bwd_reduce_nchw_kernel)[(c, programs)](
            grad_out,
            o,
            input,
            mean,
            gr,
            part,
            n,
            c,
            s,
            c * s,
            n_per,
            s_per,
            splits_s,
            RELU=relu,
            WRITE_GR=write_grad_residual,
            BLOCK_N=cfg.block_r,
            BLOCK_S=cfg.block_c,
            num_warps=cfg.num_warps,
        )
    merge = _launch_heuristics("merge", cl, n, c, s, device, programs)
    wrap_triton(_sum_partials_kernel)[(triton.cdiv(c, merge.block_c),)](
        part,
        invstd,
        sum_dy,
        sum_dy_xhat,
        programs,
        c,
        BLOCK_P=merge.block_r,
        BLOCK_C=merge.block_c,
        num_warps=merge.num_warps,
    )
    return sum_dy, sum_dy_xhat, grad_residual


@_register("fusedres::batch_norm_add_relu_bwd_input_triton")
def batch_norm_add_relu_bwd_input_triton(
    grad: Tensor,
    out: Optional[Tensor],
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    training: bool,
    relu: bool,
) -> Tensor:
    cl = _activation_layout(input, "input")
    n, c, s = input.shape
    device = input.device
    stats = _stats_dtype(input.dtype)
    _check_like_input(grad, "grad", input)
    if out is not None:
        _check_like_input(out, "out", input)
    _check_channel_vector(mean, "mean", input, stats)
    _check_channel_vector(invstd, "invstd", input, stats)
    _check_channel_vector(weight, "weight", input)
    _check_channel_vector(sum_dy, "sum_dy", input, stats)
    _check_channel_vector(sum_dy_xhat, "sum_dy_xhat", input, stats)
    torch._check(not training or count > 0, lambda: "batch_norm (triton): count must be positive in training mode")

    grad_input = torch.empty_like(input)
    if n * s == 0 or _skip_launch(input):
        return grad_input
    mask_out = relu and out is not None
    cfg = _launch_heuristics("apply", cl, n, c, s, device)
    n_rows, row_len, tiles_c = _elementwise_grid(cl, n, c, s, cfg)
    wrap_triton(_bwd_input_kernel)[(triton.cdiv(n_rows, cfg.block_r) * tiles_c,)](
        grad,
        out if mask_out else None,
        input,
        mean,
        invstd,
        weight,
        sum_dy,
        sum_dy_xhat,
        grad_input,
        n_rows,
        row_len,
        c,
        tiles_c,
        count,  # unused in eval
        CHANNELS_LAST=cl,
        MASK_OUT=mask_out,
        HAS_W=weight is not None,
        TRAINING=training,
        BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps,
    )
    return grad_input
