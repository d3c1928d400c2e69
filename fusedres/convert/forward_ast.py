"""Reads a block's forward (its source, as an AST) to find where a residual add feeds a norm, and
writes the fused forward.

Why the source and not a trace: a transformer layer's forward takes masks, position embeddings,
caches and family-specific keywords, so tracing it needs inputs that differ per family; the source
shows the data flow between names exactly as written, needs no inputs, and everything the fused
forward does not touch (attention calls, caches, MoE routing, hooks, decorators) stays the
library's own code, line for line. transformers generates dozens of families from one modular
source, so one reading of `residual = h; h = norm(h); ...; h = residual + h` covers all of them.

What counts as a site, on one straight path through the forward (statements in order):
- inline: ``self.N(a + b)``;
- stepwise: ``v = a + b`` and, later, a statement that calls ``self.N(u)`` where u is v, an alias
  of it (``residual = v``) or a view of it (``v.reshape(...)``), with only aliases, views and
  statements that read v's metadata (shape, dtype) in between. The sum is kept (``prenorm``)
  when anything reads it afterwards.
An ``if`` between the add and its norm whose test does not depend on the sum is handled by
duplicating the add, and the statements after the ``if``, into both branches (OPT's
``do_layer_norm_before``, GPT-2's and Whisper's optional cross-attention), so each branch is a
straight path again.
N is one of the names `is_norm` accepts (the caller probes the modules, see probe.py). The branch
operand's wrappers (``self.drop_path(self.ls(x))``, ``F.dropout(x, p, training)``,
``x * self.residual_multiplier``), inline or in the statements just before the add, are peeled off
and handed to the site, which applies them or folds them into the fused call.

Each site becomes ``y, v = _fusedres_site(self, k, x, residual, *dynamic)`` (or ``y = ...``) and
the norm call becomes ``y``. An add whose result the forward returns (an exit, possibly through a
view or in a tuple) becomes ``_fusedres_exit(self, e, x, residual, *dynamic)``: carry.py may fuse
it into the next block's first norm. The first norm applied to the block's input is its entry.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

SITE, EXIT, VIEW = "_fusedres_site", "_fusedres_exit", "_fusedres_view"

_METADATA_ATTRS = frozenset(("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"))
_METADATA_CALLS = frozenset(("size", "dim", "numel", "is_contiguous", "get_device"))
_VIEW_METHODS = frozenset(("view", "reshape", "flatten", "view_as", "reshape_as"))
_DROPOUT_FUNCTIONS = frozenset(
    ("nn.functional.dropout", "F.dropout", "torch.nn.functional.dropout", "functional.dropout")
)
_MAX_GROWTH = 8  # a forward may grow this many times over by the duplication around ifs


@dataclass(frozen=True)
class Wrapper:
    """One op on the branch before the add: ("module", attr) calls self.attr; ("dropout", None)
    is F.dropout with (p, training) among the dynamic arguments; ("scale", attr) multiplies by
    the number self.attr."""

    kind: str
    attr: str | None = None


@dataclass(frozen=True)
class SiteTemplate:
    index: int
    norm: str | None  # None for an exit: the norm is the next block's
    wrappers: tuple[Wrapper, ...]  # outermost first
    prenorm: bool
    text: str  # the add and its norm, as written
    sources: frozenset[str] = frozenset()  # x in the `self.x(...)` calls that made the operands
    flags: tuple[tuple[str, bool], ...] = ()  # (x, v): only on the path where bool(self.x) is v


@dataclass
class Plan:
    function: ast.FunctionDef  # the fused forward
    sites: list[SiteTemplate] = field(default_factory=list)
    exits: list[SiteTemplate] = field(default_factory=list)
    entry: str | None = None  # the norm first applied to the block's input
    entry_flags: tuple[tuple[str, bool], ...] = ()
    missed: list[str] = field(default_factory=list)  # add -> norm flows left alone, and why


@dataclass(frozen=True)
class Names:
    """What the caller found on the instance: its norm and wrapper submodules, its numeric
    attributes (scales)."""

    norms: frozenset[str]
    wrappers: frozenset[str]
    scalars: frozenset[str]


def self_attr(node: ast.AST) -> str | None:
    """'x' for ``self.x``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def self_calls(fn: ast.FunctionDef) -> set[str]:
    """Every x in a ``self.x(...)`` call of the function."""
    return {a for node in ast.walk(fn) if isinstance(node, ast.Call) and (a := self_attr(node.func))}


