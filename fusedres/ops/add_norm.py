"""Add & Norm: LayerNorm or RMSNorm of h = x + residual, with h optionally returned (prenorm).

The operators are declared once in csrc/ops.cpp (C++ kernels: CPU and CUDA) and defined with
the same schema in fusedres/triton/add_norm.py (Triton). This module adds what every backend
shares: the fake (meta) kernel, one autograd formula, and the public functions.
fusedres/reference/add_norm.py is the spec all of them are tested against.

Two paths, one formula (`_setup_context` + `_backward_with`):
- eager: `_AddNormFunction.apply` calls the backend's kernel directly (the C++ operator below
  the Autograd dispatch key, or the Triton launcher): one Python -> kernel crossing forward and
  one backward. Without grad it calls the kernel alone.
- torch.compile: the registered operators, with the same formula attached by
  `torch.library.register_autograd`, so the compiler traces them like any aten op (and opcheck
  tests them).
Where fusedres._fastpath loaded (built for this torch and CPython), eager calls on the C++
backends take it instead of `_AddNormFunction`: one call into C++, which runs the same formula
as a C++ autograd node (csrc/fastpath/add_norm.cpp; the tests run both).

Arguments are checked once: by the C++ operators themselves, or by check_add_norm_args in front
of the other backends (see _add_norm).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from fusedres._checks import as_rows, check_add_norm_args, check_add_norm_bwd_op, check_add_norm_fwd_op, stats_dtype
from fusedres._extension import EXTENSION_LOADED, FASTPATH
from fusedres.backends import resolve_backend
from fusedres.ops._eager import below_autograd, direct, plain, plain_tensors
from fusedres.reference.add_norm import add_norm_reference

_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_promote = torch.promote_types


class _Kernels(NamedTuple):
    fwd: object  # the kernels, called directly (fusedres/ops/_eager.py)
    bwd: object
    fwd_op: object  # the registered operators (torch.compile, opcheck, dispatch modes)
    bwd_op: object


_KERNELS: dict[str, _Kernels] = {}

if EXTENSION_LOADED:
    _fwd, _bwd = torch.ops.fusedres.add_norm_fwd.default, torch.ops.fusedres.add_norm_bwd.default
    for _device in ("cpu", "cuda"):
        _KERNELS[_device] = _Kernels(direct(_fwd, _device), direct(_bwd, _device), _fwd, _bwd)

try:
    from fusedres.triton import add_norm as _triton
except ImportError:  # no triton on this platform
    _triton = None
else:
    _KERNELS["triton"] = _Kernels(
        _triton.add_norm_fwd,
        _triton.add_norm_bwd,
        torch.ops.fusedres.add_norm_fwd_triton.default,
        torch.ops.fusedres.add_norm_bwd_triton.default,
    )


# --- fake kernels ------------------------------------------------------------------------------


def add_norm_fwd_fake(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h):
    check_add_norm_fwd_op(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h)
    m = x.numel() // x.shape[-1] if x.dim() else 1
    stats = stats_dtype(x.dtype)
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape if store_h else (0,), dtype=h_dtype)
    mean = x.new_empty((0 if rms_norm else m,), dtype=stats)
    rstd = x.new_empty((m,), dtype=stats)
    return y, h, mean, rstd


def add_norm_bwd_fake(dy, dh, h, residual, h_dtype, weight, bias, mean, rstd, rms_norm, dresidual_dtype):
    check_add_norm_bwd_op(dy, dh, h, residual, h_dtype, weight, bias, mean, rstd, rms_norm, dresidual_dtype)
    dx = dy.new_empty(h.shape)
    dresidual = dy.new_empty(h.shape, dtype=dresidual_dtype) if dresidual_dtype is not None else dy.new_empty(0)
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else dy.new_empty(0)
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else dy.new_empty(0)
    return dx, dresidual, dweight, dbias


if EXTENSION_LOADED:
    torch.library.register_fake("fusedres::add_norm_fwd")(add_norm_fwd_fake)
    torch.library.register_fake("fusedres::add_norm_bwd")(add_norm_bwd_fake)


# --- autograd: one formula for both paths ------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms_norm, h_dtype, store_h = inputs
    ctx.call = (None, (eps, rms_norm, h_dtype, store_h), None, *_grad_dtypes(x, residual))
    _save(ctx, x, residual, weight, bias, store_h, output)


def _grad_dtypes(x, residual):
    """x's dtype (dy's), and residual's when it differs (its grad is then a tensor of its own)."""
    x_dtype = x.dtype
    if residual is None:
        return x_dtype, None
    residual_dtype = residual.dtype
    return x_dtype, (residual_dtype if residual_dtype != x_dtype else None)


