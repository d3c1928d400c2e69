"""fuse() for blocks recognised by structure: any module whose forward feeds a residual add into a
norm (forward_ast.py) that computes what the fused ops compute (probe.py), whatever its class.

For each such module: its class is swapped for a subclass whose forward is the original one
rewritten (the source, compiled again in the original's module, with its decorators), each site
calling the fused op (sites.py). Per-instance facts (which norm, its eps, which branch ops fold)
live in the instance's __dict__, so state_dict keys, parameters and buffers are untouched and
unfuse() is the class swap back.

Then the stacks: in every nn.ModuleList / nn.Sequential, each block's last add is carried into
the next block's first norm, and the last block's into the norm the parent module applies to the
stack's output (sites.py explains how, and when it turns itself off).
"""

from __future__ import annotations
import __future__

import ast
import functools
import inspect
import linecache
import sys
import textwrap
import types
from dataclasses import dataclass, field

from torch import nn

from fusedres.convert import features, forward_ast, probe, sites

_ORIGINAL, _RESTORE = "_fusedres_original", "_fusedres_restore"
_CONTAINERS = (nn.ModuleList, nn.Sequential)


# --- reading and recompiling a forward ----------------------------------------------------------


def _forward_of(cls: type):
    """(the class defining forward, the function under its decorators' wrappers)."""
    for klass in cls.__mro__:
        if klass is nn.Module:
            return None, None
        raw = vars(klass).get("forward")
        if raw is not None:
            return klass, inspect.unwrap(raw)
    return None, None


@functools.cache
def _parsed(fn) -> ast.FunctionDef | str:
    if fn.__code__.co_freevars:
        return "its forward is a closure"
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError) as e:
        return f"its forward's source is not available ({type(e).__name__})"
    if not isinstance(node, ast.FunctionDef):
        return "its forward is not a plain function"
    return node


@functools.cache
def _methods(cls: type) -> tuple[ast.FunctionDef, ...]:
    """The parsed methods of cls and its bases (up to nn.Module), to look for a final norm."""
    out = []
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        for value in vars(klass).values():
            if inspect.isfunction(value):
                node = _parsed(inspect.unwrap(value))
                if isinstance(node, ast.FunctionDef):
                    out.append(node)
    return tuple(out)


def _compile(fn, owner: type, function: ast.FunctionDef):
    """The rewritten forward, compiled as if written in fn's module (its globals, its decorators,
    zero-argument super() bound to `owner`), with the site helpers in scope. Its source is in
    linecache, so tracebacks and inspect.getsource show the fused code."""
    factory = ast.parse(f"def _fusedres_factory({', '.join(sites.HELPERS)}, __class__):\n    pass").body[0]
    factory.body = [function, ast.Return(ast.Name(function.name, ast.Load()))]
    module = ast.fix_missing_locations(ast.Module([factory], []))
    source = ast.unparse(module) + "\n"
    filename = f"<fusedres: fused {owner.__module__}.{owner.__qualname__}.forward #{len(_COMPILED)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = compile(source, filename, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    make = types.FunctionType(factory_code, fn.__globals__, "_fusedres_factory")
    forward = make(*sites.HELPERS.values(), owner)
    _COMPILED.append(filename)
    return forward


_COMPILED: list[str] = []


# --- one fuse() call ------------------------------------------------------------------------------


class _Probes:
    """probe.py's answers for this fuse() call, per module."""

    def __init__(self):
        self._norms, self._wrappers = {}, {}

    def norm(self, module: nn.Module):
        key = id(module)
        if key not in self._norms:
            self._norms[key] = probe.probe_norm(module)
        return self._norms[key]

    def usable_norm(self, module: nn.Module) -> probe.NormSpec | None:
        spec = self.norm(module)
        if not isinstance(spec, probe.NormSpec):
            return None
        if spec.offset and not features.supported(features.WEIGHT_OFFSET):
            return None
        return spec

    def wrapper(self, module: nn.Module) -> str:
        key = id(module)
        if key not in self._wrappers:
            self._wrappers[key] = probe.probe_wrapper(module)[0]
        return self._wrappers[key]


def _looks_like_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _names(module: nn.Module, fn_def: ast.FunctionDef, probes: _Probes) -> forward_ast.Names:
    norms, wrappers = set(), set()
    for attr in forward_ast.self_calls(fn_def):
        child = module._modules.get(attr)
        if child is None:
            continue
        if isinstance(probes.norm(child), probe.NormSpec) or _looks_like_norm(child):
            norms.add(attr)
        elif probes.wrapper(child) != probe.OPAQUE:
            wrappers.add(attr)
    scalars = set()
    for node in ast.walk(fn_def):
        attr = forward_ast.self_attr(node)
        if attr and attr not in module._modules and type(getattr(module, attr, None)) in (float, int):
            scalars.add(attr)
    return forward_ast.Names(frozenset(norms), frozenset(wrappers), frozenset(scalars))


