"""What Python derives from the spec: argument checks and output allocation.

`checker(op)` compiles, once per operator, a function that validates that operator's arguments:
the common case is one boolean expression built from the arguments' kinds (each helper call would
cost ~0.1 us on the hot path); only when it fails do the kinds' detailed checks run, to raise a
TypeError or ValueError that names the argument. `allocate(op, args, empty)` allocates an
operator's outputs as the spec declares them: the fake kernels pass meta tensors' `new_empty`,
the Triton launchers `torch.empty`.
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable

import torch

from . import REQUIRED, Elements, Op, Rows, _disjoint, _rows_readable

_FLOAT = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))
_GLOBALS = {
    "_FLOAT": _FLOAT,
    "_INT64": torch.int64,
    "_F64": torch.float64,
    "_F32": torch.float32,
    "_INF": math.inf,
    "_rows_readable": _rows_readable,
    "_disjoint": _disjoint,
}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The statistics / accumulation dtype: float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ok_expression(op: Op, layout: bool) -> str:
    terms = []
    for arg in op.args:
        ok = arg.kind.py_ok(arg.name)
        if not layout and isinstance(arg.kind, Rows):
            ok = ok.replace(f" and ({arg.name}.is_contiguous() or _rows_readable({arg.name}))", "")
        terms.append(f"({arg.name} is None or ({ok}))" if arg.optional else f"({ok})")
    terms += [f"({rule.py})" for rule in op.rules]
    return "\n            and ".join(terms)


def checker(op: Op, layout: bool = True) -> Callable[..., None]:
    """check(*args): returns None when `op` accepts args, else raises naming the argument.
    layout=False leaves out the in-place readability of row operands (public functions copy
    what the kernels cannot read)."""
    key = ("check", layout)
    if key in op._compiled:
        return op._compiled[key]
    params = ", ".join(op.arg_names)
    anchor = op.anchor
    needs_rows = any(isinstance(a.kind, Elements) for a in op.args)
    rows = f"\n        _M = {anchor}.numel() // _N" if needs_rows else ""
    source = f"""
def check_{op.name}({params}):
    try:
        _dev = {anchor}.device
        _N = {anchor}.shape[-1]{rows}
        _stats = _F64 if {anchor}.dtype is _F64 else _F32
        if (
            {_ok_expression(op, layout)}
        ):
            return
    except (AttributeError, IndexError, TypeError, ZeroDivisionError, RuntimeError):
        pass
    _explain(({params},))
"""
    scope = dict(_GLOBALS, _explain=lambda args: explain(op, args, layout))
    exec(compile(source, f"<fusedres.spec: check {op.name}>", "exec"), scope)  # noqa: S102 (our own text)
    check = scope[f"check_{op.name}"]
    op._compiled[key] = check
    return check


def explain(op: Op, args: tuple, layout: bool = True) -> None:
    """The detailed checks: raises a TypeError / ValueError naming the first bad argument."""
    if len(args) != len(op.args):
        raise TypeError(f"{op.name} takes {len(op.args)} arguments, got {len(args)}")
    ctx = dict(zip(op.arg_names, args), _anchor=op.anchor, _layout=layout)
    for arg, value in zip(op.args, args):
        if value is None:
            if not arg.optional:
                raise TypeError(f"{arg.name} must not be None")
            continue
        arg.kind.py_check(arg.name, value, ctx)
        if arg.name == op.anchor:
            n = value.shape[-1]
            ctx.update(_N=n, _M=value.numel() // n, _stats=stats_dtype(value.dtype))
    for rule in op.rules:
        if not eval(rule.py, _GLOBALS, ctx):  # noqa: S307 (our own text)
            raise {"TypeError": TypeError, "ValueError": ValueError}[rule.error](rule.message)


def arguments(op: Op) -> type:
    """The operator's arguments as a NamedTuple class, fields in schema order, the spec's defaults
    for the trailing ones: every Python caller builds its calls with it (`Args(x=..., ...)`, then
    `kernel(*args)`), so the order lives in the spec alone."""
    if "args" not in op._compiled:
        defaults = [a.default for a in op.args if a.default != REQUIRED]
        first_default = len(op.args) - len(defaults)
        assert all(a.default != REQUIRED for a in op.args[first_default:]), f"{op.name}: defaults must be trailing"
        op._compiled["args"] = namedtuple(f"{op.cpp_name}Args", op.arg_names, defaults=defaults)
    return op._compiled["args"]


# --- outputs ---------------------------------------------------------------------------------


def allocate(op: Op, args: tuple, empty: Callable[..., torch.Tensor]) -> tuple:
    """op's outputs for args, as its spec declares them, from empty(shape, dtype, like) (a
    contiguous tensor) or empty(shape, dtype, like, strides)."""
    ctx = dict(zip(op.arg_names, args))
    anchor = ctx[op.args[0].name]
    outputs = []
    for out in op.outputs:
        dtype = _dtype(out.dtype, ctx, anchor)
        written = _written(out.when, ctx)
        kind, _, name = out.shape.partition(":")
        if not written or (kind == "elements" and ctx[name] is None):
            outputs.append(empty((0,), dtype, anchor))
        elif kind == "like":
            outputs.append(empty(tuple(ctx[name].shape), dtype, anchor))
        elif kind == "strided":
            outputs.append(empty(tuple(ctx[name].shape), dtype, anchor, ctx[name].stride()))
        elif kind == "elements":
            outputs.append(empty(tuple(ctx[name].shape), dtype, anchor))
        elif kind == "rows":
            n = anchor.shape[-1]
            outputs.append(empty((anchor.numel() // n,), dtype, anchor))
        elif kind == "channels":
            outputs.append(empty((ctx[name].shape[1],), dtype, anchor))
        elif kind == "matrix":
            rows, cols = name.split(",")
            outputs.append(empty((ctx[rows], ctx[cols]), dtype, anchor))
        elif kind == "combined":
            outputs.append(empty(((ctx[name].shape[1] - 1) // 2,), dtype, anchor))
        else:
            raise AssertionError(f"unknown output shape {out.shape!r} of {op.name}")
    if not outputs:
        return None  # an operator that only writes its arguments
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _written(when: str, ctx: dict) -> bool:
    if not when:
        return True
    negate = when.startswith("not ")
    value = ctx[when[4:] if negate else when]
    present = value is not None and value is not False
    return not present if negate else present


def _dtype(spec: str, ctx: dict, anchor) -> torch.dtype:
    if spec == "stats":
        return stats_dtype(anchor.dtype)
    if spec == "bool":
        return torch.bool
    kind, _, name = spec.partition(":")
    value = ctx[name]
    if kind == "of":
        return anchor.dtype if value is None else value.dtype
    return anchor.dtype if value is None else value  # "arg:": a ScalarType argument


def empty_like_device(shape, dtype, like, strides=None) -> torch.Tensor:
    """`allocate`'s `empty` for real and fake tensors alike: on like's device."""
    if strides is None:
        return like.new_empty(shape, dtype=dtype)
    return like.new_empty_strided(shape, strides, dtype=dtype)