def _post_order(node: ast.AST):
    """Nodes in (roughly) evaluation order: children before their parent, left to right."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        yield from _post_order(child)
    yield node


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in _post_order(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _stores(stmt: ast.stmt) -> set[str]:
    return {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _reads_beyond_metadata(node: ast.AST, names: set[str], skip: ast.AST | None = None) -> bool:
    """Whether `node` reads any of `names` other than for metadata (x.shape, x.size(-1)), not
    counting inside `skip`."""
    parents: dict[ast.AST, ast.AST] = {}
    for parent in ast.walk(node):
        for child in ast.iter_child_nodes(parent):
            parents[child] = parent
    for n in ast.walk(node):
        if not (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in names):
            continue
        p, inside_skip = n, False
        while p in parents:
            if p is skip:
                inside_skip = True
                break
            p = parents[p]
        if inside_skip:
            continue
        parent = parents.get(n)
        if isinstance(parent, ast.Attribute) and parent.attr in _METADATA_ATTRS:
            continue
        if isinstance(parent, ast.Attribute) and parent.attr in _METADATA_CALLS:
            grand = parents.get(parent)
            if isinstance(grand, ast.Call) and grand.func is parent:
                continue
        return True
    return False


def _is_simple(stmt: ast.stmt) -> bool:
    return isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.Expr, ast.Return))


def _sum_assignment(stmt: ast.stmt) -> tuple[str, ast.BinOp] | None:
    if (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
        and isinstance(stmt.value, ast.BinOp)
        and isinstance(stmt.value.op, ast.Add)
    ):
        return stmt.targets[0].id, stmt.value
    return None


def _alias(stmt: ast.stmt) -> tuple[str, str] | None:
    if (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
        and isinstance(stmt.value, ast.Name)
    ):
        return stmt.targets[0].id, stmt.value.id
    return None


def _view_of(value: ast.AST) -> ast.AST | None:
    """x for ``x.reshape(...)`` / ``x.view(...)`` and the like."""
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in _VIEW_METHODS
        and not value.keywords
    ):
        return value.func.value
    return None


def _size(node: ast.AST) -> int:
    return sum(1 for _ in ast.walk(node))


class _Rewriter:
    def __init__(self, fn: ast.FunctionDef, names: Names):
        self.fn = fn
        self.names = names
        self.plan = Plan(fn)
        self.budget = _MAX_GROWTH * _size(fn)
        self.flags: list[tuple[str, bool]] = []  # the flag tests (``if self.x:``) around the current statement

    # --- the branch of an add and the ops peeled off it ---------------------------------------

    def _peel(self, expr: ast.expr, target: str | None, out: list[ast.stmt], free: frozenset = frozenset()):
        """(inner expression, wrappers outermost first, dynamic argument expressions). `free`:
        names besides `target` whose wrapper statement just before may be taken (nothing reads
        their value after the add)."""
        wrappers, dynamic = [], []
        while True:
            if isinstance(expr, ast.Call) and len(expr.args) == 1 and not expr.keywords:
                attr = self_attr(expr.func)
                if attr in self.names.wrappers:
                    wrappers.append(Wrapper("module", attr))
                    expr = expr.args[0]
                    continue
            if isinstance(expr, ast.Call) and ast.unparse(expr.func) in _DROPOUT_FUNCTIONS:
                args = _dropout_args(expr)
                if args is not None:
                    wrappers.append(Wrapper("dropout"))
                    expr, p, training = args
                    dynamic += [p, training]
                    continue
            if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mult):
                attr = self_attr(expr.right)
                if attr in self.names.scalars:
                    wrappers.append(Wrapper("scale", attr))
                    expr = expr.left
                    continue
            # `b = wrapper(b)` just before `b = b + residual`: part of the same branch.
            if isinstance(expr, ast.Name) and (expr.id == target or expr.id in free) and out:
                prev = out[-1]
                if (
                    isinstance(prev, ast.Assign)
                    and len(prev.targets) == 1
                    and isinstance(prev.targets[0], ast.Name)
                    and prev.targets[0].id == expr.id
                    and self._peelable(prev.value)
                ):
                    out.pop()
                    expr = prev.value
                    continue
            return expr, tuple(wrappers), dynamic

    def _wrapper_assignment(self, prev: ast.stmt, add: ast.BinOp, target: str) -> bool:
        """Whether `prev` is ``b = wrapper(b)`` for an operand b of `add` that `add` rebinds."""
        return (
            isinstance(prev, ast.Assign)
            and len(prev.targets) == 1
            and isinstance(prev.targets[0], ast.Name)
            and prev.targets[0].id == target
            and any(isinstance(o, ast.Name) and o.id == target for o in (add.left, add.right))
            and self._peelable(prev.value)
        )

    def _peelable(self, expr: ast.expr) -> bool:
        if isinstance(expr, ast.Call) and len(expr.args) == 1 and not expr.keywords:
            if self_attr(expr.func) in self.names.wrappers:
                return True
        if isinstance(expr, ast.Call) and ast.unparse(expr.func) in _DROPOUT_FUNCTIONS:
            return _dropout_args(expr) is not None
        return (
            isinstance(expr, ast.BinOp)
            and isinstance(expr.op, ast.Mult)
            and self_attr(expr.right) in self.names.scalars
        )

    def _split(
        self, add: ast.BinOp, target: str | None, out: list[ast.stmt], defined: dict[str, int], free=frozenset()
    ):
        """(branch inner, residual, wrappers, dynamic): the branch is the operand with ops on it
        (a call), else the name defined later; the residual stream is the older value."""
        left, right = add.left, add.right

        def age(e):
            return defined.get(e.id, -1) if isinstance(e, ast.Name) else 10**9

        if age(left) > age(right) or (age(left) == age(right) and not isinstance(right, ast.Name)):
            branch, residual = left, right
        else:
            branch, residual = right, left
        sources = _origins(branch, out) | _origins(residual, out)
        inner, wrappers, dynamic = self._peel(branch, target, out, free)
        return inner, residual, wrappers, dynamic, sources

    # --- norm calls ---------------------------------------------------------------------------

    def _norm_call(self, node: ast.AST, tracked: set[str]) -> ast.Call | None:
        for n in _post_order(node):
            if (
                isinstance(n, ast.Call)
                and self_attr(n.func) in self.names.norms
                and len(n.args) == 1
                and not n.keywords
                and isinstance(n.args[0], ast.Name)
                and n.args[0].id in tracked
            ):
                return n
        return None

    def _inline_sites(self, stmt: ast.stmt, out: list[ast.stmt], defined: dict[str, int], rest) -> ast.stmt:
        """``self.N(a + b)`` -> ``_fusedres_site(self, k, a, b)`` anywhere in a simple statement;
        `rest`: the statements after it (BERT's ``b = self.dropout(b)`` just before
        ``self.LayerNorm(b + input)`` joins the site when nothing reads that b afterwards)."""
        if not _is_simple(stmt):
            return stmt
        rewriter = self
        loads = [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]

        def free(add: ast.BinOp) -> frozenset:
            names = [o.id for o in (add.left, add.right) if isinstance(o, ast.Name)]
            return frozenset(
                n for n in names if loads.count(n) == names.count(n) and (n in _stores(stmt) or not _live(n, rest))
            )

        class Inline(ast.NodeTransformer):
            def visit_Call(self, node):
                self.generic_visit(node)
                attr = self_attr(node.func)
                if (
                    attr in rewriter.names.norms
                    and len(node.args) == 1
                    and not node.keywords
                    and isinstance(node.args[0], ast.BinOp)
                    and isinstance(node.args[0].op, ast.Add)
                ):
                    add = node.args[0]
                    text = f"{ast.unparse(node)}"
                    inner, residual, wrappers, dynamic, sources = rewriter._split(add, None, out, defined, free(add))
                    k = rewriter._new_site(attr, wrappers, False, text, sources)
                    return rewriter._call(SITE, k, inner, residual, dynamic)
                return node

        return Inline().visit(stmt)

    # --- sites and exits ----------------------------------------------------------------------

    def _new_site(self, norm, wrappers, prenorm, text, sources) -> int:
        k = len(self.plan.sites)
        self.plan.sites.append(SiteTemplate(k, norm, wrappers, prenorm, text, frozenset(sources), tuple(self.flags)))
        return k

    @staticmethod
    def _call(helper: str, k: int, inner, residual, dynamic) -> ast.Call:
        args = [ast.Name("self", ast.Load()), ast.Constant(k), inner, residual, *dynamic]
        return ast.Call(ast.Name(helper, ast.Load()), args, [])

    def process(self) -> Plan:
        params = [a.arg for a in self.fn.args.posonlyargs + self.fn.args.args]
        defined = {p: -1 for p in params}
        self.fn.body = self._block(self.fn.body, [], defined)
        for block, flags in _blocks(self.fn):
            self.flags = list(flags)
            self._exits(block)
        self._entry(params[1] if len(params) > 1 else None)
        return self.plan

    def _block(self, stmts: list[ast.stmt], after: list[ast.stmt], defined: dict[str, int]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        stmts = list(stmts)
        i = 0
        while i < len(stmts):
            stmt = self._inline_sites(stmts[i], out, defined, stmts[i + 1 :] + after)
            stmts[i] = stmt
            if isinstance(stmt, ast.If):
                rest = stmts[i + 1 :] + after
                flag = _flag(stmt.test)
                for branch, value in (("body", True), ("orelse", False)):
                    self.flags += [(flag[0], flag[1] == value)] if flag else []
                    setattr(stmt, branch, self._block(getattr(stmt, branch), rest, dict(defined)))
                    del self.flags[len(self.flags) - bool(flag) :]
                out.append(stmt)
                i += 1
                continue
            if _sum_assignment(stmt) is not None:
                outcome = self._stepwise(stmts, i, out, after, defined)
                if outcome == "sunk":
                    continue  # stmts[i] is now an if holding both paths
            for name in _stores(stmts[i]):
                defined[name] = len(defined) + i
            out.append(stmts[i])
            i += 1
        return out

    def _stepwise(self, stmts, i, out, after, defined) -> str | None:
        """Looks for the norm of ``v = a + b`` (stmts[i]) and rewrites both statements in
        place; "sunk" when it moved the add into an if's branches instead."""
        target, add = _sum_assignment(stmts[i])
        h_names, views = {target}, set()
        assigned = {target}
        for j in range(i + 1, len(stmts)):
            stmt = stmts[j]
            tracked = h_names | views
            alias = _alias(stmt)
            if alias and alias[1] in tracked:
                (h_names if alias[1] in h_names else views).add(alias[0])
                (views if alias[1] in h_names else h_names).discard(alias[0])
                assigned.add(alias[0])
                continue
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                base = _view_of(stmt.value)
                if isinstance(base, ast.Name) and base.id in tracked:
                    views.add(stmt.targets[0].id)
                    h_names.discard(stmt.targets[0].id)
                    assigned.add(stmt.targets[0].id)
                    continue
            call = self._norm_call(stmt, tracked) if _is_simple(stmt) else None
            if call is not None:
                self._rewrite_stepwise(stmts, i, j, call, h_names, views, after, out, defined)
                return "site"
            if _is_simple(stmt) and not _reads_beyond_metadata(stmt, tracked) and not (_stores(stmt) & tracked):
                assigned |= _stores(stmt)
                continue
            if (
                isinstance(stmt, ast.If)
                and not (_loads(stmt.test) & (tracked | assigned))
                and any(_reads_beyond_metadata(s, tracked) for s in stmts[j:])
                and self._afford(stmts[i:])
            ):
                head, tail = stmts[i:j], stmts[j + 1 :]
                # The branch's wrapper statement just before the add (OPT's F.dropout) goes along,
                # so the site can still fold it.
                if out and self._wrapper_assignment(out[-1], add, target) and not (_loads(stmt.test) & {target}):
                    head = [out.pop()] + head
                branch = ast.If(
                    stmt.test,
                    _until_jump(copy.deepcopy(head) + stmt.body + copy.deepcopy(tail)),
                    _until_jump(copy.deepcopy(head) + (stmt.orelse or []) + copy.deepcopy(tail)),
                )
                ast.copy_location(branch, stmt)
                stmts[i:] = [branch]
                return "sunk"
            if _reads_beyond_metadata(stmt, tracked):
                for n in _post_order(stmt):
                    if isinstance(n, ast.Call) and self_attr(n.func) in self.names.norms and _reaches(n, tracked):
                        arg = ast.unparse(n.args[0]) if n.args else "no argument"
                        self.plan.missed.append(
                            f"{ast.unparse(add)} reaches self.{self_attr(n.func)} only through {arg}"
                        )
                        break
                return None
            if isinstance(stmt, (ast.Return, ast.Raise)):
                return None
        return None

    def _afford(self, stmts) -> bool:
        cost = sum(_size(s) for s in stmts)
        self.budget -= cost
        return self.budget >= 0

    def _rewrite_stepwise(self, stmts, i, j, call, h_names, views, after, out, defined):
        target, add = _sum_assignment(stmts[i])
        norm_stmt = stmts[j]
        tracked = h_names | views
        between = stmts[i + 1 : j]
        prenorm = (
            any(_loads(s) & tracked for s in between)
            or _reads_beyond_metadata(norm_stmt, tracked, skip=call)
            or any(name not in _stores(norm_stmt) and _live(name, stmts[j + 1 :] + after) for name in tracked)
        )
        attr = self_attr(call.func)
        text = f"{ast.unparse(add)} -> self.{attr}"
        inner, residual, wrappers, dynamic, sources = self._split(add, target, out, defined)
        k = self._new_site(attr, wrappers, prenorm, text, sources)
        y = f"_fusedres_y{k}"
        fused = self._call(SITE, k, inner, residual, dynamic)
        if prenorm:
            targets = [ast.Tuple([ast.Name(y, ast.Store()), ast.Name(target, ast.Store())], ast.Store())]
        else:
            targets = [ast.Name(y, ast.Store())]
        stmts[i] = ast.copy_location(ast.Assign(targets, fused), stmts[i])
        u = call.args[0].id
        replacement = (
            ast.Name(y, ast.Load())
            if u in h_names
            else ast.Call(
                ast.Name(VIEW, ast.Load()), [copy.deepcopy(call.func), ast.Name(y, ast.Load()), call.args[0]], []
            )
        )
        stmts[j] = _replace(norm_stmt, call, replacement)

    def _exits(self, block: list[ast.stmt]) -> None:
        """Rewrites the adds whose results the return statements of `block` return."""
        for stmt in [s for s in block if isinstance(s, ast.Return) and s.value is not None]:
            value = stmt.value
            tuple_head = isinstance(value, ast.Tuple) and bool(value.elts)
            if tuple_head:
                value = value.elts[0]
            if isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add):
                call = self._exit_call(value, block, block.index(stmt), None)
                if tuple_head:
                    stmt.value.elts[0] = call
                else:
                    stmt.value = call
            elif isinstance(value, ast.Name):
                self._exit_of(block, block.index(stmt), value.id)

    def _exit_of(self, block: list[ast.stmt], end: int, name: str) -> bool:
        """Finds the last assignment of `name` before block[end] and rewrites it if it is an add
        (or a view of one). Returns whether every path through block[:end] assigns name."""
        for idx in range(end - 1, -1, -1):
            prev = block[idx]
            if name not in _stores(prev):
                continue
            if isinstance(prev, ast.If):
                # Each branch's last assignment; a branch that leaves name alone falls through
                # to the assignments before the if (an fp16 clamp: checked at run time).
                covers = [self._exit_of(b, len(b), name) if b else False for b in (prev.body, prev.orelse)]
                if all(covers):
                    return True
                continue
            if not (isinstance(prev, ast.Assign) and len(prev.targets) == 1 and isinstance(prev.targets[0], ast.Name)):
                return True
            rhs = prev.value
            if isinstance(rhs, ast.BinOp) and isinstance(rhs.op, ast.Add):
                prev.value = self._exit_call(rhs, block, idx, name)
                return True
            base = _view_of(rhs)
            if isinstance(base, ast.BinOp) and isinstance(base.op, ast.Add):
                rhs.func.value = self._exit_call(base, block, idx, None)
                return True
            if isinstance(base, ast.Name) or isinstance(rhs, ast.Name):
                name = base.id if isinstance(base, ast.Name) else rhs.id
                continue
            return True
        return False

    def _exit_call(self, add: ast.BinOp, block: list[ast.stmt], idx: int, target: str | None) -> ast.Call:
        prefix = block[:idx]
        defined = {n: i for i, s in enumerate(prefix) for n in _stores(s)}
        inner, residual, wrappers, dynamic, _ = self._split(add, target, prefix, defined)
        del block[len(prefix) : idx]  # wrapper statements merged into the exit
        e = len(self.plan.exits)
        self.plan.exits.append(SiteTemplate(e, None, wrappers, True, ast.unparse(add), flags=tuple(self.flags)))
        return self._call(EXIT, e, inner, residual, dynamic)

    def _entry(self, param: str | None) -> None:
        """The first norm applied to the input `param` (or an alias), with its flag tests."""
        if param is None:
            return
        names = {param}

        def scan(stmts, flags) -> bool:  # True: stop (found, or the input was rebound)
            for stmt in stmts:
                alias = _alias(stmt)
                if alias and alias[1] in names:
                    names.add(alias[0])
                    continue
                if isinstance(stmt, ast.If):
                    flag = _flag(stmt.test)
                    for branch, value in ((stmt.body, True), (stmt.orelse, False)):
                        if scan(branch, flags + ((flag[0], flag[1] == value),) if flag else flags):
                            return True
                    continue
                for n in _post_order(stmt):
                    if isinstance(n, ast.Call) and (attr := self_attr(n.func)) in self.names.norms:
                        if len(n.args) == 1 and isinstance(n.args[0], ast.Name) and n.args[0].id in names:
                            self.plan.entry, self.plan.entry_flags = attr, flags
                            return True
                if _stores(stmt) & names:
                    return True
            return False

        scan(self.fn.body, ())


