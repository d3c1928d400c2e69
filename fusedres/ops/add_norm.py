"""Add & Norm: LayerNorm or RMSNorm of h = residual + dropout(x) * rowscale * colscale, with h
optionally returned (prenorm).

The operators' arguments and outputs are declared once, in fusedres/spec/add_norm.py; the C++
kernels (CPU and CUDA) and the Triton kernels (fusedres/triton/add_norm.py) implement them, and
fusedres/reference/add_norm.py is the eager spec. This module adds what every backend shares:
`plan` (what a call's arguments decide: h's dtype, whether h is written, what the backward
reads, how the grads route), the fake kernels, one autograd formula, and the public functions.

Two paths, one formula (`plan`, `_save`, `_backward_with`):
- eager: `_AddNormFunction.apply` calls the backend's kernel directly (the C++ operator below
  the Autograd dispatch key, or the Triton launcher): one Python -> kernel crossing forward and
  one backward. Without grad it calls the kernel alone.
- torch.compile: the registered operators, with the same formula attached by
  `torch.library.register_autograd`, so the compiler traces them like any aten op (and opcheck
  tests them).
Where fusedres._fastpath loaded (built for this torch and CPython), eager calls on the C++
backends take it instead of `_AddNormFunction`: one call into C++, which runs the same formula
as a C++ autograd node (csrc/fastpath/add_norm.cpp; its copy of `plan` is tested against this one).

Arguments are checked once: by the C++ operators themselves, or by the spec's checks in front of
the other backends (see _add_norm).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from fusedres._extension import EXTENSION_LOADED, FASTPATH
from fusedres._rng import philox_seed_offset
from fusedres.backends import resolve_backend
from fusedres.ops._eager import below_autograd, direct, fastpath_switch, plain, plain_tensors
from fusedres.reference.add_norm import add_norm_reference
from fusedres.reference.philox import dropout_mask_reference
from fusedres.spec import _rows_readable
from fusedres.spec import add_norm as spec
from fusedres.spec.python import allocate, arguments, checker, empty_like_device

_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_promote = torch.promote_types
_F32 = torch.float32

FwdArgs = arguments(spec.FWD)
BwdArgs = arguments(spec.BWD)
InplaceArgs = arguments(spec.INPLACE)
check_fwd_args = checker(spec.FWD)
check_bwd_args = checker(spec.BWD)
check_inplace_args = checker(spec.INPLACE)
# The public functions copy what the kernels cannot read in place: no layout rule for them.
_check_call = checker(spec.FWD, layout=False)


class _Kernels(NamedTuple):
    fwd: object  # the kernels, called directly (fusedres/ops/_eager.py)
    bwd: object
    fwd_op: object  # the registered operators (torch.compile, opcheck, dispatch modes)
    bwd_op: object
    inplace_op: object


_KERNELS: dict[str, _Kernels] = {}

if EXTENSION_LOADED:
    _fwd, _bwd = torch.ops.fusedres.add_norm_fwd.default, torch.ops.fusedres.add_norm_bwd.default
    _inplace = torch.ops.fusedres.add_norm_inplace.default
    for _device in ("cpu", "cuda"):
        _KERNELS[_device] = _Kernels(direct(_fwd, _device), direct(_bwd, _device), _fwd, _bwd, _inplace)

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
        torch.ops.fusedres.add_norm_inplace_triton.default,
    )


# --- the plan: what a call's arguments decide ---------------------------------------------------


class Plan(NamedTuple):
    h_dtype: torch.dtype
    store_h: bool  # the forward writes h
    saves_h: bool  # the backward reads the stored h; else it recomputes h from x (+ residual)
    saves_x: bool  # the backward reads x: to recompute h, or for dcolscale
    dresidual_dtype: torch.dtype | None  # the residual's grad as a tensor of its own (else it is dx)
    colscale_grad: bool


def plan(x, residual, residual_in_fp32, prenorm, needs_grad, recompute_h, transforms_x, colscale_grad) -> Plan:
    """The decisions of one call. h has residual's dtype (x's without one), at least fp32 with
    residual_in_fp32. h is written only when someone reads it: prenorm returns it; a backward
    reads it unless `recompute_h` (the CPU: a fresh output page costs a CPU far more than
    re-reading x and residual; memory-neutral, as x and residual are kept in place of h) or h is
    x itself (no residual, x untransformed: x.to(h_dtype) only widens x)."""
    return _plan(
        x.dtype,
        None if residual is None else residual.dtype,
        residual_in_fp32,
        prenorm,
        needs_grad,
        recompute_h,
        transforms_x,
        colscale_grad,
    )


@functools.cache  # a few dozen keys per process: the decisions cost a dict lookup per call
def _plan(x_dtype, residual_dtype, residual_in_fp32, prenorm, needs_grad, recompute_h, transforms_x, colscale_grad):
    h_dtype = residual_dtype or x_dtype
    if residual_in_fp32:
        h_dtype = _promote(h_dtype, _F32)
    h_is_x = residual_dtype is None and not transforms_x
    store_h = prenorm or (needs_grad and not (h_is_x or recompute_h))
    return _with_backward(h_dtype, store_h, x_dtype, residual_dtype, transforms_x, colscale_grad and needs_grad)


def plan_of(args: FwdArgs) -> Plan:
    """The plan of an operator call, read back from its arguments (the registered operator's
    autograd sees only those)."""
    colscale = args.colscale
    return _with_backward(
        args.h_dtype,
        args.store_h,
        args.x.dtype,
        None if args.residual is None else args.residual.dtype,
        _transforms_x(args.dropout_p, args.rowscale, colscale),
        colscale is not None and colscale.requires_grad,
    )


def _with_backward(h_dtype, store_h, x_dtype, residual_dtype, transforms_x, colscale_grad) -> Plan:
    # The backward reads h when it was written, else x (+ residual); x also for dcolscale. The
    # residual's grad is dL/dh: dx itself unless x's branch is transformed or the dtypes differ.
    own = residual_dtype is not None and (residual_dtype != x_dtype or transforms_x)
    return Plan(h_dtype, store_h, store_h, not store_h or colscale_grad, residual_dtype if own else None, colscale_grad)


def _transforms_x(dropout_p, rowscale, colscale) -> bool:
    return dropout_p > 0.0 or rowscale is not None or colscale is not None


# --- fake kernels ------------------------------------------------------------------------------


def add_norm_fwd_fake(*args):
    check_fwd_args(*args)
    return allocate(spec.FWD, args, empty_like_device)


def add_norm_bwd_fake(*args):
    check_bwd_args(*args)
    return allocate(spec.BWD, args, empty_like_device)


def add_norm_inplace_fake(*args):
    check_inplace_args(*args)


if EXTENSION_LOADED:
    torch.library.register_fake("fusedres::add_norm_fwd")(add_norm_fwd_fake)
    torch.library.register_fake("fusedres::add_norm_bwd")(add_norm_bwd_fake)
    torch.library.register_fake("fusedres::add_norm_inplace")(add_norm_inplace_fake)


# --- autograd: one formula for both paths ------------------------------------------------------


class _Call(NamedTuple):
    """What the backward needs besides the saved tensors (no tensors: those go through
    save_for_backward, so saved-tensor hooks and version checks see them)."""

    kernels: _Kernels | None  # None on the registered path (its backward calls the registered op)
    plan: Plan
    eps: float
    rms_norm: bool
    dropout_p: float
    weight_offset: float
    x_dtype: torch.dtype
    outputs: int  # the forward's differentiable outputs: 1 (y) or 2 (y, h)


def _save(ctx, args: FwdArgs, call: _Call, output) -> None:
    plan = call.plan
    _y, h, mean, rstd, _mask = output
    ctx.call = call
    ctx.save_for_backward(
        h if plan.saves_h else None,
        args.x if plan.saves_x else None,
        None if plan.saves_h else args.residual,
        args.weight,
        args.bias,
        None if args.rms_norm else mean,
        rstd,
        args.seed_offset,
        args.rowscale,
        args.colscale,
    )


def _backward_with(bwd, ctx, needs, dy, dh):
    """The grads of x, residual, weight, bias and colscale (`needs`: whether each is wanted)."""
    h, x, residual, weight, bias, mean, rstd, seed_offset, rowscale, colscale = ctx.saved_tensors
    call = ctx.call
    plan = call.plan
    shape_of = h if h is not None else x
    if dy is None:  # only h was used downstream
        dy = shape_of.new_zeros(shape_of.shape, dtype=call.x_dtype)
    elif not dy.is_contiguous():
        dy = as_rows(dy)
    if dh is not None:
        if dh.numel() == 0:  # the grad of the registered op's h when it was not written
            dh = None
        elif not dh.is_contiguous():
            dh = as_rows(dh)
    needs_residual = needs[1]
    dresidual_dtype = plan.dresidual_dtype if needs_residual else None
    dx, dresidual, dweight, dbias, dcolscale = bwd(
        *BwdArgs(
            dy,
            dh,
            h,
            x,
            residual,
            plan.h_dtype,
            weight,
            bias if needs[3] else None,
            mean,
            rstd,
            call.rms_norm,
            dresidual_dtype,
            call.dropout_p,
            seed_offset,
            rowscale,
            colscale,
            call.weight_offset,
            plan.colscale_grad and needs[4],
        )
    )
    # x and residual get the same grad (dL/dh) unless x's branch is transformed or the dtypes
    # differ: then the residual's is its own tensor.
    return (
        dx if needs[0] else None,
        (dx if dresidual_dtype is None else dresidual) if needs_residual else None,
        dweight if needs[2] else None,
        dbias if needs[3] else None,
        dcolscale if needs[4] else None,
    )


def _registered_setup_context(ctx, inputs, output):
    args = FwdArgs(*inputs)
    outputs = 2 if args.store_h else 1
    p = plan_of(args)
    call = _Call(None, p, args.eps, args.rms_norm, args.dropout_p, args.weight_offset, args.x.dtype, outputs)
    _save(ctx, args, call, output)
    ctx.set_materialize_grads(False)


# The registered forward's inputs after x, residual, weight, bias: eps .. store_mask, of which
# rowscale and colscale are tensors (colscale gets its grad from the formula).
_COLSCALE = spec.FWD.arg_names.index("colscale")


def _make_registered_backward(bwd_op):
    def backward(ctx, dy, dh, _dmean, _drstd, _dmask):
        n = ctx.needs_input_grad
        dx, dres, dw, db, dcs = _backward_with(bwd_op, ctx, (n[0], n[1], n[2], n[3], n[_COLSCALE]), dy, dh)
        grads = [dx, dres, dw, db] + [None] * (len(spec.FWD.args) - 4)
        grads[_COLSCALE] = dcs
        return tuple(grads)

    return backward


for _kernels in {k.fwd_op: k for k in _KERNELS.values()}.values():  # once per registered op
    torch.library.register_autograd(
        _kernels.fwd_op, _make_registered_backward(_kernels.bwd_op), setup_context=_registered_setup_context
    )


class _AddNormFunction(torch.autograd.Function):
    """The eager path: the backend's kernels called directly, forward and backward. apply takes
    the tensors (those that get grads first), the operator's arguments and the `_Call`."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, colscale, rowscale, seed_offset, args, call):
        kernels = call.kernels
        if plain(x, residual, weight, bias):
            output = kernels.fwd(*args)
        else:
            with below_autograd():
                output = kernels.fwd_op(*args)
        _save(ctx, args, call, output)
        y, h, _mean, _rstd, mask = output
        if args.store_mask:
            ctx.mark_non_differentiable(mask)
        ctx.set_materialize_grads(False)  # a grad for y or h alone: no zeros of the other's size
        if call.outputs == 1:
            return (y, mask) if args.store_mask else y
        return (y, h, mask) if args.store_mask else (y, h)

    @staticmethod
    def backward(ctx, dy, *rest):
        dh = rest[0] if ctx.call.outputs == 2 else None
        needs = ctx.needs_input_grad
        if plain(dy, dh):
            grads = _backward_with(ctx.call.kernels.bwd, ctx, needs, dy, dh)
        else:
            with below_autograd():
                grads = _backward_with(ctx.call.kernels.bwd_op, ctx, needs, dy, dh)
        return (*grads, None, None, None, None)


