"""The operator spec: every fusedres operator's arguments and outputs, declared once.

Each op family has one file here (add_norm.py, batch_norm.py) that lists its operators as `Op`s:
the arguments in order, each with a *kind* that says what a valid value is, and the outputs with
their shapes and dtypes. Everything that used to spell an operator's signature out is derived:

- the ``torch.library`` schema (`Op.schema`): csrc/ops.cpp defines the C++ operators from a
  header that setup.py generates from this package (fusedres/spec/cpp.py), and the Triton
  operators register the same text (fusedres/triton);
- the C++ side of that header: a struct of named arguments per operator, the boxed entry point
  that builds it for each backend's kernel, the typed dispatcher call (csrc/fastpath), the dtype
  codes, and the memory-safety checks (each kind's C++ check);
- the Python argument checks (`Op.check`): one fast expression for the common case, compiled
  once from the kinds, and the detailed checks that name the argument only once it fails;
- the fake kernels (`Op.fake_outputs`), from the outputs' declared shapes and dtypes.

This package imports nothing but the standard library at module level: setup.py loads it by
path, before fusedres (or even torch) is importable, to generate the C++ header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# One dtype code per supported float dtype, shared by every backend (C++ enum DtypeCode, the
# Triton kernels' constexprs).
DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


# --- kinds: what a valid argument is ---------------------------------------------------------
# Each kind renders its schema type, a Python expression true for valid values (the fast check;
# `{a}` is the argument, `_dev`, `_N`, `_M` and `_stats` the anchor's device, normalized size, row
# count and statistics dtype), a detailed Python check that raises naming the argument, and a
# C++ statement for the operators' own memory-safety checks.


@dataclass(frozen=True)
class Kind:
    schema_type = ""
    # A tensor kind reads the anchor's device / sizes; scalar kinds do not.
    needs_rows = False

    def py_ok(self, a: str) -> str:
        raise NotImplementedError

    def py_check(self, name: str, value, ctx: dict) -> None:
        raise NotImplementedError

    def cpp_check(self, v: str, name: str, anchor: str) -> str:
        """A C++ statement checking value expression v (an optional argument: its value) of argument
        `name`; `anchor` is the anchor argument's expression, `shape` the RowsView it set."""
        raise NotImplementedError


@dataclass(frozen=True)
class Rows(Kind):
    """A (..., N) float tensor that the row kernels read in place: unit stride along N and leading
    dims that collapse into rows of one stride. The first Rows argument without `like` is the
    op's anchor: it defines N, the M rows, the device and the statistics dtype; `like` names the
    argument whose shape and device this one must have."""

    like: str | None = None
    schema_type = "Tensor"

    def py_ok(self, a):
        base = f"{a}.dtype in _FLOAT and ({a}.is_contiguous() or _rows_readable({a}))"
        if self.like is None:
            return f"{base} and {a}.dim() >= 1 and {a}.shape[-1] > 0"
        return f"{base} and {a}.shape == {self.like}.shape and {a}.device == _dev"

    def py_check(self, name, t, ctx):
        _float_tensor(name, t)
        if self.like is None:
            if t.dim() < 1:
                raise ValueError(f"{name} must have at least one dimension (the normalized one)")
            if t.shape[-1] == 0:
                raise ValueError(
                    f"the normalized (last) dimension of {name} must not be empty, got {name} of shape {tuple(t.shape)}"
                )
        else:
            like = ctx[self.like]
            if t.shape != like.shape:
                raise ValueError(f"{name} must have {self.like}'s shape {tuple(like.shape)}, got {tuple(t.shape)}")
            _same_device(name, t, self.like, like)
        if ctx.get("_layout", True) and not _rows_readable(t):
            raise ValueError(
                f"{name} must have unit stride along its last dim and rows of one stride (make it contiguous)"
            )

    def cpp_check(self, v, name, anchor):
        if self.like is None:
            return f'shape = check_anchor_rows({v}, "{name}");'
        return f'check_rows_like({v}, "{name}", a.{self.like}, "{self.like}", shape);'


