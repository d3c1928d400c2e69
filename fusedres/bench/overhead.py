"""Host time per call: `python -m fusedres.bench --overhead`.

A fused op that saves a memory pass but spends 100 us of Python per call makes a real model
slower: at a model's small and mid-size activations the host path (argument checks, dispatch,
autograd nodes, launches) is the time. So each case here runs on tiny tensors, where kernel time
is ~0, and compares fusedres with the eager op sequence it replaces, in one process:

- timing: per case, eager and every fusedres backend take turns. A round times a block of N calls
  of each side (the order reversed every other round, so no side always runs first); after a
  warm-up, `repeats` rounds, and each side's figure is its best block divided by N (timeit's
  reasoning: noise only ever adds time). On CPU torch runs one thread. On CUDA each block ends
  with a synchronize: while the host is the bottleneck (as on tiny tensors) that adds one
  kernel's time per block; were the GPU slower, the figure would be the GPU's;
- dispatched ops per call: every op a TorchDispatchMode sees during one call's forward, and
  separately during its backward (the torch.autograd.grad call only). A fusedres op counts once;
  its own kernels are inside it;
- kernel launches per call (CUDA only): kernel events torch.profiler records over a few calls.

The targets are the issue's: fused at most 2.0x eager's host time for a forward under no_grad,
1.25x for forward + backward.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres.bench import report
from fusedres.ops import add_norm as add_norm_ops
from fusedres.ops import batch_norm as batch_norm_ops

SCHEMA = 1
TARGETS = {"fwd no_grad": 2.0, "fwd+bwd": 1.25}  # fused / eager host time, at most
CALLS = {"full": 1000, "quick": 300, "smoke": 30}  # calls per timed block, by case set
REPEATS = 7
PROFILED_CALLS = 5  # calls under torch.profiler when counting kernel launches

# The shapes: small enough that kernel time is ~0.
ROWS, HIDDEN = 4, 64
BN_SHAPE = (2, 8, 4, 4)
LN_EPS, RMS_EPS = 1e-5, 1e-6


# --- what runs -----------------------------------------------------------------------------------


@dataclass
class Side:
    """One way to compute a case. A call is forward(); with `wrt`, also its backward: the grads of
    the output(s) with respect to `wrt` for the fixed `grad_outputs` (torch.autograd.grad, so no
    .grad accumulates and no loss op is timed)."""

    forward: Callable[[], Any]
    wrt: tuple = ()
    grad_outputs: Any = None

    def backward(self, outputs):
        return torch.autograd.grad(outputs, self.wrt, self.grad_outputs)

    def call(self) -> Callable[[], Any]:
        """The timed callable, with no harness code around the work."""
        if not self.wrt:
            return self.forward
        forward, wrt, grad_outputs, grad = self.forward, self.wrt, self.grad_outputs, torch.autograd.grad
        return lambda: grad(forward(), wrt, grad_outputs)


@dataclass(frozen=True)
class OverheadCase:
    name: str
    op: str
    family: str  # as in registry.FAMILIES, for --ops
    shape: tuple
    backward: bool
    build: Callable[[torch.device], tuple[Side, Side]]  # (fused, eager) over fresh tensors and modules

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd no_grad"

    @property
    def label(self) -> str:
        return f"{self.name} {self.mode}"

    @property
    def target(self) -> float:
        return TARGETS[self.mode]


def _tensors(device, requires_grad: bool, *shapes, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(device).requires_grad_(requires_grad) for s in shapes]


def _grads(device, *shapes) -> tuple[torch.Tensor, ...]:
    return tuple(_tensors(device, False, *shapes, seed=1))


def _add_layer_norm(backward: bool):
    def build(device):
        x, r, w, b = _tensors(device, backward, (ROWS, HIDDEN), (ROWS, HIDDEN), (HIDDEN,), (HIDDEN,))
        fused = lambda: fusedres.add_layer_norm(x, r, w, b, LN_EPS)
        eager = lambda: F.layer_norm(x + r, (HIDDEN,), w, b, LN_EPS)
        if not backward:
            return Side(fused), Side(eager)
        (dy,) = _grads(device, (ROWS, HIDDEN))
        return Side(fused, (x, r, w, b), dy), Side(eager, (x, r, w, b), dy)

    return build


def _add_rms_norm_prenorm(device):
    x, r, w = _tensors(device, True, (ROWS, HIDDEN), (ROWS, HIDDEN), (HIDDEN,))

    def eager():
        h = x + r
        return F.rms_norm(h, (HIDDEN,), w, RMS_EPS), h

    fused = lambda: fusedres.add_rms_norm(x, r, w, RMS_EPS, prenorm=True)
    grads = _grads(device, (ROWS, HIDDEN), (ROWS, HIDDEN))  # y and h both feed the loss
    return Side(fused, (x, r, w), grads), Side(eager, (x, r, w), grads)


def _batch_norm_add_relu(training: bool):
    def build(device):
        channels = BN_SHAPE[1]
        bn = torch.nn.BatchNorm2d(channels).to(device)
        weight, bias, mean, var = _tensors(device, False, (channels,), (channels,), (channels,), (channels,), seed=2)
        with torch.no_grad():  # not the trivial init: eval then normalizes with real statistics
            bn.weight.copy_(1 + 0.1 * weight)
            bn.bias.copy_(0.1 * bias)
            bn.running_mean.copy_(0.1 * mean)
            bn.running_var.copy_(1 + 0.1 * var.abs())
        fused_bn = fusedres.nn.BatchNormAddReLU2d(channels).to(device)
        fused_bn.load_state_dict(bn.state_dict())  # the same parameters; each updates its own stats
        bn.train(training)
        fused_bn.train(training)
        x, r = _tensors(device, training, BN_SHAPE, BN_SHAPE)
        fused = lambda: fused_bn(x, r)
        eager = lambda: F.relu(bn(x) + r)
        if not training:
            return Side(fused), Side(eager)
        (dy,) = _grads(device, BN_SHAPE)
        return (
            Side(fused, (x, r, fused_bn.weight, fused_bn.bias), dy),
            Side(eager, (x, r, bn.weight, bn.bias), dy),
        )

    return build


CASES = (
    OverheadCase("add_layer_norm", "add_layer_norm", "add_norm", (ROWS, HIDDEN), False, _add_layer_norm(False)),
    OverheadCase("add_layer_norm", "add_layer_norm", "add_norm", (ROWS, HIDDEN), True, _add_layer_norm(True)),
    OverheadCase("add_rms_norm prenorm", "add_rms_norm", "add_norm", (ROWS, HIDDEN), True, _add_rms_norm_prenorm),
    OverheadCase(
        "BatchNormAddReLU2d train", "batch_norm_add_relu", "batch_norm", BN_SHAPE, True, _batch_norm_add_relu(True)
    ),
    OverheadCase(
        "BatchNormAddReLU2d eval", "batch_norm_add_relu", "batch_norm", BN_SHAPE, False, _batch_norm_add_relu(False)
    ),
)


def select_cases(ops: list[str] | None = None) -> list[OverheadCase]:
    """The cases whose op or family is in `ops` (all without)."""
    return [c for c in CASES if not ops or c.op in ops or c.family in ops]


def overhead_backends(device: torch.device, selected: list[str] | None = None) -> list[str]:
    """Every fusedres backend usable on `device` (the reference backend too: it is what runs where
    no kernel does), except Triton run by its interpreter: a test vehicle, not a speed path."""
    names = fusedres.available_backends(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        names = [b for b in names if b != "triton"]
    return [b for b in names if not selected or b in selected]


# --- counting ------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while it is active, by name. An op's own inner calls run with
    the mode off, so a custom op counts once however many aten ops its kernel uses."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(side: Side) -> tuple[Counter, Counter | None]:
    """The ops of one call's forward, and of its backward (None without one)."""
    with OpCounter() as forward:
        outputs = side.forward()
    if not side.wrt:
        return forward.ops, None
    with OpCounter() as backward:
        side.backward(outputs)
    return forward.ops, backward.ops