def _flag(test: ast.expr) -> tuple[str, bool] | None:
    """("x", True) for ``self.x``, ("x", False) for ``not self.x``; ("hasattr x", True) for
    ``hasattr(self, "x")``: tests an instance answers the same way every call."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _flag(test.operand)
        return (inner[0], not inner[1]) if inner else None
    if (
        isinstance(test, ast.Call)
        and isinstance(test.func, ast.Name)
        and test.func.id == "hasattr"
        and len(test.args) == 2
        and isinstance(test.args[0], ast.Name)
        and test.args[0].id == "self"
        and isinstance(test.args[1], ast.Constant)
        and isinstance(test.args[1].value, str)
    ):
        return (f"hasattr {test.args[1].value}", True)
    attr = self_attr(test)
    return (attr, True) if attr else None


def _dropout_args(call: ast.Call):
    """(x, p, training) of ``F.dropout(x, p=0.5, training=True, inplace=False)``."""
    names = ("input", "p", "training", "inplace")
    bound = dict(zip(names, call.args))
    for kw in call.keywords:
        if kw.arg not in names or kw.arg in bound:
            return None
        bound[kw.arg] = kw.value
    if "input" not in bound or (isinstance(bound.get("inplace"), ast.Constant) and bound["inplace"].value):
        return None
    if "inplace" in bound and not isinstance(bound["inplace"], ast.Constant):
        return None
    return bound["input"], bound.get("p", ast.Constant(0.5)), bound.get("training", ast.Constant(True))


def _origins(expr: ast.expr, out: list[ast.stmt]) -> set[str]:
    """x for an operand made by ``self.x(...)``, directly or through a name assigned so."""
    if isinstance(expr, ast.Call) and (attr := self_attr(expr.func)):
        return {attr}
    if isinstance(expr, ast.Name):
        for stmt in reversed(out):
            if expr.id in _stores(stmt):
                value = getattr(stmt, "value", None)
                if isinstance(value, ast.Call) and (attr := self_attr(value.func)):
                    return {attr}
                return set()
    return set()


def _reaches(call: ast.Call, names: set[str]) -> bool:
    """Whether `call`'s arguments read one of `names` through plain tensor ops, not through a
    submodule (``self.layers(x)`` is a whole stack, not an op on the sum)."""
    todo = list(call.args)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and node.id in names:
            return True
        if isinstance(node, ast.Call) and self_attr(node.func):
            continue
        todo += list(ast.iter_child_nodes(node))
    return False


def _until_jump(stmts: list[ast.stmt]) -> list[ast.stmt]:
    """Statements up to the first return / raise / break / continue: the rest never runs."""
    for i, stmt in enumerate(stmts):
        if isinstance(stmt, (ast.Return, ast.Raise, ast.Break, ast.Continue)):
            return stmts[: i + 1]
    return stmts


def _replace(stmt: ast.stmt, old: ast.AST, new: ast.AST) -> ast.stmt:
    class Swap(ast.NodeTransformer):
        def visit(self, node):
            if node is old:
                return new
            return super().visit(node)

    return Swap().visit(stmt)


def _live(name: str, stmts: list[ast.stmt]) -> bool:
    """Whether `name`'s current value may be read by `stmts` (conservative)."""
    for stmt in stmts:
        if name in _loads(stmt):
            return True
        if _is_simple(stmt) and name in _stores(stmt):
            return False
    return False


def _blocks(fn: ast.FunctionDef):
    """(block, its flag tests) for the function's body and every if-branch in it (the blocks a
    return can sit in)."""
    todo = [(fn.body, ())]
    while todo:
        block, flags = todo.pop()
        yield block, flags
        for stmt in block:
            if isinstance(stmt, ast.If):
                flag = _flag(stmt.test)
                for branch, value in ((stmt.body, True), (stmt.orelse, False)):
                    todo.append((branch, flags + ((flag[0], flag[1] == value),) if flag else flags))


def plan_forward(fn: ast.FunctionDef, names: Names) -> Plan:
    """Finds the sites, exits and entry of `fn` (a parsed forward, not modified) for a module
    whose norm, wrapper and scalar attributes are `names`."""
    fn = copy.deepcopy(fn)
    return _Rewriter(fn, names).process()


NormPredicate = Callable[[str], bool]