@dataclass(frozen=True)
class Elements(Kind):
    """`count` ("N": the normalized size, "M": the rows) contiguous float elements of any shape on
    the anchor's device: weights and per-row or per-column scales. `stats`: of the statistics
    dtype (the forward's mean and rstd)."""

    count: str = "N"
    stats: bool = False
    schema_type = "Tensor"
    needs_rows = True

    def py_ok(self, a):
        dtype = f"{a}.dtype == _stats" if self.stats else f"{a}.dtype in _FLOAT"
        return f"{dtype} and {a}.numel() == _{self.count} and {a}.is_contiguous() and {a}.device == _dev"

    def py_check(self, name, t, ctx):
        n = ctx["_" + self.count]
        what = {"N": "the normalized size", "M": "the number of rows"}[self.count]
        if self.stats:
            if not (_is_tensor(t) and t.dtype == ctx["_stats"]):
                raise TypeError(f"{name} must be a {ctx['_stats']} tensor (the statistics dtype), got {_describe(t)}")
        else:
            _float_tensor(name, t)
        if t.numel() != n or not t.is_contiguous():
            raise ValueError(f"{name} must have {n} contiguous elements ({what}), got shape {tuple(t.shape)}")
        _same_device(name, t, ctx["_anchor"], ctx[ctx["_anchor"]])

    def cpp_check(self, v, name, anchor):
        count = "shape.cols" if self.count == "N" else "shape.rows"
        return f'check_elements({v}, "{name}", {anchor}, {count}, {"true" if self.stats else "false"});'