_apply = _AddNormFunction.apply


def as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as the row kernels read it: itself when contiguous or row-strided, else a contiguous copy
    (incoming grads may be expanded or transposed views)."""
    if t is None or t.is_contiguous() or _rows_readable(t):
        return t
    return t.contiguous()


# --- public API --------------------------------------------------------------------------------


class Features(NamedTuple):
    """The residual features of a call (fusedres/spec/add_norm.py), as the public keywords give
    them; None stands for all at their defaults."""

    dropout_p: float = 0.0
    rowscale: torch.Tensor | None = None
    colscale: torch.Tensor | None = None
    weight_offset: float = 0.0
    return_dropout_mask: bool = False


def add_norm(
    x,
    residual,
    weight,
    bias,
    eps,
    *,
    rms_norm: bool,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    dropout_p: float = 0.0,
    rowscale=None,
    colscale=None,
    weight_offset: float = 0.0,
    return_dropout_mask: bool = False,
):
    """LayerNorm (rms_norm=False) or RMSNorm (rms_norm=True) of h = residual + dropout(x) *
    rowscale * colscale over the last dimension. See add_layer_norm / add_rms_norm."""
    features = _features(dropout_p, rowscale, colscale, weight_offset, return_dropout_mask)
    return _add_norm(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, features)


def _features(dropout_p, rowscale, colscale, weight_offset, return_dropout_mask) -> Features | None:
    if dropout_p == 0.0 and rowscale is None and colscale is None and weight_offset == 0.0 and not return_dropout_mask:
        return None
    return Features(_as_float(dropout_p), rowscale, colscale, _as_float(weight_offset), return_dropout_mask)


# The C++ operators check every tensor argument themselves (shape, dtype, device, layout: what
# their memory safety needs), so in front of them the fast path checks only what they do not:
# eps (finite), and that weight and bias are vectors (the kernels accept any N contiguous
# elements, for the modules' multi-dim parameters). When an operator rejects its arguments, the
# spec's checks find the argument and raise the error every backend raises.
_SELF_CHECKING = frozenset(("cpu", "cuda"))
_INF = math.inf
# The eager call as one crossing into a C++ autograd node (csrc/fastpath/add_norm.cpp), where
# fusedres._fastpath loaded (built for this torch and CPython); else _run's Python Function.
_fastpath = FASTPATH.add_norm if FASTPATH is not None else None

has_fastpath, without_fastpath = fastpath_switch(globals())


def _add_norm(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, features=None, param_shape=None):
    """Checks the arguments and runs (a module normalizing several trailing dims passes its
    parameters' shape: they are then read as N contiguous elements)."""
    try:
        backend = resolve_backend(x.device)
        if (
            backend in _SELF_CHECKING
            and type(eps) is float
            and 0 < eps < _INF
            and param_shape is None
            and (weight is None or weight.dim() == 1)
            and (bias is None or bias.dim() == 1)
            and (features is None or _public_shapes_ok(x, features))
        ):
            if _fastpath is not None and not _is_compiling() and plain_tensors(x, residual, weight, bias):
                if features is None:
                    return _fastpath(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32)
                f = features
                return _fastpath(
                    x,
                    residual,
                    weight,
                    bias,
                    eps,
                    rms_norm,
                    prenorm,
                    residual_in_fp32,
                    f.dropout_p,
                    f.rowscale,
                    f.colscale,
                    f.weight_offset,
                    f.return_dropout_mask,
                    philox_seed_offset(x.device) if f.dropout_p > 0.0 else None,
                )
            return _run(backend, x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, features)
    except (RuntimeError, AttributeError, TypeError, IndexError) as error:
        failure = error
    else:
        eps = check_call(x, residual, weight, bias, eps, rms_norm, residual_in_fp32, features, param_shape)
        return _run(backend, x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, features)
    check_call(x, residual, weight, bias, eps, rms_norm, residual_in_fp32, features, param_shape)  # names it
    raise failure


def _public_shapes_ok(x, f: Features) -> bool:
    """What the operators cannot tell (they take any M / N contiguous elements): rowscale has
    x.shape[:-1], colscale is a vector; the dropout probability a float (pybind would take a bool)."""
    return (
        (f.rowscale is None or f.rowscale.shape == x.shape[:-1])
        and (f.colscale is None or f.colscale.dim() == 1)
        and type(f.dropout_p) is float
        and type(f.weight_offset) is float
    )


def check_call(x, residual, weight, bias, eps, rms_norm, residual_in_fp32, features, param_shape=None) -> float:
    """Validates a public call's arguments, as the operator's checks would see them after the
    public functions' own rules (parameter and scale shapes; any layout, as they copy what the
    kernels cannot read), and returns eps as a float."""
    f = features or _NO_FEATURES
    rowscale, colscale = f.rowscale, f.colscale
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        n = x.shape[-1]
        for name, t, shape in (
            ("weight", weight, param_shape or (n,)),
            ("bias", bias, param_shape or (n,)),
            ("colscale", colscale, (n,)),
            ("rowscale", rowscale, x.shape[:-1]),
        ):
            if isinstance(t, torch.Tensor) and t.shape != shape:
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    eps, dropout_p, weight_offset = _as_float(eps), _as_float(f.dropout_p), _as_float(f.weight_offset)
    _check_call(
        *FwdArgs(
            x,
            residual,
            _contiguous(weight),
            _contiguous(bias),
            eps,
            rms_norm,
            x.dtype if isinstance(x, torch.Tensor) else _F32,
            False,
            dropout_p,
            _standin_seed_offset(x.device) if dropout_p and isinstance(x, torch.Tensor) else None,
            _contiguous(rowscale),
            _contiguous(colscale),
            weight_offset,
            f.return_dropout_mask,
        )
    )
    if not isinstance(residual_in_fp32, bool):
        raise TypeError(f"residual_in_fp32 must be a bool, got {type(residual_in_fp32).__name__}")
    return eps


def _contiguous(t):
    return t.contiguous() if isinstance(t, torch.Tensor) and not t.is_contiguous() else t


def _as_float(v):
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


_STANDINS: dict[torch.device, torch.Tensor] = {}


def _standin_seed_offset(device) -> torch.Tensor:
    """A well-formed seed_offset for checking a call before its real one is drawn."""
    standin = _STANDINS.get(device)
    if standin is None:
        standin = _STANDINS[device] = torch.zeros(2, dtype=torch.int64, device=device)
    return standin


def _run(backend, x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, features=None):
    """add_norm on checked arguments (or ones a C++ operator checks)."""
    f = features or _NO_FEATURES
    if backend == "reference":
        return _run_reference(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, f)
    kernels = _KERNELS[backend]
    if residual is not None and not residual.is_contiguous():
        residual = as_rows(residual)
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
    if features is None:  # the common call: no feature tensor to look at, no RNG
        p = _plan(
            x.dtype,
            None if residual is None else residual.dtype,
            residual_in_fp32,
            prenorm,
            needs_grad,
            backend == "cpu",
            False,
            False,
        )
        rowscale = colscale = seed_offset = None
    else:
        rowscale, colscale = f.rowscale, f.colscale
        if rowscale is not None and not rowscale.is_contiguous():
            rowscale = rowscale.contiguous()
        if colscale is not None and not colscale.is_contiguous():
            colscale = colscale.contiguous()
        colscale_grad = colscale is not None and colscale.requires_grad
        needs_grad = needs_grad or (_grad_enabled() and colscale_grad)
        transforms_x = _transforms_x(f.dropout_p, rowscale, colscale)
        p = plan(x, residual, residual_in_fp32, prenorm, needs_grad, backend == "cpu", transforms_x, colscale_grad)
        seed_offset = philox_seed_offset(x.device) if f.dropout_p > 0.0 else None
    dropout_p = f.dropout_p
    store_mask = f.return_dropout_mask
    args = _fwd_args(
        (
            x,
            residual,
            weight,
            bias,
            eps,
            rms_norm,
            p.h_dtype,
            p.store_h,
            dropout_p,
            seed_offset,
            rowscale,
            colscale,
            f.weight_offset,
            store_mask,
        )
    )
    if _is_compiling():  # the registered operator, with its autograd formula
        y, h, _mean, _rstd, mask = kernels.fwd_op(*args)
    elif needs_grad:
        call = _Call(kernels, p, eps, rms_norm, dropout_p, f.weight_offset, x.dtype, 2 if prenorm else 1)
        return _apply(x, residual, weight, bias, colscale, rowscale, seed_offset, args, call)
    elif plain(x, residual, weight, bias):
        y, h, _mean, _rstd, mask = kernels.fwd(*args)
    else:
        with below_autograd():
            y, h, _mean, _rstd, mask = kernels.fwd_op(*args)
    out = (y, h) if prenorm else (y,)
    if store_mask:
        out = (*out, mask)
    return out if len(out) > 1 else y


_NO_FEATURES = Features()
# FwdArgs from a tuple without the namedtuple's Python-level __new__ (half a microsecond a call)
_fwd_args = functools.partial(tuple.__new__, FwdArgs)


def _run_reference(x, residual, weight, bias, eps, rms_norm, prenorm, residual_in_fp32, f: Features):
    if weight is not None and weight.dim() != 1:  # a module's multi-dim parameters
        weight, bias = weight.reshape(-1), bias.reshape(-1) if bias is not None else None
    mask = None
    if f.dropout_p > 0.0:
        mask = dropout_mask_reference(x.shape, f.dropout_p, philox_seed_offset(x.device))
    elif f.return_dropout_mask:
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    rowscale = f.rowscale
    out = add_norm_reference(
        x,
        residual,
        weight,
        bias,
        eps,
        rms_norm=rms_norm,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        dropout_p=f.dropout_p,
        dropout_mask=mask if f.dropout_p > 0.0 else None,
        rowscale=rowscale,
        colscale=f.colscale,
        weight_offset=f.weight_offset,
    )
    if f.return_dropout_mask:
        return (*out, mask) if prenorm else (out, mask)
    return out


def add_layer_norm(
    x,
    residual=None,
    weight=None,
    bias=None,
    eps=1e-5,
    *,
    prenorm=False,
    residual_in_fp32=False,
    dropout_p=0.0,
    rowscale=None,
    colscale=None,
    weight_offset=0.0,
    return_dropout_mask=False,
):
    """``F.layer_norm(residual + dropout(x) * rowscale * colscale, (N,), weight + weight_offset,
    bias, eps)`` in one pass over memory.

    Fuses ``h = x + residual; y = F.layer_norm(h, (N,), weight, bias, eps)``: BERT's
    ``LayerNorm(dropout(dense(h)) + input)`` (post-norm), or with ``prenorm=True`` the
    ``residual = x + residual; hidden = norm(residual)`` step of a pre-norm block (GPT-2).

    Args:
        x: (..., N) activations, float32 / float64 / float16 / bfloat16: the branch added to the
            residual stream.
        residual: x's shape, or None (plain LayerNorm). Any float dtype: h is formed in fp32 and
            rounded to residual's dtype (x's when None; float32 with ``residual_in_fp32=True``),
            as eager ``(x + residual)`` would be.
        weight, bias: (N,) or None.
        eps: added to the variance, > 0.
        prenorm: also return h, the next block's residual.
        residual_in_fp32: keep h in float32 (a low-precision model with an fp32 residual stream).
        dropout_p: zero each element of x with this probability, scale the kept ones by
            1 / (1 - p) (the residual's dropout; the mask is regenerated in the backward, not
            stored). Random numbers: counter-based Philox drawn from torch's default generator for
            x's device, so ``torch.manual_seed`` reproduces a call.
        rowscale: x.shape[:-1], or None: a per-row scale of x's branch (drop path / stochastic
            depth, per sample); no grad.
        colscale: (N,) or None: a per-channel scale of x's branch (LayerScale's gamma); with grad.
        weight_offset: added to weight in fp32 (Gemma's ``(1 + w)``); needs a weight.
        return_dropout_mask: also return the bool keep-mask (x's shape, True = kept), last.

    Shape:
        x, residual, y, h: (..., N). Any leading shape; strided rows are read in place.

    Returns:
        y (x's dtype); (y, h) with ``prenorm=True``; the mask appended with
        ``return_dropout_mask=True``.

    Example::

        >>> x, r = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
        >>> y = fusedres.add_layer_norm(x, r, torch.ones(64), torch.zeros(64))
        >>> torch.allclose(y, F.layer_norm(x + r, (64,)), atol=1e-5)
        True
    """
    features = _features(dropout_p, rowscale, colscale, weight_offset, return_dropout_mask)
    return _add_norm(x, residual, weight, bias, eps, False, prenorm, residual_in_fp32, features)


def add_rms_norm(
    x,
    residual=None,
    weight=None,
    eps=1e-6,
    *,
    prenorm=False,
    residual_in_fp32=False,
    dropout_p=0.0,
    rowscale=None,
    colscale=None,
    weight_offset=0.0,
    return_dropout_mask=False,
):
    """``F.rms_norm(residual + dropout(x) * rowscale * colscale, (N,), weight + weight_offset,
    eps)`` in one pass over memory.

    Fuses Llama / Mistral / Qwen2's ``hidden = residual + attn_out; residual = hidden;
    hidden = rms_norm(hidden)`` (``prenorm=True``), or ``rms_norm(x + residual)``; Gemma's
    ``(1 + w)`` with ``weight_offset=1.0``.

    Args:
        x: (..., N) activations, float32 / float64 / float16 / bfloat16.
        residual: x's shape, or None. h is formed in fp32 and rounded to residual's dtype (x's
            when None; float32 with ``residual_in_fp32=True``).
        weight: (N,) or None.
        eps: added to the mean square, > 0.
        prenorm: also return h, the next block's residual.
        residual_in_fp32: keep h in float32.
        dropout_p, rowscale, colscale, weight_offset, return_dropout_mask: as add_layer_norm.

    Shape:
        x, residual, y, h: (..., N).

    Returns:
        y (x's dtype); (y, h) with ``prenorm=True``; the mask appended with
        ``return_dropout_mask=True``.

    Example::

        >>> x, r = torch.randn(4, 128), torch.randn(4, 128)
        >>> y, h = fusedres.add_rms_norm(x, r, torch.ones(128), prenorm=True)
        >>> torch.allclose(y, F.rms_norm(x + r, (128,), eps=1e-6), atol=1e-5)
        True
    """
    features = _features(dropout_p, rowscale, colscale, weight_offset, return_dropout_mask)
    return _add_norm(x, residual, weight, None, eps, True, prenorm, residual_in_fp32, features)


# --- in place, for inference -------------------------------------------------------------------


def add_norm_(x, residual, weight, bias, eps, *, rms_norm: bool, colscale=None, weight_offset: float = 0.0):
    """Add & Norm in place: residual <- h = residual + x * colscale, x <- y = norm(h) * (weight +
    weight_offset) + bias. See add_layer_norm_ / add_rms_norm_."""
    if _grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, residual, weight, bias, colscale)
    ):
        raise RuntimeError(
            "fusedres: the in-place Add & Norm keeps nothing for a backward: call it under torch.no_grad() "
            "or torch.inference_mode(), or use add_layer_norm / add_rms_norm with prenorm=True"
        )
    args = InplaceArgs(x, residual, weight, bias, _as_float(eps), rms_norm, colscale, _as_float(weight_offset))
    check_inplace_args(*args)
    backend = resolve_backend(x.device)
    if backend == "reference":
        _inplace_reference(args)
    else:
        _KERNELS[backend].inplace_op(*args)


