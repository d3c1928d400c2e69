"""Add & Norm (h = x + residual, y = LayerNorm/RMSNorm(h) * weight + bias) as Triton kernels.

Registers two operators with the same signatures and semantics as the C++ ones declared in
csrc/ops.cpp (see fusedres/reference/add_norm.py for the eager spec):

* ``fusedres::add_norm_fwd_triton(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h)
  -> (y, h, mean, rstd)``
* ``fusedres::add_norm_bwd_triton(dy, dh, h, weight, bias, mean, rstd, rms_norm, dresidual_dtype)
  -> (dx, dresidual, dweight, dbias)``

With compiled Triton both are ``torch.library.triton_op``s: torch.compile and export see the
kernels themselves, and fake-tensor propagation runs the launcher. Under Triton's interpreter
they are opaque ``torch.library.custom_op``s with the same schema (see ``_register``). No
autograd is registered here (fusedres/ops does it).

Arithmetic is in float32, or float64 when x (forward) / dy (backward) is float64: the statistics
dtype, which is also the dtype of mean and rstd. Rows are (M, N) with unit stride along N and
any row stride. On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1
set before triton is imported), which is how CI tests them.
"""

# The op signatures keep typing.Optional (UP045 is ignored file-wide): torch.library infers the
# operator schema from these annotations, and Optional[...] is the spelling every supported torch
# version maps to "Tensor?" / "ScalarType?".
# ruff: noqa: UP045
import functools
import math
import os
import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

__all__ = ["add_norm_fwd_triton", "add_norm_bwd_triton", "triton_usable"]

# Whether @triton.jit below produced interpreted kernels (decided when triton reads the
# environment, i.e. at import of this module).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# A row is held in registers as one block when next_power_of_2(N) fits both in
# _MAX_FUSED_BYTES of x's (dy's) dtype, as in flash-attention / Liger, and in _MAX_FUSED_N_*
# elements: beyond those, ptxas (sm_80/sm_90, num_warps <= 16) spills registers (the backward
# also keeps the dweight/dbias accumulators live). Wider rows loop over blocks of _LOOP_BLOCK_N.
_MAX_FUSED_BYTES = 65536
_MAX_FUSED_N_FWD = 16384
_MAX_FUSED_N_BWD = 8192
_LOOP_BLOCK_N = 4096
# Smallest block: keeps tiny rows (N = 1, 7) on well-trodden layouts on GPU; masked anyway.
_MIN_BLOCK_N = 16


# ----------------------------------------------------------------------------------------------
# Kernels
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


@triton.jit
def _rsqrt_rn(v, ACC_FP64: tl.constexpr):
    # 1 / sqrt(v) correctly rounded (tl.sqrt and "/" are approximate in float32 on GPU).
    if ACC_FP64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.div_rn(1.0, tl.sqrt_rn(v))
    return r


@triton.jit
def _load_h(X, R, cols, mask, acc_ty: tl.constexpr, h_ty: tl.constexpr, HAS_R: tl.constexpr):
    # h = x + residual in the accumulation dtype, rounded to h's dtype. Returns (h in acc_ty,
    # h in h_ty); the rounding happens even when h is not stored, so y = norm(round(x + r)).
    h = tl.load(X + cols, mask=mask, other=0.0).to(acc_ty)
    if HAS_R:
        h += tl.load(R + cols, mask=mask, other=0.0).to(acc_ty)
    h_st = _round_to(h, h_ty)
    return h_st.to(acc_ty), h_st