@dataclass(frozen=True)
class SeedOffset(Kind):
    """The dropout RNG state: a contiguous (2,) int64 tensor (seed, offset) on the anchor's device
    (the kernels read it there: no host sync, capture-safe)."""

    schema_type = "Tensor"

    def py_ok(self, a):
        return f"{a}.dtype == _INT64 and {a}.shape == (2,) and {a}.is_contiguous() and {a}.device == _dev"

    def py_check(self, name, t, ctx):
        if not _is_tensor(t) or t.dtype != _torch().int64 or tuple(t.shape) != (2,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous (2,) int64 tensor (seed, offset), got {_describe(t)}")
        _same_device(name, t, ctx["_anchor"], ctx[ctx["_anchor"]])

    def cpp_check(self, v, name, anchor):
        return f'check_seed_offset({v}, "{name}", {anchor});'


@dataclass(frozen=True)
class Real(Kind):
    """A float. `low`/`high` bound it (`low_open`: excluded); finite unless bounds say otherwise."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    what: str = "a finite number"
    schema_type = "float"

    def _bounds(self, v: str) -> str:
        lo = f"{v} {'>' if self.low_open else '>='} {self.low!r}" if self.low != -math.inf else f"{v} > -_INF"
        hi = f"{v} {'<' if self.high_open else '<='} {self.high!r}" if self.high != math.inf else f"{v} < _INF"
        return f"{lo} and {hi}"

    def py_ok(self, a):
        return f"type({a}) is float and {self._bounds(a)}"

    def py_check(self, name, v, ctx):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        v = float(v)
        if not eval(self._bounds("v"), {"_INF": math.inf}, {"v": v}):  # noqa: S307 (our own text)
            raise ValueError(f"{name} must be {self.what}, got {v}")

    def cpp_check(self, v, name, anchor):
        bounds = self._bounds(v).replace("_INF", "kInf").replace(" and ", " && ")
        return f'STD_TORCH_CHECK({bounds}, "fusedres: {name} must be {self.what}, got ", {v});'


@dataclass(frozen=True)
class Flag(Kind):
    schema_type = "bool"

    def py_ok(self, a):
        return f"{a}.__class__ is bool"

    def py_check(self, name, v, ctx):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")

    def cpp_check(self, v, name, anchor):
        return ""


@dataclass(frozen=True)
class Count(Kind):
    schema_type = "int"

    def py_ok(self, a):
        return f"{a}.__class__ is int and {a} >= 0"

    def py_check(self, name, v, ctx):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")

    def cpp_check(self, v, name, anchor):
        return f'STD_TORCH_CHECK({v} >= 0, "fusedres: {name} must be >= 0, got ", {v});'


@dataclass(frozen=True)
class FloatDtype(Kind):
    schema_type = "ScalarType"

    def py_ok(self, a):
        return f"{a} in _FLOAT"

    def py_check(self, name, v, ctx):
        if v not in _float_dtypes():
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {v}")

    def cpp_check(self, v, name, anchor):
        return f'check_float_dtype({v}, "{name}");'


@dataclass(frozen=True)
class Opaque(Kind):
    """An argument whose checks live with the family's C++ and Python code (BatchNorm's
    layouts): the spec gives its schema type only."""

    schema_type_: str = "Tensor"
    needs_rows = False

    @property
    def schema_type(self):  # type: ignore[override]
        return self.schema_type_

    def py_ok(self, a):
        return "True"

    def py_check(self, name, v, ctx):
        return None

    def cpp_check(self, v, name, anchor):
        return ""


# --- arguments, outputs, operators -----------------------------------------------------------


REQUIRED = "<required>"


@dataclass(frozen=True)
class Arg:
    name: str
    kind: Kind
    optional: bool = False
    mutable: str = ""  # alias set ("a") of an argument written in place: Tensor(a!)
    doc: str = ""
    # The value a caller that does not name it gets (`Op.bind`); the schema has no defaults: the
    # kernels are always called with every argument.
    default: object = REQUIRED

    @property
    def schema(self) -> str:
        base = self.kind.schema_type
        if self.mutable:
            base += f"({self.mutable}!)"
        return f"{base}{'?' if self.optional else ''} {self.name}"

    @property
    def is_tensor(self) -> bool:
        return self.kind.schema_type == "Tensor"


@dataclass(frozen=True)
class Out:
    """An output (fusedres/spec/python.py allocates them for the fake kernels and the Triton
    launchers; csrc/ allocates its own). shape: "like:<arg>" (that argument's shape, contiguous),
    "strided:<arg>" (its shape and strides), "rows" ((M,)), "elements:<arg>" (that argument's
    shape, contiguous; (0,) when it is None), "channels:<arg>" ((C,) of an (N, C, *) argument),
    "combined:<arg>" ((C,) of a (W, 2C + 1) statistics table), "matrix:<a>,<b>" ((a, b) of two int
    arguments). dtype: "of:<arg>" (a tensor
    argument's dtype; the anchor's when it is None), "arg:<arg>" (a ScalarType argument),
    "stats" (fp64 for an fp64 first argument, else fp32), "bool". when: the argument (a bool, or
    an optional one: "given") under which the output is written, "not <arg>" for the reverse;
    an output not written is an empty (0,) tensor of its dtype."""

    name: str
    shape: str
    dtype: str
    when: str = ""
    doc: str = ""


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[Arg, ...]
    outputs: tuple[Out, ...]
    doc: str = ""
    rules: tuple[Rule, ...] = ()
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def anchor(self) -> str:
        return next(a.name for a in self.args if isinstance(a.kind, Rows) and a.kind.like is None)

    def schema(self, name: str | None = None) -> str:
        """The torch.library schema, e.g. "add_norm_fwd(Tensor x, ...) -> (Tensor y, ...)"."""
        returns = ", ".join(f"Tensor {o.name}" for o in self.outputs)
        if len(self.outputs) != 1:
            returns = f"({returns})"
        return f"{name or self.name}({', '.join(a.schema for a in self.args)}) -> {returns}"

    @property
    def cpp_name(self) -> str:
        """The generated C++ declarations' stem: add_norm_fwd -> AddNormFwd."""
        return "".join(part.capitalize() for part in self.name.split("_"))


@dataclass(frozen=True)
class Rule:
    """A condition across arguments, in both languages (each reads the arguments by name; in C++
    an optional tensor is a std::optional), and the error it raises."""

    py: str
    cpp: str
    message: str
    error: str = "ValueError"


@dataclass(frozen=True)
class Family:
    """An op family: its operators, and the C++ name prefix of its generated declarations."""

    name: str
    ops: tuple[Op, ...]

    def op(self, name: str) -> Op:
        return next(o for o in self.ops if o.name == name)


# --- helpers for the detailed checks (torch imported lazily: setup.py loads this without it) ---


def _torch():
    import torch

    return torch


def _float_dtypes():
    torch = _torch()
    return (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _is_tensor(t) -> bool:
    return isinstance(t, _torch().Tensor)


def _describe(t) -> str:
    return f"{t.dtype}{tuple(t.shape)}" if _is_tensor(t) else type(t).__name__


def _float_tensor(name: str, t) -> None:
    if not _is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _float_dtypes():
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _same_device(name: str, t, ref_name: str, ref) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _disjoint(a, b) -> bool:
    """Whether two contiguous tensors' memory does not overlap (the C++ `disjoint` checks the same;
    fake and meta tensors have no memory to compare: the real call is checked)."""
    from torch._subclasses.fake_tensor import is_fake

    if a.device != b.device or a.device.type == "meta" or is_fake(a) or is_fake(b):
        return True
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 + a.numel() * a.element_size() <= b0 or b0 + b.numel() * b.element_size() <= a0


def _rows_readable(t) -> bool:
    """Whether the row kernels can read (..., N) tensor t in place: unit stride along N and leading
    dims that collapse into rows of one stride (the C++ check_anchor_rows checks the same)."""
    if t.dim() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    expected = None
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size <= 1:
            continue
        if stride < 0 or (expected is not None and stride != expected):
            return False
        expected = stride * size
    return True
