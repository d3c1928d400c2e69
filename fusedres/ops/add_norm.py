"""Add & Norm: LayerNorm or RMSNorm of h = x + residual, with h optionally returned (prenorm).

The operators are declared once in csrc/ops.cpp (C++ kernels: CPU and CUDA) and defined with
the same signature in fusedres/triton/add_norm.py (Triton). This module adds what every backend
shares: argument checks, backend dispatch, the fake (meta) kernel and the autograd formula.
fusedres/reference/add_norm.py is the spec all of them are tested against.
"""

from __future__ import annotations

import torch

from fusedres._extension import EXTENSION_LOADED
from fusedres.backends import resolve_backend
from fusedres.ops._checks import check_float_tensor, check_positive, check_same_device
from fusedres.reference.add_norm import add_norm_reference, h_dtype_for

# --- operators per backend --------------------------------------------------------------------

_FWD_OPS: dict[str, object] = {}
_BWD_OPS: dict[str, object] = {}

if EXTENSION_LOADED:
    _FWD_OPS["cpu"] = _FWD_OPS["cuda"] = torch.ops.fusedres.add_norm_fwd.default
    _BWD_OPS["cpu"] = _BWD_OPS["cuda"] = torch.ops.fusedres.add_norm_bwd.default

try:
    from fusedres.triton import add_norm as _triton_add_norm
except ImportError:  # no triton on this platform
    _triton_add_norm = None
else:
    _FWD_OPS["triton"] = _triton_add_norm.add_norm_fwd_triton
    _BWD_OPS["triton"] = _triton_add_norm.add_norm_bwd_triton


def _stats_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32


if EXTENSION_LOADED:

    @torch.library.register_fake("fusedres::add_norm_fwd")
    def _add_norm_fwd_fake(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h):
        m, n = x.shape
        stats = _stats_dtype(x.dtype)
        y = x.new_empty((m, n))
        h = x.new_empty((m, n) if store_h else (0,), dtype=h_dtype)
        mean = x.new_empty((0 if rms_norm else m,), dtype=stats)
        rstd = x.new_empty((m,), dtype=stats)
        return y, h, mean, rstd

    @torch.library.register_fake("fusedres::add_norm_bwd")
    def _add_norm_bwd_fake(dy, dh, h, residual, h_dtype, weight, bias, mean, rstd, rms_norm, dresidual_dtype):
        m, n = h.shape
        dx = dy.new_empty((m, n))
        dresidual = dy.new_empty((m, n), dtype=dresidual_dtype) if dresidual_dtype is not None else dy.new_empty(0)
        dweight = weight.new_empty((n,)) if weight is not None else dy.new_empty(0)
        dbias = bias.new_empty((n,)) if bias is not None else dy.new_empty(0)
        return dx, dresidual, dweight, dbias


# --- autograd, shared by every backend's operator ---------------------------------------------


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, rms_norm, h_dtype, store_h = inputs
    _y, h, mean, rstd = output
    ctx.rms_norm = rms_norm
    ctx.h_dtype = h_dtype
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.mark_non_differentiable(mean, rstd)
    # Backward needs the tensor that was normalized: the stored h, or x (+ residual, added back
    # by the backward kernel) when h was not written. x.to(h_dtype) only ever widens x, so x
    # itself stands for h when there is no residual.
    recompute = not store_h and residual is not None
    ctx.save_for_backward(h if store_h else x, residual if recompute else None, weight, bias, mean, rstd)