@triton.jit
def _add_norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x
    R,  # (M, N) residual or None
    W,  # (N,) weight or None
    B,  # (N,) bias or None
    Y,  # (M, N) output, x's dtype
    H,  # (M, N) h output when STORE_H, else an empty tensor of h's dtype (never touched)
    Mean,  # (M,) stats dtype; empty (never touched) for RMSNorm
    Rstd,  # (M,) stats dtype: float32, or float64 for float64 x; also the accumulation dtype
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    N,
    eps_hi,  # eps = eps_hi + eps_lo: float arguments reach kernels as float32, and float64
    eps_lo,  # rows need eps to float64 precision
    IS_RMS: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_H: tl.constexpr,
    ACC_FP64: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the row stays in registers
    BLOCK_N: tl.constexpr,
):
    # One program per row.
    row = tl.program_id(0).to(tl.int64)
    acc_ty = Rstd.dtype.element_ty
    h_ty = H.dtype.element_ty
    y_ty = Y.dtype.element_ty
    X += row * stride_x
    Y += row * stride_y
    if HAS_R:
        R += row * stride_r
    if STORE_H:
        H += row * stride_h
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        mask = cols < N
        h, h_st = _load_h(X, R, cols, mask, acc_ty, h_ty, HAS_R)
        if STORE_H:
            tl.store(H + cols, h_st, mask=mask)
        # Masked columns of h are 0.
        if IS_RMS:
            var = tl.sum(h * h, axis=0) / N
            rstd = _rsqrt_rn(var + eps, ACC_FP64)
            xhat = h * rstd
        else:
            # Two passes over the row in registers: mean, then the mean of squared deviations.
            mean = tl.sum(h, axis=0) / N
            d = tl.where(mask, h - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
            rstd = _rsqrt_rn(var + eps, ACC_FP64)
            xhat = d * rstd
        y = xhat
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(acc_ty)
        tl.store(Y + cols, _round_to(y, y_ty), mask=mask)
    else:
        # Wide rows: pass 1 sums h (LN) or h^2 (RMS) and stores h; LN's pass 2 sums squared
        # deviations from the mean; the last pass normalizes. h is recomputed from x and
        # residual in each pass (bitwise the same values), not re-read from H.
        acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h, h_st = _load_h(X, R, c, mask, acc_ty, h_ty, HAS_R)
            if STORE_H:
                tl.store(H + c, h_st, mask=mask)
            if IS_RMS:
                acc += h * h
            else:
                acc += h
        if IS_RMS:
            var = tl.sum(acc, axis=0) / N
        else:
            mean = tl.sum(acc, axis=0) / N
            acc2 = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                h, h_st = _load_h(X, R, c, mask, acc_ty, h_ty, HAS_R)
                d = tl.where(mask, h - mean, 0.0)
                acc2 += d * d
            var = tl.sum(acc2, axis=0) / N
        rstd = _rsqrt_rn(var + eps, ACC_FP64)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h, h_st = _load_h(X, R, c, mask, acc_ty, h_ty, HAS_R)
            if IS_RMS:
                y = h * rstd
            else:
                y = (h - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=mask, other=0.0).to(acc_ty)
            if HAS_B:
                y = y + tl.load(B + c, mask=mask, other=0.0).to(acc_ty)
            tl.store(Y + c, _round_to(y, y_ty), mask=mask)

    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


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
# partials buffer for wide rows), and writes one (N,) row of the (P, N) partials. The launcher
# then sums the partials over P in a fixed order: no atomics, so the result is deterministic.
@triton.jit
def _add_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient of y
    DH,  # (M, N) upstream gradient of h (prenorm) or None
    H,  # (M, N) the h that was normalized
    W,  # (N,) weight or None
    Mean,  # (M,) stats; empty (never touched) for RMSNorm
    Rstd,  # (M,) stats dtype, also the accumulation dtype
    DX,  # (M, N) dy's dtype
    DRES,  # (M, N) dresidual when STORE_DRES, else None
    DW,  # (P, N) dweight partials (accumulation dtype) or None
    DB,  # (P, N) dbias partials or None
    stride_dy,
    stride_dh,
    stride_h,
    stride_dx,
    stride_dres,
    M,
    N,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_DRES: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_ty = Rstd.dtype.element_ty
    dx_ty = DX.dtype.element_ty
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(rows_per_program, M - row_start)  # >= 1 by the launcher's grid size
    cols = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N  # this program's row of the partials

    if SINGLE_BLOCK:
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
        dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for i in range(0, n_rows):
            row = row_start + i
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
            rstd = tl.load(Rstd + row)
            if IS_RMS:
                xhat = h * rstd
            else:
                mean = tl.load(Mean + row)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
            if HAS_W:
                g = dy * w
                dw_acc += dy * xhat
            else:
                g = dy
            if HAS_B:
                db_acc += dy
            c1 = tl.sum(xhat * g, axis=0) / N
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=0) / N
                dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(acc_ty)
            tl.store(DX + row * stride_dx + cols, _round_to(dx, dx_ty), mask=mask)
            if STORE_DRES:
                tl.store(DRES + row * stride_dres + cols, _round_to(dx, DRES.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(DW + part + cols, dw_acc, mask=mask)
        if HAS_B:
            tl.store(DB + part + cols, db_acc, mask=mask)
    else:
        # Wide rows: per row, pass 1 reduces mean(xhat * g) and mean(g); pass 2 writes dx and
        # adds into this program's partials row (zero-filled by the launcher; only this
        # program reads or writes it, with the same layout, so no synchronization is needed).
        for i in range(0, n_rows):
            row = row_start + i
            rstd = tl.load(Rstd + row)
            if not IS_RMS:
                mean = tl.load(Mean + row)
            s1 = tl.zeros([BLOCK_N], dtype=acc_ty)
            s2 = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                h = tl.load(H + row * stride_h + c, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(acc_ty)
                if IS_RMS:
                    xhat = h * rstd
                else:
                    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                if HAS_W:
                    g = dy * tl.load(W + c, mask=mask, other=0.0).to(acc_ty)
                else:
                    g = dy
                s1 += xhat * g
                if not IS_RMS:
                    s2 += g
            c1 = tl.sum(s1, axis=0) / N
            if not IS_RMS:
                c2 = tl.sum(s2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                h = tl.load(H + row * stride_h + c, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(acc_ty)
                if IS_RMS:
                    xhat = h * rstd
                else:
                    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                if HAS_W:
                    g = dy * tl.load(W + c, mask=mask, other=0.0).to(acc_ty)
                    pw = tl.load(DW + part + c, mask=mask, other=0.0)
                    tl.store(DW + part + c, pw + dy * xhat, mask=mask)
                else:
                    g = dy
                if HAS_B:
                    pb = tl.load(DB + part + c, mask=mask, other=0.0)
                    tl.store(DB + part + c, pb + dy, mask=mask)
                if IS_RMS:
                    dx = (g - xhat * c1) * rstd
                else:
                    dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row * stride_dh + c, mask=mask, other=0.0).to(acc_ty)
                tl.store(DX + row * stride_dx + c, _round_to(dx, dx_ty), mask=mask)
                if STORE_DRES:
                    tl.store(DRES + row * stride_dres + c, _round_to(dx, DRES.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def triton_usable(device: torch.device) -> bool:
    """Whether these kernels can run on tensors of ``device``: CUDA devices when a GPU is present;
    CPU only under Triton's interpreter (TRITON_INTERPRET=1, set before this module was imported)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    if device.type == "cpu":
        return _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
    return False


def _skip_launch(t: Tensor) -> bool:
    """Whether t only carries metadata (meta device, or fake while interpreted). Compiled kernels
    go through wrap_triton's traceable wrapper, whose fake implementation launches nothing; but
    wrap_triton hands interpreted kernels back unwrapped, and the interpreter would try to read
    a fake tensor's storage. Skipping the launch is what the traceable wrapper does."""
    if t.device.type == "meta":
        return True
    if _INTERPRETED:
        from torch._subclasses.fake_tensor import is_fake

        return is_fake(t)
    return False


def _on_interpreter(device: torch.device) -> bool:
    return _INTERPRETED or device.type != "cuda"


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    try:
        return _sm_count_of(torch.cuda.current_device() if device.index is None else device.index)
    except Exception:  # e.g. fake CUDA tensors traced on a machine without a GPU
        return 132


def _block_config(n: int, element_size: int, max_n: int) -> tuple[int, bool]:
    """(BLOCK_N, SINGLE_BLOCK) for rows of n elements."""
    block = max(triton.next_power_of_2(n), _MIN_BLOCK_N)
    max_fused = max(min(_MAX_FUSED_BYTES // element_size, max_n), _MIN_BLOCK_N)
    if block <= max_fused:
        return block, True
    return max(min(_LOOP_BLOCK_N, max_fused), _MIN_BLOCK_N), False


def _launch_heuristics(block_n: int, device: torch.device, backward: bool, m: int = 0) -> tuple[int, int]:
    """(num_warps, programs). num_warps: 1 under the interpreter; on GPU about 16 (forward) or 8
    (backward, more live vectors per column) columns per thread, clamped to 4..16 warps.
    programs (backward only): how many programs share the M rows; each writes one row of the
    (programs, N) weight/bias-gradient partials. On GPU a few waves of SMs (more for narrow
    rows, whose programs are cheap); under the interpreter min(M, 4)."""
    if _on_interpreter(device):
        return 1, max(min(m, 4), 1)
    per_warp = 256 if backward else 512
    num_warps = max(4, min(16, block_n // per_warp))
    sms = _sm_count(device)
    factor = 4 if block_n <= 1024 else 2 if block_n <= 4096 else 1
    return num_warps, max(min(m, sms * factor), 1)


def _check_rows(t: Tensor, name: str, m: int, n: int, device: torch.device) -> None:
    torch._check(
        t.dim() == 2 and t.size(0) == m and t.size(1) == n,
        lambda: f"add_norm (triton): {name} must have shape ({m}, {n}), got {tuple(t.shape)}",
    )
    torch._check(
        n <= 1 or t.stride(1) == 1,
        lambda: f"add_norm (triton): {name} must have unit stride along its last dimension",
    )
    torch._check(t.device == device, lambda: f"add_norm (triton): {name} must be on {device}")


def _check_vector(t: Optional[Tensor], name: str, n: int, device: torch.device) -> None:
    if t is None:
        return
    torch._check(
        t.dim() == 1 and t.size(0) == n,
        lambda: f"add_norm (triton): {name} must have shape ({n},), got {tuple(t.shape)}",
    )
    torch._check(n <= 1 or t.stride(0) == 1, lambda: f"add_norm (triton): {name} must be contiguous")
    torch._check(t.device == device, lambda: f"add_norm (triton): {name} must be on {device}")


def _split_eps(eps: float) -> tuple[float, float]:
    """eps as hi + lo with hi representable in float32 (kernels get float arguments as float32)."""
    try:
        hi = struct.unpack("f", struct.pack("f", eps))[0]
    except OverflowError:
        return eps, 0.0
    lo = eps - hi
    return hi, (lo if math.isfinite(lo) else 0.0)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register(name: str):
    """Register a launcher as the operator ``name``.

    Compiled Triton: ``torch.library.triton_op``, so torch.compile / export trace into the kernels
    and fake tensors run the launcher itself (wrap_triton's wrapper launches nothing on them).

    Interpreter (TRITON_INTERPRET=1): wrap_triton hands interpreted kernels back unwrapped, so a
    triton_op traced by AOTDispatcher (torch.compile) would capture the allocations but not the
    kernels and return uninitialized outputs. There the launcher is registered as an opaque
    ``torch.library.custom_op`` instead, with the launcher itself (which skips the kernel on fake
    tensors) as its fake implementation: exactly what triton_op registers, minus the
    decomposition. Same inferred schema either way.
    """

    def dec(fn):
        if not _INTERPRETED:
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return dec


@_register("fusedres::add_norm_fwd_triton")
def add_norm_fwd_triton(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms_norm: bool,
    h_dtype: torch.dtype,
    store_h: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 2, lambda: f"add_norm (triton): x must be 2-D, got {x.dim()} dims")
    M, N = x.shape
    device = x.device
    _check_rows(x, "x", M, N, device)
    if residual is not None:
        _check_rows(residual, "residual", M, N, device)
    _check_vector(weight, "weight", N, device)
    _check_vector(bias, "bias", N, device)

    stats = _stats_dtype(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=device)
    h = torch.empty((M, N) if store_h else (0,), dtype=h_dtype, device=device)
    mean = torch.empty((0,) if rms_norm else (M,), dtype=stats, device=device)
    rstd = torch.empty((M,), dtype=stats, device=device)
    if M == 0 or _skip_launch(x):
        return y, h, mean, rstd

    block_n, single = _block_config(N, x.element_size(), _MAX_FUSED_N_FWD)
    num_warps, _ = _launch_heuristics(block_n, device, backward=False)
    eps_hi, eps_lo = _split_eps(float(eps))
    wrap_triton(_add_norm_fwd_kernel)[(M,)](
        x,
        residual,
        weight,
        bias,
        y,
        h,
        mean,
        rstd,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        h.stride(0) if store_h else 0,
        N,
        eps_hi,
        eps_lo,
        IS_RMS=rms_norm,
        HAS_R=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        STORE_H=store_h,
        ACC_FP64=stats == torch.float64,
        SINGLE_BLOCK=single,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, h, mean, rstd


@_register("fusedres::add_norm_bwd_triton")
def add_norm_bwd_triton(
    dy: Tensor,
    dh: Optional[Tensor],
    h: Tensor,
    residual: Optional[Tensor],
    h_dtype: torch.dtype,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    rms_norm: bool,
    dresidual_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(h.dim() == 2, lambda: f"add_norm (triton): h must be 2-D, got {h.dim()} dims")
    if residual is not None:
        # h was not stored: form it as the forward did (x + residual in the accumulation dtype,
        # rounded to h_dtype). GPUs store h instead (a write costs what this read does), so this
        # path is for completeness, not speed.
        _check_rows(residual, "residual", h.shape[0], h.shape[1], h.device)
        h = (h.to(_stats_dtype(dy.dtype)) + residual).to(h_dtype)
    M, N = h.shape
    device = h.device
    _check_rows(h, "h", M, N, device)
    _check_rows(dy, "dy", M, N, device)
    if dh is not None:
        _check_rows(dh, "dh", M, N, device)
    _check_vector(weight, "weight", N, device)
    _check_vector(bias, "bias", N, device)
    stats = _stats_dtype(dy.dtype)
    for t, name in ((rstd, "rstd"),) if rms_norm else ((rstd, "rstd"), (mean, "mean")):
        torch._check(
            t.dim() == 1 and t.size(0) == M and (M <= 1 or t.stride(0) == 1) and t.device == device,
            lambda name=name: f"add_norm (triton): {name} must be a contiguous ({M},) tensor on {device}",
        )
        torch._check(t.dtype == stats, lambda name=name: f"add_norm (triton): {name} must be {stats}")

    dx = torch.empty((M, N), dtype=dy.dtype, device=device)
    if dresidual_dtype is not None:
        dres = torch.empty((M, N), dtype=dresidual_dtype, device=device)
    else:
        dres = torch.empty((0,), dtype=dy.dtype, device=device)

    block_n, single = _block_config(N, dy.element_size(), _MAX_FUSED_N_BWD)
    num_warps, programs = _launch_heuristics(block_n, device, backward=True, m=M)
    rows_per_program = triton.cdiv(M, programs) if M > 0 else 1
    programs = triton.cdiv(M, rows_per_program)  # every program gets at least one row
    alloc = torch.empty if single else torch.zeros
    dw_part = alloc((programs, N), dtype=stats, device=device) if weight is not None else None
    db_part = alloc((programs, N), dtype=stats, device=device) if bias is not None else None

    if M > 0 and not _skip_launch(dy):
        wrap_triton(_add_norm_bwd_kernel)[(programs,)](
            dy,
            dh,
            h,
            weight,
            mean,
            rstd,
            dx,
            dres if dresidual_dtype is not None else None,
            dw_part,
            db_part,
            dy.stride(0),
            dh.stride(0) if dh is not None else 0,
            h.stride(0),
            dx.stride(0),
            dres.stride(0) if dresidual_dtype is not None else 0,
            M,
            N,
            rows_per_program,
            IS_RMS=rms_norm,
            HAS_DH=dh is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            STORE_DRES=dresidual_dtype is not None,
            SINGLE_BLOCK=single,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )

    # Fixed-order reduction over the programs (an (0, N) partial sums to zeros when M == 0).
    empty = torch.empty((0,), dtype=dy.dtype, device=device)  # as the C++ op and its fake
    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else empty
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else empty.clone()
    return dx, dres, dweight, dbias