def _device_activity(event) -> str | None:
    """The kind of a torch.profiler event on the GPU ("kernel", "gpu_memcpy", "gpu_memset"); None on the host."""
    if event.device_type != torch.autograd.DeviceType.CUDA:
        return None
    kind = getattr(event, "activity_type", None)
    if kind:
        return kind
    name = event.name.lower()  # older profilers: tell copies and fills by name
    return "gpu_memcpy" if name.startswith("memcpy") else "gpu_memset" if name.startswith("memset") else "kernel"


def launch_counts(events, calls: int) -> dict[str, float]:
    """Kernels, and device copies and fills, per call among profiler events of `calls` calls."""
    kinds = Counter(_device_activity(e) for e in events)
    return {"kernels": kinds["kernel"] / calls, "copies": (kinds["gpu_memcpy"] + kinds["gpu_memset"]) / calls}


def kernel_launches(call: Callable[[], Any], device: torch.device, calls: int = PROFILED_CALLS) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize(device)
    return launch_counts(prof.events(), calls)


# --- timing --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> Callable[[], None]:
    return partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None


def block_us(call: Callable[[], Any], calls: int, context: Callable, device: torch.device) -> float:
    """Host microseconds per call over `calls` back-to-back calls, garbage collection off (as timeit:
    a collection's pause would land on whichever side happens to trigger it)."""
    sync = _sync(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with context():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            sync()
            return (time.perf_counter() - start) / calls * 1e6
    finally:
        if gc_was_enabled:
            gc.enable()


def alternate(sides: dict, calls: int, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """us per call of each of `repeats` blocks per side; sides: name -> (callable, context factory).
    The sides take turns, in reverse order every other round."""
    names = list(sides)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            call, context = sides[name]
            samples[name].append(block_us(call, calls, context, device))
    return samples


# --- one case ------------------------------------------------------------------------------------


@dataclass
class OverheadOptions:
    calls: int = CALLS["full"]
    repeats: int = REPEATS
    warmup: int | None = None  # calls per side before timing; default max(20, calls // 5)
    backends: list[str] | None = None
    launches: bool | None = None  # count kernel launches; default: on CUDA


@dataclass
class CaseResult:
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # fusedres sides that raised or disagree with eager


def _tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    return [t for v in value for t in _tensors_of(v)] if isinstance(value, (tuple, list)) else []


def _results(side: Side) -> list[torch.Tensor]:
    """One call's outputs, then its grads: what must agree with eager."""
    outputs = side.forward()
    grads = side.backward(outputs) if side.wrt else ()
    return _tensors_of(outputs) + _tensors_of(grads)


def _matches(ours: list[torch.Tensor], eager: list[torch.Tensor]) -> bool:
    return len(ours) == len(eager) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4) for a, b in zip(ours, eager)
    )