def _save(ctx, x, residual, weight, bias, store_h, output):
    # Backward needs the tensor that was normalized: the stored h, or x (+ residual, added back
    # by the backward kernel) when h was not written. x.to(h_dtype) only ever widens x, so x
    # itself stands for h when there is no residual.
    _y, h, mean, rstd = output
    if store_h:
        ctx.save_for_backward(h, None, weight, bias, mean, rstd)
    else:
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd)


def _backward_with(bwd, ctx, dy, dh, tail):
    """The grads of x, residual, weight and bias, followed by `tail` (the other inputs' Nones)."""
    h, residual, weight, bias, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    _kernels, (_eps, rms_norm, h_dtype, _store_h), _prenorm, x_dtype, dresidual_dtype = ctx.call
    if dy is None:  # only h was used downstream
        dy = h.new_zeros(h.shape, dtype=x_dtype)
    elif not dy.is_contiguous():
        dy = as_rows(dy)
    if dh is not None:
        if dh.numel() == 0:  # the grad of the registered op's h when it was not written
            dh = None
        elif not dh.is_contiguous():
            dh = as_rows(dh)
    needs_residual = needs[1]
    if not needs_residual:
        dresidual_dtype = None
    dx, dresidual, dweight, dbias = bwd(
        dy, dh, h, residual, h_dtype, weight, bias if needs[3] else None, mean, rstd, rms_norm, dresidual_dtype
    )
    # x and residual get the same grad (dL/dh); one tensor serves both when dtypes agree.
    return (
        dx if needs[0] else None,
        (dx if dresidual_dtype is None else dresidual) if needs_residual else None,
        dweight if needs[2] else None,
        dbias if needs[3] else None,
        *tail,
    )


_NO_OP_GRADS = (None,) * 4  # eps, rms_norm, h_dtype, store_h


def _make_registered_backward(bwd_op):
    def backward(ctx, dy, dh, _dmean, _drstd):
        return _backward_with(bwd_op, ctx, dy, dh, _NO_OP_GRADS)

    return backward


for _kernels in {k.fwd_op: k for k in _KERNELS.values()}.values():  # once per registered op
    torch.library.register_autograd(
        _kernels.fwd_op, _make_registered_backward(_kernels.bwd_op), setup_context=_setup_context
    )