def _inplace_reference(a) -> None:
    y, h = add_norm_reference(
        a.x,
        a.residual,
        a.weight,
        a.bias,
        a.eps,
        rms_norm=a.rms_norm,
        prenorm=True,
        colscale=a.colscale,
        weight_offset=a.weight_offset,
    )
    a.residual.copy_(h)
    a.x.copy_(y)


def add_layer_norm_(x, residual, weight=None, bias=None, eps=1e-5, *, colscale=None, weight_offset=0.0):
    """In place, for inference: ``residual`` becomes h = residual + x * colscale and ``x`` becomes
    ``F.layer_norm(h, (N,), weight + weight_offset, bias, eps)``, allocating nothing (a pre-norm
    stack threads (x, residual) from layer to layer, as vLLM's fused_add_rms_norm does).

    x and residual must be contiguous, must not overlap, and must not require grad (nothing is
    kept for a backward); h keeps residual's dtype, y x's."""
    add_norm_(x, residual, weight, bias, eps, rms_norm=False, colscale=colscale, weight_offset=weight_offset)


def add_rms_norm_(x, residual, weight=None, eps=1e-6, *, colscale=None, weight_offset=0.0):
    """In place, for inference: ``residual`` becomes h = residual + x * colscale and ``x`` becomes
    ``F.rms_norm(h, (N,), weight + weight_offset, eps)`` (vLLM's fused_add_rms_norm). See
    add_layer_norm_."""
    add_norm_(x, residual, weight, None, eps, rms_norm=True, colscale=colscale, weight_offset=weight_offset)