@functools.cache
def _plan(fn, names: forward_ast.Names) -> forward_ast.Plan:
    return forward_ast.plan_forward(_parsed(fn), names)


@dataclass
class _Block:
    name: str
    module: nn.Module
    owner: type
    fn: object
    names: forward_ast.Names
    plan: forward_ast.Plan
    sites: tuple = ()
    exits: tuple = ()
    fused: list[str] = field(default_factory=list)  # site descriptions
    skipped: list[str] = field(default_factory=list)
    links: list = field(default_factory=list)
    produces: bool = False  # has an exit on a path this instance takes


def _analyze(name: str, module: nn.Module, probes: _Probes) -> _Block | str | None:
    """The block's sites (None: nothing to fuse; a str: add -> norm flows it cannot fuse)."""
    owner, fn = _forward_of(type(module))
    if fn is None or not module._modules:
        return None
    fn_def = _parsed(fn)
    if isinstance(fn_def, str):
        if any(_looks_like_norm(c) for c in module.children()):
            return fn_def
        return None
    names = _names(module, fn_def, probes)
    if not names.norms:
        return None
    plan = _plan(fn, names)
    block = _Block(name, module, owner, fn, names, plan)
    site_objects = []
    seen: dict[str, bool] = {}
    for t in plan.sites:
        norm = module._modules[t.norm]
        spec, reason = probes.norm(norm), None
        if any(type(module._modules.get(s)) is nn.Embedding for s in t.sources):
            spec = None  # an embedding sum (positions broadcast over the batch): not a residual add
        elif not isinstance(spec, probe.NormSpec):
            reason, spec = f"{t.text}: self.{t.norm} ({type(norm).__name__}): {spec}", None
        elif spec.offset and not features.supported(features.WEIGHT_OFFSET):
            reason = (
                f"{t.text}: self.{t.norm} computes (1+w)*x_hat: {features.unsupported_reason(features.WEIGHT_OFFSET)}"
            )
            spec = None
        applied, folded = sites.branch_ops(module, t.wrappers)
        site_objects.append(sites.Site(t.norm, spec, t.prenorm, applied, folded))
        if t.text in seen or not _on_path(
            module, t.flags
        ):  # one source site on several paths (duplicated around an if)
            continue
        seen[t.text] = True
        if reason:
            block.skipped.append(reason)
        elif spec is not None:
            block.fused.append(_describe(t, spec, applied, folded))
    block.sites = tuple(site_objects)
    block.exits = tuple(sites.Exit(*sites.branch_ops(module, t.wrappers)) for t in plan.exits)
    block.produces = any(_on_path(module, t.flags) for t in plan.exits)
    return block


def _on_path(module: nn.Module, flags) -> bool:
    """Whether this instance's flags (``if self.do_layer_norm_before:``) lead to the statement;
    a site on a path the instance never takes is not reported."""
    for attr, value in flags:
        if attr.startswith("hasattr "):
            if hasattr(module, attr.split(" ", 1)[1]) != value:
                return False
        elif type(getattr(module, attr, None)) is bool and getattr(module, attr) != value:
            return False
    return True


def _describe(t, spec, applied, folded) -> str:
    text = f"{t.text} ({spec.describe()}{', prenorm' if t.prenorm else ''}"
    if folded:
        text += ", " + " ".join(f"+{_label(op)}" for op in folded) + " folded"
    waiting = [
        op for op in applied if sites._FEATURE_OF.get(op.kind) and not features.supported(sites._FEATURE_OF[op.kind])
    ]
    if waiting:
        kinds = ", ".join(sorted({sites._FEATURE_OF[op.kind] for op in waiting}))
        text += f"; {' '.join(_label(op) for op in waiting)} applied by torch first until add_norm takes {kinds}"
    return text + ")"


def _label(op) -> str:
    return "F.dropout" if op.kind == "dropout_fn" else f"self.{op.attr}"


def _residual_adds(fn_def: ast.FunctionDef) -> bool:
    """Whether the forward adds something to one of its inputs (or an alias); adding one of the
    module's own parameters (a position embedding) does not count."""
    names = {a.arg for a in fn_def.args.args[1:]}
    for node in ast.walk(fn_def):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in names:
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for n in ast.walk(fn_def):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add):
            operands = (n.left, n.right)
            if any(isinstance(o, ast.Name) and o.id in names for o in operands) and not any(
                forward_ast.self_attr(o) for o in operands
            ):
                return True
    return False