def _who(side: str) -> str:
    return side if side == "eager" else f"fusedres-{side}"


def _count(counter: Counter | None) -> int | None:
    return None if counter is None else sum(counter.values())


def _prepare(side: Side, expected: list | None, warmup: int, device: torch.device, count_launches: bool) -> dict:
    """One side before timing: whether it matches eager (`expected`; None for eager itself), a
    warm-up, then its counts."""
    matches = expected is None or _matches(_results(side), expected)
    call = side.call()
    for _ in range(warmup):  # first: JIT compiles, autotuning, lazy inits, caches
        call()
    fwd, bwd = dispatched_ops(side)
    launches = kernel_launches(call, device) if count_launches else {"kernels": None, "copies": None}
    return {"matches": matches, "fwd": fwd, "bwd": bwd, **launches}


def _row(case: OverheadCase, backend: str, options: OverheadOptions, fused: dict, eager: dict, samples: dict) -> dict:
    fused_us, eager_us = min(samples[backend]), min(samples["eager"])
    ratio = fused_us / eager_us
    names = lambda st: {"fwd": dict(st["fwd"]), "bwd": None if st["bwd"] is None else dict(st["bwd"])}
    return {
        "case": case.label,
        "name": case.name,
        "op": case.op,
        "mode": case.mode,
        "shape": "x".join(map(str, case.shape)),
        "backend": backend,
        "calls": options.calls,
        "repeats": options.repeats,
        "fused_us": fused_us,
        "eager_us": eager_us,
        "ratio": ratio,
        "target": case.target,
        "met": ratio <= case.target,
        "matches_eager": fused["matches"],
        "fused_ops_fwd": _count(fused["fwd"]),
        "fused_ops_bwd": _count(fused["bwd"]),
        "eager_ops_fwd": _count(eager["fwd"]),
        "eager_ops_bwd": _count(eager["bwd"]),
        "fused_launches": fused["kernels"],
        "eager_launches": eager["kernels"],
        "fused_copies": fused["copies"],
        "eager_copies": eager["copies"],
        "fused_op_names": names(fused),
        "eager_op_names": names(eager),
        "fused_repeats_us": samples[backend],
        "eager_repeats_us": samples["eager"],
    }


