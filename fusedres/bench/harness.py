"""What every benchmark case goes through: parity against float64, then timings per provider.

The case protocol (add_norm.py and batch_norm.py are the examples):
  required  label (unique), op, make_inputs(device, small=False) -> list of tensors (None for an
            absent optional input), eager() and fused() -> callables over those inputs;
  optional  dtype; reference() -> the float64 spec (without it, no parity); bytes_moved(direction)
            from byte_model.py (without it, no GB/s and no input rotation); input_names and
            output_names (for the parity report); plot_group, plot_x and plot_x_label (for the plots);
            directions (default fwd, bwd, fwd+bwd); cuda_graphs (False: never capture).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from fusedres.bench import parity
from fusedres.bench.registry import dtype_name
from fusedres.bench.timing import l2_cache_bytes, measure, peak_memory_mb, rotation_copies

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
# Calls whose forward moves less than this are timed in a CUDA graph: under ~100 us on a 3 TB/s
# GPU, where CPU launch and autograd overhead can exceed the GPU time itself.
GRAPH_BELOW_BYTES = 256 * 2**20


@dataclass
class TimingOptions:
    directions: tuple[str, ...] = DIRECTIONS
    warmup: int = 3
    reps: int = 20
    max_seconds: float = 1.0
    cuda_graphs: bool = True


@dataclass
class CaseResult:
    parity: dict = field(default_factory=dict)  # provider -> report (parity.py)
    rows: list = field(default_factory=list)  # one per provider and direction
    notes: list = field(default_factory=list)  # providers skipped or failed, and why
    failures: list = field(default_factory=list)  # fusedres parity failures and errors


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def leaves(inputs: list, copy: bool = False) -> list:
    """The inputs as fresh autograd leaves (new storage too with copy=True); non-floating inputs
    (token ids) are copied or passed as they are."""
    fresh = [t.detach().clone() if copy and isinstance(t, torch.Tensor) else t for t in inputs]
    return [t.detach().requires_grad_() if parity.differentiable(t) else t for t in fresh]


def _backward(outs, wrt: list, grads_out: list, retain_graph: bool = False):
    # Without differentiable inputs (a model fed token ids) the grads go to its parameters.
    if wrt:
        return torch.autograd.grad(outs, wrt, grads_out, retain_graph=retain_graph)
    return torch.autograd.backward(outs, grads_out, retain_graph=retain_graph)


def make_run(fn, inputs: list, direction: str):
    """A no-argument callable running one direction over `inputs` (from leaves()). bwd runs the
    forward once now and re-runs only the backward on that graph."""
    wrt = [t for t in inputs if parity.differentiable(t)]
    if direction == "fwd":
        return lambda: fn(*inputs)
    if direction == "bwd":
        out = _outputs(fn(*inputs))
        grads_out = [torch.randn_like(o) for o in out]
        return lambda: _backward(out, wrt, grads_out, retain_graph=True)
    if direction == "fwd+bwd":
        grads_out = [torch.randn_like(o) for o in _outputs(fn(*inputs))]
        return lambda: _backward(_outputs(fn(*inputs)), wrt, grads_out)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def case_bytes(case, direction: str) -> int | None:
    bytes_moved = getattr(case, "bytes_moved", None)
    return bytes_moved(direction) if bytes_moved else None


def uses_cuda_graph(case, device: torch.device, enabled: bool = True) -> bool:
    """Graphs for every provider and direction of a case alike, decided by its forward bytes."""
    if device.type != "cuda" or not enabled or not getattr(case, "cuda_graphs", True):
        return False
    fwd = case_bytes(case, "fwd")
    return fwd is not None and fwd < GRAPH_BELOW_BYTES


def _row(family, case, provider, direction, timing, copies, peak_mb) -> dict:
    nbytes = case_bytes(case, direction)
    return {
        "family": family,
        "case": case.label,
        "op": case.op,
        "dtype": dtype_name(getattr(case, "dtype", None)),
        "group": getattr(case, "plot_group", case.op),
        "x": getattr(case, "plot_x", case.label),
        "x_label": getattr(case, "plot_x_label", None),
        "provider": provider,
        "direction": direction,
        "method": timing.method,
        "copies": copies,
        "reps": timing.reps,
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "bytes": nbytes,
        "gbps": nbytes / (timing.median_ms * 1e-3) / 1e9 if nbytes else None,
        "peak_mb": peak_mb,
    }


def run_case(case, device: torch.device, providers: list, options: TimingOptions, family: str = "") -> CaseResult:
    result = CaseResult()
    # A fresh compiler per case: cases share their eager code objects, and dynamo's recompile
    # limit per code object would otherwise quietly send later cases back to eager.
    torch._dynamo.reset()
    fns = _build(case, providers, result)
    # Parity on the case's small inputs, as the tests: float64 copies of a 16k x 8k activation
    # would take gigabytes, and over millions of elements some land on the ReLU's kink, where
    # eager's own error becomes the size of a grad and the rule stops discriminating.
    result.parity = parity.parity(case, case.make_inputs(device, small=True), fns)
    for name, report in result.parity.items():
        if parity.failed(report):
            result.failures.append(f"{case.label} {name}: parity {report.get('error') or 'outside the bound'}")
    raised = {name for name, report in result.parity.items() if "error" in report}
    _time(case, device, {n: f for n, f in fns.items() if n not in raised}, options, family, result)
    return result


def _error(result: CaseResult, case, what: str, e: Exception) -> None:
    """A provider that raised: a note, and a failure when it is fusedres."""
    message = f"{what}: {type(e).__name__}: {e}"
    result.notes.append(message)
    if parity.is_judged(what):
        result.failures.append(f"{case.label} {message}")


def _build(case, providers: list, result: CaseResult) -> dict:
    fns = {}
    for p in providers:
        reason = p.skip_reason(case)
        if reason:
            result.notes.append(f"{p.name}: {reason}")
            continue
        try:
            fns[p.name] = p.make(case)
        except Exception as e:
            _error(result, case, p.name, e)
    return fns


def _time(case, device, fns: dict, options: TimingOptions, family: str, result: CaseResult) -> None:
    directions = [d for d in getattr(case, "directions", DIRECTIONS) if d in options.directions]
    graph = uses_cuda_graph(case, device, options.cuda_graphs)
    cache = l2_cache_bytes(device)
    copies = {d: rotation_copies(case_bytes(case, d), cache) for d in directions}
    inputs = leaves(case.make_inputs(device))
    input_sets = [inputs] + [leaves(inputs, copy=True) for _ in range(max(copies.values(), default=1) - 1)]
    # Graph capture happens on a side stream, and a captured backward must run there too: the
    # autograd engine puts it on its forward's stream, so the "bwd" runs' forwards go there.
    stream = torch.cuda.Stream(device) if graph else None
    if stream:
        stream.wait_stream(torch.cuda.current_stream(device))  # the inputs were written on the current one
    on_stream = (lambda: torch.cuda.stream(stream)) if stream else contextlib.nullcontext
    for name, fn in fns.items():
        for direction in directions:
            try:
                with on_stream():
                    runs = [make_run(fn, s, direction) for s in input_sets[: copies[direction]]]
                timing = measure(
                    runs,
                    device,
                    warmup=options.warmup,
                    reps=options.reps,
                    max_seconds=options.max_seconds,
                    cuda_graph=graph,
                    stream=stream,
                )
                with on_stream():
                    peak = peak_memory_mb(runs[0], device)
            except Exception as e:
                _error(result, case, f"{name} {direction}", e)
                continue
            finally:
                runs = None  # each run may hold a forward's saved tensors
            result.rows.append(_row(family, case, name, direction, timing, copies[direction], peak))


def add_derived(rows: list[dict], copy_gbps: float | None) -> None:
    """% of the measured copy bandwidth, and speedups over eager and torch.compile (their time
    divided by this row's, per case and direction)."""
    base = {(r["case"], r["direction"], r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        r["pct_copy"] = 100 * r["gbps"] / copy_gbps if r.get("gbps") and copy_gbps else None
        for ref in ("eager", "compile"):
            t = base.get((r["case"], r["direction"], ref))
            r[f"vs_{ref}"] = t / r["median_ms"] if t and r["median_ms"] > 0 else None


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None