# --- carrying a block's last add into the next block's first norm ------------------------------


class _Stacks:
    def __init__(self, model: nn.Module, blocks: dict[int, _Block], probes: _Probes):
        self.blocks, self.probes = blocks, probes
        self.parents: dict[int, tuple[nn.Module, str]] = {}
        self.names: dict[int, str] = {}
        for name, module in model.named_modules():
            self.names[id(module)] = name
            for attr, child in module._modules.items():
                if child is not None:
                    self.parents.setdefault(id(child), (module, attr))
        self.linked: set[int] = set()

    def producer(self, module: nn.Module) -> _Block | None:
        block = self.blocks.get(id(module))
        if block is not None:
            return block if block.produces else None
        stack = _stack_in(module, identity_others=False)
        return self.producer(stack[-1]) if stack else None

    def consumer(self, module: nn.Module):
        """(norm module, its spec) first applied to module's input, if fused ops compute it."""
        block = self.blocks.get(id(module))
        if block is not None:
            entry = block.plan.entry if _on_path(module, block.plan.entry_flags) else None
            norm = module._modules.get(entry) if entry else None
            spec = self.probes.usable_norm(norm) if norm is not None else None
            return (norm, spec) if spec is not None else None
        stack = _stack_in(module, identity_others=True)
        return self.consumer(stack[0]) if stack else None

    def link(self, producer: _Block, norm: nn.Module, spec, final: bool) -> bool:
        if producer.links or id(norm) in self.linked or getattr(type(norm), _ORIGINAL, None) is not None:
            return False
        link = sites.Link(norm, spec, final, self.names.get(id(norm), type(norm).__name__))
        for ex in producer.exits:
            ex.link = link
        producer.links.append(link)
        self.linked.add(id(norm))
        norm.__dict__[sites.LINK] = link
        norm.__class__ = _carried_class(type(norm))
        return True

    def run(self, model: nn.Module) -> list[tuple[str, str]]:
        report = []
        for name, stack in model.named_modules():
            if not isinstance(stack, _CONTAINERS) or len(stack) == 0:
                continue
            items = list(stack)
            carried, entry = 0, None
            for a, b in zip(items, items[1:]):
                producer, consumer = self.producer(a), self.consumer(b)
                if producer is not None and consumer is not None and self.link(producer, *consumer, final=False):
                    carried += 1
                    entry = self.names.get(id(consumer[0]), "").rsplit(".", 1)[-1]
            final_text = ""
            producer = self.producer(items[-1])
            final = self.final_norm(stack)
            if producer is not None and final is not None and self.link(producer, *final, final=True):
                carried += 1
                final_text = f"; the last into {self.names.get(id(final[0]))}"
            if carried:
                inside = carried - bool(final_text)
                what = f"{inside} of {len(items) - 1} block outputs + residual fused into the next block's {entry}"
                if not inside:
                    what = f"the last block's output + residual fused into {final_text.rsplit(' ', 1)[-1]}"
                report.append((name, what + (final_text if inside else "")))
        return report

    def final_norm(self, stack: nn.Module):
        """The norm the stack's parent (or grandparent) applies to what the stack returns."""
        node = stack
        for _ in range(2):
            if id(node) not in self.parents:
                return None
            parent, attr = self.parents[id(node)]
            found = self._norm_after(parent, attr)
            if found is not None:
                return found
            node = parent
        return None

    def _norm_after(self, parent: nn.Module, attr: str):
        for fn_def in _methods(type(parent)):
            order = list(forward_ast._post_order(fn_def))
            uses = [i for i, n in enumerate(order) if forward_ast.self_attr(n) == attr]
            if not uses:
                continue
            subscripted = {
                t.id
                for n in ast.walk(fn_def)
                if isinstance(n, ast.Assign) and isinstance(n.value, ast.Subscript)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            for n in order[uses[0] :]:
                norm_attr = forward_ast.self_attr(n.func) if isinstance(n, ast.Call) else None
                norm = parent._modules.get(norm_attr) if norm_attr else None
                if norm is None or len(n.args) != 1:
                    continue
                if isinstance(n.args[0], ast.Subscript) or (
                    isinstance(n.args[0], ast.Name) and n.args[0].id in subscripted
                ):
                    continue
                spec = self.probes.usable_norm(norm)
                if spec is not None:
                    return norm, spec
        return None


def _stack_in(module: nn.Module, identity_others: bool):
    """The list of blocks `module` runs: itself if a container, else its one container child (the
    others being identities, when `identity_others`: T5Block's `layer`, a timm stage's `blocks`)."""
    if isinstance(module, _CONTAINERS):
        return list(module) or None
    containers = [c for c in module.children() if isinstance(c, _CONTAINERS)]
    if len(containers) != 1 or not len(containers[0]):
        return None
    if identity_others and any(type(c) is not nn.Identity for c in module.children() if c is not containers[0]):
        return None
    return list(containers[0])


# --- classes -----------------------------------------------------------------------------------


_CLASSES: dict[tuple, type] = {}


def _register(cls: type) -> type:
    # Under its name in this module, so a fused model pickles within the process.
    setattr(sys.modules[__name__], cls.__name__, cls)
    return cls


def _name(prefix: str, original: type, n: int) -> str:
    base = f"{prefix}_{original.__module__.replace('.', '_')}_{original.__qualname__.replace('.', '_')}"
    return base if n == 0 else f"{base}_{n}"


def _restore_block(module: nn.Module) -> None:
    module.__dict__.pop(sites.SITES, None)
    module.__dict__.pop(sites.EXITS, None)


def _restore_norm(module: nn.Module) -> None:
    module.__dict__.pop(sites.LINK, None)


def _fused_class(block: _Block) -> type:
    original = type(block.module)
    key = (original, block.fn, block.names)
    cls = _CLASSES.get(key)
    if cls is None:
        forward = _compile(block.fn, block.owner, block.plan.function)
        n = sum(1 for k in _CLASSES if k[0] is original)
        cls = type(
            _name("Fused", original, n),
            (original,),
            {"forward": forward, _ORIGINAL: original, _RESTORE: staticmethod(_restore_block), "__module__": __name__},
        )
        cls.__qualname__ = cls.__name__
        _CLASSES[key] = _register(cls)
    return cls


def _carried_class(original: type) -> type:
    key = (original, "carried")
    cls = _CLASSES.get(key)
    if cls is None:
        cls = type(
            _name("CarriedInto", original, 0),
            (original,),
            {
                "forward": sites.carried_norm_forward,
                _ORIGINAL: original,
                _RESTORE: staticmethod(_restore_norm),
                "__module__": __name__,
            },
        )
        cls.__qualname__ = cls.__name__
        _CLASSES[key] = _register(cls)
    return cls


# --- the entry point -----------------------------------------------------------------------------


def fuse_blocks(model: nn.Module, report, skip: set[int]) -> None:
    """Fuses every block of `model` whose forward has add -> norm sites, and carries the residual
    across the stacks of such blocks; records what it did in `report` (a FuseReport)."""
    probes = _Probes()
    blocks: dict[int, _Block] = {}
    for device in {p.device for p in model.parameters() if p.device.type != "meta"}:
        features.available(device)  # asked now, so that torch.compile finds the answer
    for name, module in model.named_modules():
        cls = type(module)
        if (
            id(module) in skip
            or _ORIGINAL in vars(cls)
            or cls.__module__.startswith("torch.")
            or isinstance(module, _CONTAINERS)
            or hasattr(cls, "_can_record_outputs")  # a transformers PreTrainedModel: its class is its registry key
        ):
            continue
        found = _analyze(name, module, probes)
        if isinstance(found, str):
            report.skipped.append((name, f"{cls.__name__}: {found}"))
        elif found is not None:
            blocks[id(module)] = found
    stacks = _Stacks(model, blocks, probes)
    carried = stacks.run(model)
    for block in blocks.values():
        cls_name = type(block.module).__name__
        if block.fused or block.links:
            block.module.__dict__[sites.SITES] = block.sites
            block.module.__dict__[sites.EXITS] = block.exits
            block.module.__class__ = _fused_class(block)
            parts = block.fused + [f"its output + residual carried into {link.name}" for link in block.links]
            what = "; ".join(parts)
            report.replaced.append((block.name, f"{cls_name}: {what}"))
            report.sites += len(block.fused) + len(block.links)
        for reason in block.skipped + block.plan.missed:
            report.skipped.append((block.name, f"{cls_name}: {reason}"))
        in_stack = isinstance(stacks.parents.get(id(block.module), (None,))[0], _CONTAINERS)
        if (
            in_stack
            and not (block.plan.sites or block.links or block.plan.missed)
            and _residual_adds(_parsed(block.fn))
        ):
            report.skipped.append((block.name, f"{cls_name}: none of its residual adds feeds one of its norms"))
    report.carried += carried