def run_case(case: OverheadCase, device: torch.device, backends: list[str], options: OverheadOptions) -> CaseResult:
    """Eager and the fused op on each backend: checked against eager, counted, then timed in turns."""
    result = CaseResult()
    fused, eager = case.build(device)
    count_launches = device.type == "cuda" if options.launches is None else options.launches
    warmup = options.warmup if options.warmup is not None else max(20, options.calls // 5)
    contexts = {"eager": contextlib.nullcontext, **{b: partial(fusedres.use_backend, b) for b in backends}}
    family = _FASTPATH_FAMILIES.get(case.family)
    if family is not None and family.has_fastpath():
        # The Python autograd path too: what runs where fusedres._fastpath does not load.
        for b in (b for b in backends if b in ("cpu", "cuda")):
            contexts[f"{b} {PYTHON_PATH}"] = partial(_on_python_path, b, family)
    sides = {name: (eager if name == "eager" else fused) for name in contexts}
    stats: dict[str, dict] = {}
    with torch.set_grad_enabled(case.backward):
        expected = _results(eager)
        for name, side in sides.items():
            try:
                with contexts[name]():
                    stats[name] = _prepare(side, None if name == "eager" else expected, warmup, device, count_launches)
            except Exception as e:
                result.failures.append(f"{case.label} {_who(name)}: {type(e).__name__}: {e}")
                continue
            if not stats[name]["matches"]:
                result.failures.append(f"{case.label} {_who(name)}: results differ from eager (rtol=atol=1e-4)")
        result.notes += result.failures
        if "eager" not in stats:
            return result
        gc.collect()  # once, not per block: with torch and transformers loaded a collection takes ~0.2 s
        samples = alternate({n: (sides[n].call(), contexts[n]) for n in stats}, options.calls, options.repeats, device)
    result.rows = [_row(case, n, options, stats[n], stats["eager"], samples) for n in stats if n != "eager"]
    return result


PYTHON_PATH = "python-path"  # a row label's suffix: the backend without fusedres._fastpath
_FASTPATH_FAMILIES = {"add_norm": add_norm_ops, "batch_norm": batch_norm_ops}  # the ops modules with a fast path


@contextlib.contextmanager
def _on_python_path(backend: str, family=add_norm_ops):
    with fusedres.use_backend(backend), family.without_fastpath():
        yield


@contextlib.contextmanager
def one_thread(device: torch.device):
    """One torch thread on CPU, as the host path of a call is what is measured; restored after."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(
    device: torch.device, cases: list[OverheadCase], options: OverheadOptions, progress: Callable[[str], None] = print
) -> CaseResult:
    """Every case on every selected backend: rows, notes and failures of all of them."""
    backends = overhead_backends(device, options.backends)
    total = CaseResult()
    for case in cases:
        result = run_case(case, device, backends, options)
        total.rows += result.rows
        total.notes += result.notes
        total.failures += result.failures
        line = ", ".join(f"{r['backend']} {r['ratio']:.2f}x" for r in result.rows) or "no rows"
        progress(f"{case.label}: fused/eager {line}")
    return total


# --- output --------------------------------------------------------------------------------------

HEADERS = [
    "case",
    "mode",
    "backend",
    "fused us",
    "eager us",
    "fused/eager",
    "target",
    "",
    "ops fwd",
    "ops bwd",
    "kernels",
]
RIGHT = {3, 4, 5, 6, 8, 9, 10}


def fmt_us(v) -> str:
    return "-" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _pair(fused, eager, missing: str = "-") -> str:
    """Two counts as "fused / eager", whole numbers without a fraction."""
    if fused is None and eager is None:
        return missing
    fmt = lambda v: "-" if v is None else f"{v:g}" if not float(v).is_integer() else str(int(v))
    return f"{fmt(fused)} / {fmt(eager)}"


def _launches(r: dict, device_type: str) -> str:
    if r.get("fused_launches") is None:
        return "n/a" if device_type == "cpu" else "-"
    cell = _pair(r["fused_launches"], r["eager_launches"])
    copies = r.get("fused_copies") or 0, r.get("eager_copies") or 0
    return cell + (f" (+{_pair(*copies)} copies)" if any(copies) else "")


def cells(rows: list[dict], device_type: str) -> list[list[str]]:
    return [
        [
            r["name"],
            r["mode"],
            r["backend"],
            fmt_us(r["fused_us"]),
            fmt_us(r["eager_us"]),
            f"{r['ratio']:.2f}x",
            f"<= {r['target']:.2f}x",
            "met" if r["met"] else "MISSED",
            _pair(r["fused_ops_fwd"], r["eager_ops_fwd"]),
            _pair(r["fused_ops_bwd"], r["eager_ops_bwd"]),
            _launches(r, device_type),
        ]
        for r in rows
    ]


def table(rows: list[dict], device_type: str) -> str:
    return report.text_table(HEADERS, report.blank_repeats(cells(rows, device_type)), RIGHT)


LEGEND = (
    "fused/eager: host time of fusedres over eager's, best of {repeats} blocks of {calls} calls each, "
    "taking turns in one process; target: the issue's bound (fwd no_grad <= 2.0x, fwd+bwd <= 1.25x). "
    "ops: dispatched ops per call, fused / eager (TorchDispatchMode; bwd counts torch.autograd.grad only). "
    "kernels: kernel launches per call, fused / eager (torch.profiler; CUDA only)."
)


def results_dict(environment: dict, args: dict, result: CaseResult, options: OverheadOptions) -> dict:
    return {
        "schema": SCHEMA,
        "kind": "overhead",
        "environment": environment,
        "args": args,
        "method": {
            "calls": options.calls,
            "repeats": options.repeats,
            "statistic": "min over repeats of the block mean",
            "targets": TARGETS,
        },
        "overhead": result.rows,
        "notes": list(result.notes),
    }


def markdown(results: dict) -> str:
    env, rows, method = results["environment"], results["overhead"], results["method"]
    device_type = env.get("device_type", "cpu")
    title = f"# fusedres host overhead per call: {env.get('device', '?')}, {str(env.get('timestamp', ''))[:10]}"
    parts = [title, report.markdown_table(["", ""], report.environment_cells(env))]
    if rows:
        met = sum(r["met"] for r in rows)
        parts += [
            f"## Fused vs eager ({met} of {len(rows)} within target)",
            report.markdown_table(HEADERS, report.blank_repeats(cells(rows, device_type)), RIGHT),
            LEGEND.format(**method),
        ]
    if results.get("notes"):
        parts += ["## Notes", "\n".join(f"- {n}" for n in results["notes"])]
    return "\n\n".join(parts) + "\n"
