"""BatchNorm (+ residual) (+ ReLU) as Triton kernels.

Semantics are those of the operators declared in fusedres/spec/batch_norm.py (eager spec:
fusedres/reference/batch_norm.py). As in fusedres/triton/add_norm.py, each op is an eager launcher
(a plain function that launches the kernels; the public entry point has validated the arguments)
and a registered operator ``fusedres::<name>_triton`` with the spec's schema that validates
its arguments and runs the launcher (``triton_op`` + ``wrap_triton``; ``custom_op`` when
interpreted). The launchers, with the arguments of the C++ ops:

* ``batch_norm_stats(input, running_mean, running_var, momentum) -> (mean, var)``: biased var;
  running stats (any float dtype) updated in place by the kernel that finalizes the statistics:
  running = (1 - momentum) * running + momentum * batch, unbiased var = var * count / (count - 1).
* ``batch_norm_combine_stats(stats, running_mean, running_var, momentum) -> (mean, var)``: sync
  BatchNorm's (W, 2C + 1) rows of (mean, var, count), combined in fp64 in row order.
* ``batch_norm_add_relu_fwd(input, residual, weight, bias, mean, var, eps, relu, training, count)``
* ``batch_norm_add_relu_bwd_reduce(grad_out, out, input, mean, var, eps, relu, write_grad_residual)
  -> (sum_dy, sum_dy_xhat, grad_residual)``
* ``batch_norm_add_relu_bwd_input(grad, out, input, mean, var, eps, weight, sum_dy, sum_dy_xhat,
  count, training, relu)``

invstd = 1 / sqrt(var + eps) is computed in the kernels from mean / var of any float dtype (batch
statistics, or running stats in eval); mean = var = None is no normalization (the bias + add +
ReLU tail of a conv with BN folded in). Activations are (N, C, *) tensors of any rank >= 2, dense
in NCHW (contiguous) or channels_last order, addressed as (N, C, S), S the product of the spatial
sizes; outputs keep input's strides. One reduction kernel (the statistics, or the backward's
sums) with one merge kernel for its partials, and one elementwise kernel (the forward, or the
input grad) do the work, each with the layout as a constexpr:

* NCHW: a channel's data is N contiguous planes of S elements. Reductions tile a channel's
  (N, S) planes; elementwise passes tile the (N*C, S) matrix of planes, one channel per row.
* channels_last (and any S == 1 input, whose addressing is the same): the row-major (N*S, C)
  matrix. Reductions walk down the rows of a block of channels, vectorized across C;
  elementwise passes tile the matrix, one channel per column.

Arithmetic is in float32, or float64 for float64 input: the statistics dtype, also that of
mean / var and of the backward sums. Reductions are split across programs that write
per-channel partials, merged in a fixed order by a small kernel: no atomics, deterministic.
Empty input (N*S == 0): NaN statistics (running stats untouched), zero backward sums.

Launch configurations, pure functions of the layout and sizes ("interpreted": small tiles, so
that small tests cover several programs, loop iterations and masked tails):

* ``bn_elementwise_config(channels_last, N, C, S) -> TileConfig(block_r, block_c, num_warps)``:
  tiles of 4096 elements, 8 warps (2048 for NCHW with S % 8 != 0: unvectorized addresses cost
  registers); channels_last tiles span up to 128 channels, NCHW tiles the power of two that
  covers S with the least padding, widened when the planes cannot fill the tile.
* ``bn_reduce_config(channels_last, N, C, S, sm_count) -> ReduceConfig(block_r, block_c,
  num_warps, tiles_per)``: tiles of 2048 (up to 64 channels), 4 warps; each channel (block)'s
  tiles split into runs of tiles_per: about 8 programs per SM, each over at least 4 tiles.
* ``bn_merge_config() -> TileConfig``: [64, 32] tiles of partials, one program per 32 channels;
  ``bn_combine_config()``: one program per 128 channels.

Specializations: each kernel's constexprs, the dtypes of its pointers, and which optional
pointers are None (a constant to Triton; the kernels branch on it); Triton also specializes
integer arguments on == 1 and on divisibility by 16, except those in ``do_not_specialize``.
``_reduce_partials_kernel`` (statistics when grad_out is None, else backward sums with out, mean,
grad_residual optional): CHANNELS_LAST, BLOCK_R, BLOCK_C. ``_merge_partials_kernel`` (input given:
statistics, with optional running stats; else sums with optional var): BLOCK_R, BLOCK_C.
``_combine_stats_kernel`` (running stats optional): BLOCK_C. ``_elementwise_kernel`` (forward when
grad is None, with residual, weight, bias, mean / var optional; else the input grad, with out,
weight, mean / var, sums optional): CHANNELS_LAST, RELU, BLOCK_R, BLOCK_C.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusedres._checks import (
    check_bn_bwd_input_op,
    check_bn_bwd_reduce_op,
    check_bn_combine_op,
    check_bn_fwd_op,
    check_bn_stats_op,
    stats_dtype,
)
from fusedres.spec import batch_norm as spec
from fusedres.triton.add_norm import (
    _INTERPRETED,
    _cdiv,
    _direct,
    _f64_arg,
    _hint,
    _round_to,
    _rsqrt_rn,
    _sm_count,
    _split_float,
)
from fusedres.triton.register import register_op

# ----------------------------------------------------------------------------------------------
# Kernels: reductions (statistics, backward sums) and their merge
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
# the mean is K + mean(y). The partials are a (3, P, C) tensor in the statistics dtype (fp32
# even for fp16 / bf16 input): count, mean(y) and M2 of each program p and channel c.
#
# Both reductions split a channel's N*S values into tiles [BLOCK_R, BLOCK_C], numbered in
# row-major order (NCHW: row tiles over N, column tiles over S; channels_last: row tiles over the
# N*S rows of a block of BLOCK_C channels), and give each program a run of tiles_per of them.


# Backward maths, per channel c (all sums over the n = N*S elements of the channel, in the
# statistics dtype). The forward computed xhat = (x - mean) * invstd, y = xhat * w + b and
# out = relu(y + residual). With g = grad_out zeroed where out <= 0 (threshold_backward's rule;
# g = grad_out without relu), g is the gradient of y + residual, so grad_residual = g (stored
# in grad_out's dtype, exact since g is grad_out or 0), dbias = sum_dy = sum g and dweight =
# sum_dy_xhat = sum g * xhat.
#
# Training (mean and invstd depend on x): dxhat = g * w, and through xhat = (x - mean) * invstd
#   grad_input = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
#              = w * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count)
# with count the number of elements the statistics were taken over (N*S, or the global count of
# sync BatchNorm, whose sums are all-reduced between the two passes). In eval the statistics are
# constants: grad_input = w * invstd * g.
#
# Pass 1 (bwd_reduce) reads grad_out, out and input once: each program accumulates g and
# g * (x - mean) over its tiles in per-lane registers and writes one partial per channel to a
# (2, P, C) tensor; the merge kernel sums the P partials in a fixed order and scales the second
# sum by invstd. Pass 2 (bwd_input) reads g (or grad_out and out), input and the per-channel
# sums and writes grad_input.


@triton.jit
def _program_channels(a, C, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr):
    # The channels of reduction program a as a [1, BLOCK_C] (channels_last: channel block a) or
    # [1, 1] (NCHW: channel a) tensor, and their mask; they broadcast against the tiles.
    if CHANNELS_LAST:
        ch = a * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    else:
        ch = a + tl.zeros([1, 1], dtype=tl.int32)
    return ch, ch < C


@triton.jit
def _reduce_tile(t, ch, C, S, n_rows, col_tiles, CHANNELS_LAST, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Element offsets and mask of tile t of channel(s) ch, and the mask of its columns. A lane is
    # only masked by its row in the channel's last row tile, so a lane valid now was valid in
    # every earlier tile whose column mask held it (the Welford counts below rely on this).
    rr = tl.arange(0, BLOCK_R)[:, None]
    if CHANNELS_LAST:
        rows = t * BLOCK_R + rr
        colmask = ch < C
        offs = rows.to(tl.int64) * C + ch
    else:
        rows = (t // col_tiles) * BLOCK_R + rr
        cols = (t % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        colmask = cols < S
        offs = rows.to(tl.int64) * C * S + ch.to(tl.int64) * S + cols
    return offs, (rows < n_rows) & colmask, colmask


@triton.jit
def _per_channel(v, CHANNELS_LAST: tl.constexpr):
    # Sum of a tile over its lanes of one channel: rows (channels_last, a [1, BLOCK_C] row) or the
    # whole tile (NCHW, a scalar: Triton 3.6's layout pass fails on a [1, 1] result reused in the
    # tile's arithmetic, "operand #0 does not dominate this use").
    if CHANNELS_LAST:
        v = tl.sum(v, axis=0, keep_dims=True)
    else:
        v = tl.sum(tl.sum(v, axis=1), axis=0)
    return v


@triton.jit
def _store_partial(Part, k, p, C, ch, chmask, v):
    # Plane k, program p of the (K, P, C) partials.
    tl.store(Part + (k * tl.num_programs(1) + p).to(tl.int64) * C + ch, v, mask=chmask)


@triton.jit(do_not_specialize=["col_tiles", "n_tiles", "tiles_per"])
def _reduce_partials_kernel(
    X,  # (N, C, S) input, NCHW or channels_last
    DY,  # backward sums: grad_out (input's layout); None for the statistics
    O,  # backward: out, to mask grad_out where out <= 0 (relu), or None
    Mean,  # backward: (C,) any float dtype, or None (no normalization)
    GR,  # backward: grad_residual to write (input's dtype and strides), or None
    Part,  # (3, P, C) statistics partials (count, mean, M2), or (2, P, C) sums (g, g * (x - mean))
    C,
    S,
    n_rows,  # N (NCHW) or N * S (channels_last)
    col_tiles,  # column tiles per row tile: cdiv(S, BLOCK_C) (NCHW) or 1
    n_tiles,  # tiles of one channel (block)
    tiles_per,  # tiles per program
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Grid (C or channel blocks, P): program (a, p) reduces tiles [p * tiles_per, ...) of a, into
    # per-lane accumulators a0, a1, a2: Welford's count, mean and M2 of y = x - shift, or the
    # backward's sums of g and g * (x - mean).
    acc_ty = Part.dtype.element_ty
    p = tl.program_id(1)
    ch, chmask = _program_channels(tl.program_id(0), C, CHANNELS_LAST, BLOCK_C)
    if DY is None:  # the shift: the channel's first element
        center = tl.load(X + (ch if CHANNELS_LAST else ch.to(tl.int64) * S), mask=chmask, other=0.0).to(acc_ty)
    else:
        center = 0.0 if Mean is None else tl.load(Mean + ch, mask=chmask, other=0.0).to(acc_ty)
    a0 = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    a1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    a2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    seen = tl.zeros([1, BLOCK_C], dtype=acc_ty)  # tiles so far in which each column was valid
    t_lo = p * tiles_per
    for t in range(t_lo, tl.minimum(t_lo + tiles_per, n_tiles)):
        offs, mask, colmask = _reduce_tile(t, ch, C, S, n_rows, col_tiles, CHANNELS_LAST, BLOCK_R, BLOCK_C)
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty) - center
        if DY is None:
            seen += colmask.to(acc_ty)
            delta = tl.where(mask, x - a1, 0.0)  # masked lanes keep their state
            a1 += delta * (1.0 / tl.maximum(seen, 1.0))  # a valid lane's count is its column's
            a2 += delta * (x - a1)
            a0 += mask.to(acc_ty)
        else:
            dy = tl.load(DY + offs, mask=mask, other=0.0)
            if O is not None:
                dy = tl.where(tl.load(O + offs, mask=mask, other=0.0) <= 0.0, tl.zeros_like(dy), dy)
            if GR is not None:
                tl.store(GR + offs, dy, mask=mask)
            a0 += dy.to(acc_ty)
            a1 += dy.to(acc_ty) * x
    if DY is None:  # the program's lanes merged as the comment above says
        n_p = _per_channel(a0, CHANNELS_LAST)
        mean_p = _per_channel(a0 * a1, CHANNELS_LAST) / tl.maximum(n_p, 1.0)
        d = a1 - mean_p
        _store_partial(Part, 0, p, C, ch, chmask, n_p)
        _store_partial(Part, 1, p, C, ch, chmask, mean_p)
        _store_partial(Part, 2, p, C, ch, chmask, _per_channel(a2 + a0 * d * d, CHANNELS_LAST))
    else:
        _store_partial(Part, 0, p, C, ch, chmask, _per_channel(a0, CHANNELS_LAST))
        _store_partial(Part, 1, p, C, ch, chmask, _per_channel(a1, CHANNELS_LAST))


@triton.jit
def _invstd(Var, ch, chmask, eps_hi, eps_lo, acc_ty: tl.constexpr):
    # 1 / sqrt(var + eps) of channels ch, correctly rounded as torch's, from var of any dtype.
    var = tl.load(Var + ch, mask=chmask, other=1.0).to(acc_ty)
    return _rsqrt_rn(var + _f64_arg(eps_hi, eps_lo, acc_ty))


@triton.jit
def _update_running(RM, RV, ch, chmask, mean, var, count, mom_hi, mom_lo):
    # running = (1 - momentum) * running + momentum * batch, in float64, with the unbiased
    # variance var * count / (count - 1) (var itself when count == 1, as the C++ ops), rounded
    # once to the running stats' dtype. Nothing changes when count == 0 (no values).
    mom = _f64_arg(mom_hi, mom_lo, tl.float64)
    n = count.to(tl.float64)
    var = var.to(tl.float64)
    unbiased = tl.where(n > 1.0, var * n / (n - 1.0), var)
    m = chmask & (count > 0)
    rm = tl.load(RM + ch, mask=m, other=0.0).to(tl.float64)
    rv = tl.load(RV + ch, mask=m, other=0.0).to(tl.float64)
    tl.store(RM + ch, _round_to((1.0 - mom) * rm + mom * mean.to(tl.float64), RM.dtype.element_ty), mask=m)
    tl.store(RV + ch, _round_to((1.0 - mom) * rv + mom * unbiased, RV.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["P", "count", "shift"])
def _merge_partials_kernel(
    Part,  # (K, P, C) partials: K = 3 Welford (count, mean, M2) when X is given, else K = 2 sums
    Out0,  # (C,) statistics dtype: mean, or sum_dy
    Out1,  # (C,) var, or sum_dy_xhat
    X,  # statistics: the input, whose first element per channel (at c * shift) was the shift
    Var,  # sums: (C,) var (any float dtype) for invstd, or None (1)
    RM,  # statistics: running mean to update in place, or None
    RV,  # running var, or None
    P,
    C,
    count,  # N * S
    shift,
    eps_hi,
    eps_lo,
    mom_hi,
    mom_lo,
    BLOCK_R: tl.constexpr,  # partials per step
    BLOCK_C: tl.constexpr,
):
    # One program per block of channels: merges the P partials in a fixed order. Sums: two sums,
    # the second scaled by invstd. Welford: the n-weighted mean of the means, then (a second
    # pass) M2; the final mean and var, and the running-stat update. P == 0 (empty input) gives
    # zero sums and NaN statistics.
    acc_ty = Out0.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    plane = P.to(tl.int64) * C
    rp = tl.arange(0, BLOCK_R)[:, None]
    a = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    b = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_R):
        m = (p0 + rp < P) & cmask[None, :]
        off = (p0 + rp).to(tl.int64) * C + cols[None, :]
        u = tl.load(Part + off, mask=m, other=0.0)
        v = tl.load(Part + plane + off, mask=m, other=0.0)
        a += u
        b += u * v if X is not None else v
    if X is None:
        tl.store(Out0 + cols, tl.sum(a, axis=0), mask=cmask)
        scale = 1.0 if Var is None else _invstd(Var, cols, cmask, eps_hi, eps_lo, acc_ty)
        tl.store(Out1 + cols, tl.sum(b, axis=0) * scale, mask=cmask)
    else:
        n = count.to(acc_ty)
        mean_y = tl.sum(b, axis=0) / n
        m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
        for p0 in range(0, P, BLOCK_R):
            m = (p0 + rp < P) & cmask[None, :]
            off = (p0 + rp).to(tl.int64) * C + cols[None, :]
            d = tl.load(Part + plane + off, mask=m, other=0.0) - mean_y[None, :]
            m2 += tl.load(Part + 2 * plane + off, mask=m, other=0.0) + tl.load(Part + off, mask=m, other=0.0) * d * d
        mean = mean_y + tl.load(X + cols.to(tl.int64) * shift, mask=cmask & (count > 0), other=0.0).to(acc_ty)
        var = tl.sum(m2, axis=0) / n
        tl.store(Out0 + cols, mean, mask=cmask)
        tl.store(Out1 + cols, var, mask=cmask)
        if RM is not None:
            _update_running(RM, RV, cols, cmask, mean, var, count, mom_hi, mom_lo)


@triton.jit(do_not_specialize=["W"])
def _combine_stats_kernel(
    Stats,  # (W, 2C + 1) contiguous rows: mean (C), biased var (C), count
    Mean,  # (C,) stats' dtype
    Var,  # (C,)
    RM,  # running mean to update in place, or None
    RV,  # running var, or None
    W,
    C,
    mom_hi,
    mom_lo,
    BLOCK_C: tl.constexpr,
):
    # Sync BatchNorm: the processes' statistics combined in float64, rows in order, in two
    # passes: n = sum n_w, mean = sum(n_w * mean_w) / n, var = sum(n_w * (var_w + (mean_w -
    # mean)^2)) / n. Rows with no values (n_w == 0, NaN statistics) contribute nothing.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = tl.zeros([BLOCK_C], dtype=tl.float64)
    s = tl.zeros([BLOCK_C], dtype=tl.float64)
    for w in range(0, W):
        row = Stats + w * (2 * C + 1)
        n_w = tl.load(row + 2 * C).to(tl.float64)
        n += n_w
        s += tl.where(n_w > 0.0, n_w * tl.load(row + cols, mask=cmask, other=0.0).to(tl.float64), 0.0)
    mean = s / n
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for w in range(0, W):
        row = Stats + w * (2 * C + 1)
        n_w = tl.load(row + 2 * C).to(tl.float64)
        d = tl.load(row + cols, mask=cmask, other=0.0).to(tl.float64) - mean
        m2 += tl.where(n_w > 0.0, n_w * (tl.load(row + C + cols, mask=cmask, other=0.0).to(tl.float64) + d * d), 0.0)
    var = m2 / n
    tl.store(Mean + cols, mean.to(Mean.dtype.element_ty), mask=cmask)
    tl.store(Var + cols, var.to(Var.dtype.element_ty), mask=cmask)
    if RM is not None:
        _update_running(RM, RV, cols, cmask, mean, var, n, mom_hi, mom_lo)


# ----------------------------------------------------------------------------------------------
# Kernel: the elementwise passes (the forward and the input grad)
# ----------------------------------------------------------------------------------------------


# The forward (normalize + add + ReLU) and the backward's input grad are one kernel: both are a
# per-element function of x (and residual, or g) and per-channel (mean, invstd, invstd * w):
#   forward (G None):      out = relu((x - mean) * invstd * w + b + residual), one read of x
#                          (and residual), one write; x - mean first, so a large mean does not
#                          cancel against the scaled x.
#   input grad (G given):  g = grad, zeroed where out <= 0 when out is given (relu), and
#                          training: grad_input = w * invstd * (g - sum_dy / count - (x - mean) *
#                          invstd * sum_dy_xhat / count); eval (no sums): w * invstd * g.


@triton.jit(do_not_specialize=["count"])
def _elementwise_kernel(
    X,  # (N, C, S) input (not read by the eval input grad)
    R,  # forward: residual (input's dtype and strides), or None
    G,  # input grad: grad; None for the forward
    O,  # input grad: out, to mask grad where out <= 0 (relu), or None
    W,  # (C,) weight, or None
    B,  # forward: (C,) bias, or None
    Mean,  # (C,) any float dtype, or None (no normalization)
    Var,  # (C,), or None
    SumDy,  # input grad in training: (C,) statistics dtype; None in eval
    SumDyXhat,  # (C,), or None
    Y,  # out / grad_input, input's dtype and strides
    n_rows,
    row_len,
    C,
    count,
    eps_hi,
    eps_lo,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,  # forward
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # This program's tile of the (n_rows, row_len) matrix: NCHW (N*C planes, S), one channel per
    # row; channels_last (N*S, C), one channel per column. The grid is 1-D over (row tiles) x
    # (column tiles); per-channel values are loaded per row / column, shaped to broadcast.
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(row_len, BLOCK_C)
    rows = (pid // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    if CHANNELS_LAST:
        ch, chmask = cols, cols < row_len
    else:
        ch, chmask = rows % C, rows < n_rows
    offs = rows.to(tl.int64) * row_len + cols
    mask = (rows < n_rows) & (cols < row_len)
    mean = 0.0 if Mean is None else tl.load(Mean + ch, mask=chmask, other=0.0).to(acc_ty)
    invstd = 1.0 if Var is None else _invstd(Var, ch, chmask, eps_hi, eps_lo, acc_ty)
    scale = invstd if W is None else invstd * tl.load(W + ch, mask=chmask, other=0.0).to(acc_ty)
    if G is None:
        y = (tl.load(X + offs, mask=mask, other=0.0).to(acc_ty) - mean) * scale
        if B is not None:
            y = y + tl.load(B + ch, mask=chmask, other=0.0).to(acc_ty)
        if R is not None:
            y = y + tl.load(R + offs, mask=mask, other=0.0).to(acc_ty)
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
    else:
        g = tl.load(G + offs, mask=mask, other=0.0).to(acc_ty)
        if O is not None:
            g = tl.where(tl.load(O + offs, mask=mask, other=0.0) <= 0.0, 0.0, g)
        if SumDy is not None:
            cnt = count.to(acc_ty)
            g -= tl.load(SumDy + ch, mask=chmask, other=0.0).to(acc_ty) / cnt
            a = invstd * (tl.load(SumDyXhat + ch, mask=chmask, other=0.0).to(acc_ty) / cnt)
            g -= (tl.load(X + offs, mask=mask, other=0.0).to(acc_ty) - mean) * a
        y = scale * g
    tl.store(Y + offs, _round_to(y, Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration: pure functions of the layout and sizes
# ----------------------------------------------------------------------------------------------


class TileConfig(NamedTuple):
    block_r: int  # BLOCK_R: N*S rows (channels_last), planes (NCHW: a channel's N, or N*C), partials
    block_c: int  # BLOCK_C: channels (channels_last), spatial positions (NCHW)
    num_warps: int

    @property
    def meta(self) -> dict:
        """The launch's block constexprs and num_warps."""
        return {"BLOCK_R": self.block_r, "BLOCK_C": self.block_c, "num_warps": self.num_warps}