def _rows_unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    # Incoming grads may be expanded or transposed views; the kernels need unit column stride.
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _make_backward(bwd_op):
    def backward(ctx, dy, dh, _dmean, _drstd):
        h, residual, weight, bias, mean, rstd = ctx.saved_tensors
        needs_x, needs_residual, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        if dy is None:  # only h was used downstream
            dy = h.new_zeros(h.shape, dtype=ctx.x_dtype)
        separate_dresidual = needs_residual and ctx.residual_dtype not in (None, ctx.x_dtype)
        dx, dresidual, dweight, dbias = bwd_op(
            _rows_unit_stride(dy),
            _rows_unit_stride(dh) if dh is not None and dh.numel() > 0 else None,
            h,
            residual,
            ctx.h_dtype,
            weight,
            bias,
            mean,
            rstd,
            ctx.rms_norm,
            ctx.residual_dtype if separate_dresidual else None,
        )
        # x and residual get the same grad (dL/dh); one tensor serves both when dtypes agree.
        return (
            dx if needs_x else None,
            (dresidual if separate_dresidual else dx) if needs_residual else None,
            dweight if needs_weight else None,
            dbias if needs_bias else None,
            None,
            None,
            None,
            None,
        )

    return backward


_registered_ops = set()
for _name, _fwd in _FWD_OPS.items():
    if _fwd not in _registered_ops:
        torch.library.register_autograd(_fwd, _make_backward(_BWD_OPS[_name]), setup_context=_setup_context)
        _registered_ops.add(_fwd)


# --- public API --------------------------------------------------------------------------------


def _check_add_norm_args(x, residual, weight, bias, eps) -> float:
    check_float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the normalized one)")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"the normalized (last) dimension of x must not be empty, got x of shape {tuple(x.shape)}")
    check_float_tensor("residual", residual, optional=True)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_float_tensor(name, t, optional=True)
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {tuple(t.shape)}")
    check_same_device("x", x, residual=residual, weight=weight, bias=bias)
    return check_positive("eps", eps)


def _as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., N) -> (M, N) with unit stride along N: a view whenever the layout allows."""
    if t is None:
        return None
    return _rows_unit_stride(t).reshape(-1, t.shape[-1])


def _contiguous_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def add_norm(x, residual, weight, bias, eps, *, rms_norm: bool, prenorm: bool = False, residual_in_fp32: bool = False):
    """LayerNorm (rms_norm=False) or RMSNorm (rms_norm=True) of h = x + residual over the last
    dimension. Returns y, or (y, h) with prenorm=True. See add_layer_norm / add_rms_norm."""
    eps = _check_add_norm_args(x, residual, weight, bias, eps)
    backend = resolve_backend(x.device)
    if backend == "reference":
        return add_norm_reference(
            x, residual, weight, bias, eps, rms_norm=rms_norm, prenorm=prenorm, residual_in_fp32=residual_in_fp32
        )
    h_dtype = h_dtype_for(x, residual, residual_in_fp32)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias))
    # h is written only when someone reads it: prenorm returns it; a backward reads it, except
    # on the CPU, which adds the residual back in the backward instead: a fresh output page costs
    # a CPU far more than re-reading a tensor (memory-neutral too: x and residual are kept in
    # place of h).
    recompute_h = backend == "cpu" and residual is not None
    store_h = prenorm or (needs_grad and residual is not None and not recompute_h)
    y, h, _mean, _rstd = _FWD_OPS[backend](
        _as_rows(x),
        _as_rows(residual),
        _contiguous_vector(weight),
        _contiguous_vector(bias),
        eps,
        rms_norm,
        h_dtype,
        store_h,
    )
    y = y.view(x.shape)
    return (y, h.view(x.shape)) if prenorm else y


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5, *, prenorm=False, residual_in_fp32=False):
    """``F.layer_norm(x + residual, (N,), weight, bias, eps)`` in one pass over memory.

    h = x + residual is formed in fp32 and rounded to residual's dtype (x's when residual is
    None; float32 when residual_in_fp32). prenorm=True returns (y, h), h being the next block's
    residual. y has x's dtype. residual, weight and bias may be None.
    """
    return add_norm(x, residual, weight, bias, eps, rms_norm=False, prenorm=prenorm, residual_in_fp32=residual_in_fp32)


def add_rms_norm(x, residual=None, weight=None, eps=1e-6, *, prenorm=False, residual_in_fp32=False):
    """``F.rms_norm(x + residual, (N,), weight, eps)`` in one pass over memory; arguments and
    return value as add_layer_norm (no bias)."""
    return add_norm(x, residual, weight, None, eps, rms_norm=True, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