class _AddNormFunction(torch.autograd.Function):
    """The eager path: the backend's kernels called directly, forward and backward.

    The tensors are apply's arguments and everything else one tuple, `call` = (kernels, the
    forward op's other arguments, prenorm, *_grad_dtypes): each argument of apply costs host
    time, forward and backward (a grad slot). The tuple is the saved context too."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, call):
        kernels, args, prenorm, _x_dtype, _dresidual_dtype = call
        if plain(x, residual, weight, bias):
            output = kernels.fwd(x, residual, weight, bias, *args)
        else:
            with below_autograd():
                output = kernels.fwd_op(x, residual, weight, bias, *args)
        ctx.call = call
        _save(ctx, x, residual, weight, bias, args[3], output)
        if not prenorm:
            return output[0]
        ctx.set_materialize_grads(False)  # a grad for y or h alone: no zeros of the other's size
        return output[0], output[1]

    @staticmethod
    def backward(ctx, dy, dh=None):
        if plain(dy, dh):
            return _backward_with(ctx.call[0].bwd, ctx, dy, dh, _NO_CALL_GRAD)
        with below_autograd():
            return _backward_with(ctx.call[0].bwd_op, ctx, dy, dh, _NO_CALL_GRAD)


_NO_CALL_GRAD = (None,)
_apply = _AddNormFunction.apply

# --- public API --------------------------------------------------------------------------------


def add_norm(x, residual, weight, bias, eps, *, rms_norm: bool, prenorm: bool = False, residual_in_fp32: bool = False):
    """LayerNorm (rms_norm=False) or RMSNorm (rms_norm=True) of h = x + residual over the last
    dimension. Returns y, or (y, h) with prenorm=True. See add_layer_norm / add_rms_norm."""
    return _add_norm(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32)


# The C++ operators check every tensor argument themselves (shape, dtype, device, layout: what
# their memory safety needs), so in front of them the fast path checks only what they do not:
# eps (finite), and that weight and bias are vectors (the kernels accept any N contiguous
# elements, for the modules' multi-dim parameters). When an operator rejects its arguments,
# check_add_norm_args finds the argument and raises the error every backend raises.
_SELF_CHECKING = frozenset(("cpu", "cuda"))
_INF = math.inf
# The eager call as one crossing into a C++ autograd node (csrc/fastpath/add_norm.cpp), where
# fusedres._fastpath loaded (built for this torch and CPython); else _run's Python Function.
_fastpath = FASTPATH.add_norm if FASTPATH is not None else None


def has_fastpath() -> bool:
    """Whether eager calls take fusedres._fastpath (else the Python autograd Function)."""
    return _fastpath is not None


@contextlib.contextmanager
def without_fastpath():
    """Runs the enclosed calls on the Python path even where fusedres._fastpath loaded (what the
    bench measures it against; not thread-safe: a process-wide switch)."""
    global _fastpath
    saved, _fastpath = _fastpath, None
    try:
        yield
    finally:
        _fastpath = saved


def _add_norm(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, param_shape=None):
    """Checks the arguments and runs (a module normalizing several trailing dims passes its
    parameters' shape, as check_add_norm_args takes it)."""
    try:
        backend = resolve_backend(x.device)
        if (
            backend in _SELF_CHECKING
            and type(eps) is float
            and 0 < eps < _INF
            and param_shape is None
            and (weight is None or weight.dim() == 1)
            and (bias is None or bias.dim() == 1)
        ):
            if _fastpath is not None and not _is_compiling() and plain_tensors(x, residual, weight, bias):
                return _fastpath(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32)
            return _run(backend, x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32)
    except (RuntimeError, AttributeError, TypeError, IndexError) as error:
        failure = error
    else:
        eps = check_add_norm_args(x, residual, weight, bias, eps, param_shape=param_shape)
        return _run(backend, x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32)
    check_add_norm_args(x, residual, weight, bias, eps, param_shape=param_shape)  # names the argument
    raise failure


def _run(backend, x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32):
    """add_norm on checked arguments (or ones a C++ operator checks)."""
    if backend == "reference":
        if weight is not None and weight.dim() != 1:  # a module's multi-dim parameters
            weight, bias = weight.reshape(-1), bias.reshape(-1) if bias is not None else None
        return add_norm_reference(
            x, residual, weight, bias, eps, rms_norm=rms_norm, prenorm=prenorm, residual_in_fp32=residual_in_fp32
        )
    kernels = _KERNELS[backend]
    # h's dtype: residual's (x's without one), at least fp32 with residual_in_fp32
    # (fusedres.reference.h_dtype_for).
    h_dtype = x_dtype = residual_dtype = x.dtype
    if residual is not None:
        h_dtype = residual_dtype = residual.dtype
        if not residual.is_contiguous():
            residual = as_rows(residual)
    if residual_in_fp32:
        h_dtype = _promote(h_dtype, torch.float32)
    if not x.is_contiguous():
        x = as_rows(x)
    if weight is not None and not weight.is_contiguous():  # the kernels read N contiguous elements
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    needs_grad = _grad_enabled() and (
        (weight is not None and weight.requires_grad)  # first: true in training
        or x.requires_grad
        or (residual is not None and residual.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    # h is written only when someone reads it: prenorm returns it; a backward reads it, except
    # on the CPU, which adds the residual back in the backward instead: a fresh output page costs
    # a CPU far more than re-reading a tensor (memory-neutral too: x and residual are kept in
    # place of h).
    store_h = prenorm or (needs_grad and residual is not None and backend != "cpu")
    if needs_grad and not _is_compiling():
        dresidual_dtype = residual_dtype if residual_dtype != x_dtype else None  # see _grad_dtypes
        return _apply(
            x, residual, weight, bias, (kernels, (eps, rms_norm, h_dtype, store_h), prenorm, x_dtype, dresidual_dtype)
        )
    if _is_compiling():  # the registered operator, with its autograd formula
        y, h, _mean, _rstd = kernels.fwd_op(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h)
    elif plain(x, residual, weight, bias):
        y, h, _mean, _rstd = kernels.fwd(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h)
    else:
        with below_autograd():
            y, h, _mean, _rstd = kernels.fwd_op(x, residual, weight, bias, eps, rms_norm, h_dtype, store_h)
    return (y, h) if prenorm else y


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5, *, prenorm=False, residual_in_fp32=False):
    """``F.layer_norm(x + residual, (N,), weight, bias, eps)`` in one pass over memory.

    Fuses ``h = x + residual; y = F.layer_norm(h, (N,), weight, bias, eps)``: BERT's
    ``LayerNorm(dropout(dense(h)) + input)`` (post-norm), or with ``prenorm=True`` the
    ``residual = x + residual; hidden = norm(residual)`` step of a pre-norm block (GPT-2).

    Args:
        x: (..., N) activations, float32 / float64 / float16 / bfloat16.
        residual: x's shape, or None (plain LayerNorm). Any float dtype: h = x + residual is
            formed in fp32 and rounded to residual's dtype (x's when None; float32 with
            ``residual_in_fp32=True``), as eager ``(x + residual)`` would be.
        weight, bias: (N,) or None.
        eps: added to the variance, > 0.
        prenorm: also return h, the next block's residual.
        residual_in_fp32: keep h in float32 (a low-precision model with an fp32 residual stream).

    Shape:
        x, residual, y, h: (..., N). Any leading shape; strided rows are read in place.

    Returns:
        y (x's dtype), or (y, h) with ``prenorm=True``.

    Example::

        >>> x, r = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
        >>> y = fusedres.add_layer_norm(x, r, torch.ones(64), torch.zeros(64))
        >>> torch.allclose(y, F.layer_norm(x + r, (64,)), atol=1e-5)
        True
    """
    return _add_norm(x, residual, weight, bias, eps, False, prenorm, residual_in_fp32)


def add_rms_norm(x, residual=None, weight=None, eps=1e-6, *, prenorm=False, residual_in_fp32=False):
    """``F.rms_norm(x + residual, (N,), weight, eps)`` in one pass over memory.

    Fuses Llama / Mistral / Qwen2's ``hidden = residual + attn_out; residual = hidden;
    hidden = rms_norm(hidden)`` (``prenorm=True``), or ``rms_norm(x + residual)``.

    Args:
        x: (..., N) activations, float32 / float64 / float16 / bfloat16.
        residual: x's shape, or None. h = x + residual is formed in fp32 and rounded to
            residual's dtype (x's when None; float32 with ``residual_in_fp32=True``).
        weight: (N,) or None.
        eps: added to the mean square, > 0.
        prenorm: also return h, the next block's residual.
        residual_in_fp32: keep h in float32.

    Shape:
        x, residual, y, h: (..., N).

    Returns:
        y (x's dtype), or (y, h) with ``prenorm=True``.

    Example::

        >>> x, r = torch.randn(4, 128), torch.randn(4, 128)
        >>> y, h = fusedres.add_rms_norm(x, r, torch.ones(128), prenorm=True)
        >>> torch.allclose(y, F.rms_norm(x + r, (128,), eps=1e-6), atol=1e-5)
        True
    """
    return _add_norm(x, residual, weight, None, eps, True, prenorm, residual_in_fp32)