class ReduceConfig(NamedTuple):
    block_r: int
    block_c: int
    num_warps: int
    tiles_per: int  # tiles per program (a channel (block) has cdiv(its tiles, tiles_per) programs)

    meta = TileConfig.meta


def _least_padding(n: int, lo: int, hi: int) -> int:
    """The power of two in [lo, hi] whose multiple covers n with the least padding (the larger on
    ties); e.g. 64 for n = 3136 = 49 * 64."""
    best, b = hi, hi
    while b >= lo:
        if _cdiv(n, b) * b < _cdiv(n, best) * best:
            best = b
        b //= 2
    return best


def _tile_shape(reduction: bool, channels_last: bool, n: int, c: int, s: int, interpreted: bool) -> tuple[int, int]:
    tile = (32 if reduction else 64) if interpreted else (2048 if reduction else 4096)
    if not (interpreted or channels_last) and s % 8 != 0:
        tile //= 2  # NCHW rows that cannot be loaded in 16-byte vectors: per-element addresses
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 8 if interpreted else 64 if reduction else 128)
        return max(tile // block_c, 1), block_c
    rows = n if reduction else n * c
    cap = min(triton.next_power_of_2(max(s, 1)), 16 if interpreted else 1024)
    block_c = _least_padding(max(s, 1), min(cap, 4 if interpreted else 32), cap)
    block_r = max(min(tile // block_c, triton.next_power_of_2(max(rows, 1))), 1)
    # Few planes: widen the tile along S while that pads S by at most 1/8.
    wide = min(triton.next_power_of_2(max(s, 1)), tile // block_r)
    while wide > block_c and _cdiv(s, wide) * wide > s + s // 8:
        wide //= 2
    return block_r, max(wide, block_c)


@functools.lru_cache(maxsize=1024)
def bn_elementwise_config(channels_last: bool, n: int, c: int, s: int, interpreted: bool = False) -> TileConfig:
    """Tiles of the elementwise passes (apply, bwd_input); see the module doc."""
    block_r, block_c = _tile_shape(False, channels_last, n, c, s, interpreted)
    return TileConfig(block_r, block_c, 1 if interpreted else 8)


@functools.lru_cache(maxsize=1024)
def bn_reduce_config(
    channels_last: bool, n: int, c: int, s: int, sm_count: int, interpreted: bool = False
) -> ReduceConfig:
    """Tiles and split of the reductions (stats, bwd_reduce); see the module doc. Under the
    interpreter at most 3 programs per channel (block)."""
    block_r, block_c = _tile_shape(True, channels_last, n, c, s, interpreted)
    tiles = _reduce_tiles(channels_last, n, c, s, block_r, block_c)[2]
    blocks = _cdiv(c, block_c) if channels_last else c
    if interpreted:
        split = min(3, tiles)
    else:
        split = min(_cdiv(8 * sm_count, blocks), _cdiv(tiles, 4), 65535)
    return ReduceConfig(block_r, block_c, 1 if interpreted else 4, max(_cdiv(tiles, max(split, 1)), 1))


def bn_merge_config(interpreted: bool = False) -> TileConfig:
    """The partials' merge: [BLOCK_R, BLOCK_C] tiles, one program per BLOCK_C channels."""
    return TileConfig(4, 16, 1) if interpreted else TileConfig(64, 32, 4)


def bn_combine_config(interpreted: bool = False) -> TileConfig:
    """Sync BatchNorm's combine: one program per block_c channels."""
    return TileConfig(1, 16, 1) if interpreted else TileConfig(1, 128, 4)


def _reduce_tiles(channels_last: bool, n, c, s, block_r: int, block_c: int) -> tuple:
    """(n_rows, col_tiles, tiles per channel (block), channel programs) of a reduction."""
    if channels_last:
        return n * s, 1, _cdiv(n * s, block_r), _cdiv(c, block_c)
    col_tiles = _cdiv(s, block_c)
    return n, col_tiles, _cdiv(n, block_r) * col_tiles, c


# ----------------------------------------------------------------------------------------------
# Eager launchers
# ----------------------------------------------------------------------------------------------


def _layout(t: torch.Tensor) -> tuple:
    """(N, C, S, channels_last) of a channels_dense (N, C, *) activation; S == 1 reads as
    channels_last (rows of C), whose addressing it shares."""
    shape = t.shape
    s = math.prod(shape[2:])
    return shape[0], shape[1], s, s == 1 or not t.is_contiguous()


def _reduce(launch, planes: int, tensors: tuple, input: torch.Tensor, sm_count=None):
    """Runs _reduce_partials_kernel over input's channels, split for sm_count SMs (default: input's
    device's); returns its (planes, P, C) partials and P."""
    n, c, s, cl = _layout(input)
    sms = sm_count or _sm_count(input.device)
    cfg = bn_reduce_config(cl, _hint(n), _hint(c), _hint(s), sms, _INTERPRETED)
    n_rows, col_tiles, n_tiles, blocks = _reduce_tiles(cl, n, c, s, cfg.block_r, cfg.block_c)
    programs = _cdiv(n_tiles, cfg.tiles_per)
    part = torch.empty((planes, programs, c), dtype=stats_dtype(input.dtype), device=input.device)
    if programs > 0:
        tiles = (c, s, n_rows, col_tiles, n_tiles, cfg.tiles_per)
        launch(_reduce_partials_kernel)[(blocks, programs)](*tensors, part, *tiles, CHANNELS_LAST=cl, **cfg.meta)
    return part, programs


def _merge(launch, part, programs, out0, out1, x=None, shift=1, var=None, rm=None, rv=None, count=0, eps=0.0, mom=0.0):
    """Merges reduction partials into out0 / out1: Welford statistics of input x (channel c's
    shift at x[c * shift]; running stats rm / rv updated with momentum mom) when x is given, else
    sums, the second scaled by invstd from var."""
    cfg = bn_merge_config(_INTERPRETED)
    c = out0.shape[0]
    scalars = (programs, c, count, shift, *_split_float(eps), *_split_float(mom))
    launch(_merge_partials_kernel)[(_cdiv(c, cfg.block_c),)](part, out0, out1, x, var, rm, rv, *scalars, **cfg.meta)


def _elementwise(launch, tensors: tuple, input: torch.Tensor, count=0, eps=1.0, relu=False) -> None:
    """Runs _elementwise_kernel over input's (N, C, S) elements."""
    n, c, s, cl = _layout(input)
    cfg = bn_elementwise_config(cl, _hint(n), _hint(c), _hint(s), _INTERPRETED)
    n_rows, row_len = (n * s, c) if cl else (n * c, s)
    tiles_c = _cdiv(row_len, cfg.block_c)
    programs = _cdiv(n_rows, cfg.block_r) * tiles_c
    if programs > 0:
        scalars = (n_rows, row_len, c, count, *_split_float(eps))
        launch(_elementwise_kernel)[(programs,)](*tensors, *scalars, CHANNELS_LAST=cl, RELU=relu, **cfg.meta)


def _stats_outputs(input, *args):
    c, stats = input.shape[1], stats_dtype(input.dtype)
    return torch.empty((c,), dtype=stats, device=input.device), torch.empty((c,), dtype=stats, device=input.device)


def batch_norm_stats(input, running_mean, running_var, momentum, launch=_direct, sm_count=None):
    """Per-channel (mean, biased var) of input; running stats updated in place when given.
    sm_count: plan for that many SMs instead of input's device's (fusedres/triton/aot.py)."""
    mean, var = outputs = _stats_outputs(input)
    part, programs = _reduce(launch, 3, (input, None, None, None, None), input, sm_count)
    n, _, s, cl = _layout(input)
    shift = 1 if cl else s
    _merge(launch, part, programs, mean, var, input, shift, None, running_mean, running_var, n * s, mom=momentum)
    return outputs


def _combine_outputs(stats, *args):
    c, dtype = (stats.shape[1] - 1) // 2, stats.dtype
    return torch.empty((c,), dtype=dtype, device=stats.device), torch.empty((c,), dtype=dtype, device=stats.device)


def batch_norm_combine_stats(stats, running_mean, running_var, momentum, launch=_direct):
    """Sync BatchNorm: the (mean, biased var) of W processes' rows of stats; running stats
    updated in place with the total count when given."""
    mean, var = outputs = _combine_outputs(stats)
    cfg = bn_combine_config(_INTERPRETED)
    c = mean.shape[0]
    tensors = (stats, mean, var, running_mean, running_var)
    launch(_combine_stats_kernel)[(_cdiv(c, cfg.block_c),)](
        *tensors, stats.shape[0], c, *_split_float(momentum), BLOCK_C=cfg.block_c, num_warps=cfg.num_warps
    )
    return outputs


def _like_input(input, *args):
    return torch.empty_like(input)


def batch_norm_add_relu_fwd(input, residual, weight, bias, mean, var, eps, relu, training, count, launch=_direct):
    """out = relu(xhat * weight + bias + residual). training / count only matter to autograd."""
    out = _like_input(input)
    _elementwise(
        launch, (input, residual, None, None, weight, bias, mean, var, None, None, out), input, eps=eps, relu=relu
    )
    return out


def _bwd_reduce_outputs(grad_out, out, input, mean, var, eps, relu, write_grad_residual):
    sum_dy, sum_dy_xhat = _stats_outputs(input)
    if write_grad_residual:
        return sum_dy, sum_dy_xhat, torch.empty_like(input, dtype=grad_out.dtype)
    return sum_dy, sum_dy_xhat, torch.empty((0,), dtype=grad_out.dtype, device=input.device)


def batch_norm_add_relu_bwd_reduce(
    grad_out, out, input, mean, var, eps, relu, write_grad_residual, launch=_direct, sm_count=None
):
    """(sum_dy, sum_dy_xhat, grad_residual): the first backward pass; sm_count as in batch_norm_stats."""
    sum_dy, sum_dy_xhat, grad_residual = outputs = _bwd_reduce_outputs(
        grad_out, out, input, mean, var, eps, relu, write_grad_residual
    )
    tensors = (input, grad_out, out if relu else None, mean, grad_residual if write_grad_residual else None)
    part, programs = _reduce(launch, 2, tensors, input, sm_count)
    _merge(launch, part, programs, sum_dy, sum_dy_xhat, var=var, eps=eps)
    return outputs


def _bwd_input_outputs(grad, out, input, *args):
    return torch.empty_like(input)


def batch_norm_add_relu_bwd_input(
    grad, out, input, mean, var, eps, weight, sum_dy, sum_dy_xhat, count, training, relu, launch=_direct
):
    """grad_input: the second backward pass."""
    grad_input = _bwd_input_outputs(grad, out, input)
    sums = (sum_dy, sum_dy_xhat) if training else (None, None)
    tensors = (input, None, grad, out if relu else None, weight, None, mean, var, *sums, grad_input)
    _elementwise(launch, tensors, input, count, eps)
    return grad_input


# ----------------------------------------------------------------------------------------------
# Registered operators
# ----------------------------------------------------------------------------------------------


_REDUCE_KERNELS = (_reduce_partials_kernel, _merge_partials_kernel)

batch_norm_stats_triton = register_op(spec.STATS, batch_norm_stats, check_bn_stats_op, _REDUCE_KERNELS)
batch_norm_combine_stats_triton = register_op(
    spec.COMBINE_STATS, batch_norm_combine_stats, check_bn_combine_op, (_combine_stats_kernel,)
)
batch_norm_add_relu_fwd_triton = register_op(spec.FWD, batch_norm_add_relu_fwd, check_bn_fwd_op, (_elementwise_kernel,))
batch_norm_add_relu_bwd_reduce_triton = register_op(
    spec.BWD_REDUCE, batch_norm_add_relu_bwd_reduce, check_bn_bwd_reduce_op, _REDUCE_KERNELS
)
batch_norm_add_relu_bwd_input_triton = register_op(
    spec.BWD_INPUT, batch_norm_add_relu_bwd_input, check_bn_bwd_input_op, (_elementwise_kernel,)
)
