"""What every benchmark case goes through: providers, parity against float64, timings.

A case (see add_norm.py, batch_norm.py) provides: `label`, `op`, `dtype`, `make_inputs(device,
small)` returning the differentiable inputs, `eager()` / `fused(backend)` / `reference()`
returning callables over those inputs, and `bytes_moved(direction)` from the byte model.

Providers: "eager" (the plain PyTorch expression), "compile" (torch.compile of it) and
"fusedres-<backend>" for each fusedres backend usable on the device (the Triton interpreter and
the reference backend are not timed: they are test vehicles).
"""

from __future__ import annotations

import torch

import fusedres
from fusedres.bench.timing import measure
from fusedres.testing import max_abs_error, parity_bound, ref_scale


def providers(device: torch.device, backends: list[str] | None = None) -> dict[str, str | None]:
    usable = [b for b in fusedres.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        usable = [b for b in usable if b != "triton"]  # the interpreter is for tests, not timing
    if backends:
        usable = [b for b in usable if b in backends]
    return {"eager": None, "compile": None, **{f"fusedres-{b}": b for b in usable}}


def provider_fn(name: str, backend: str | None, case):
    if name == "eager":
        return case.eager()
    if name == "compile":
        # Timing backward alone re-runs it on one graph (retain_graph), which donated buffers
        # forbid; they save memory, not time.
        torch._functorch.config.donated_buffer = False
        return torch.compile(case.eager())
    fused = case.fused()

    def fn(*inputs):
        with fusedres.use_backend(backend):
            return fused(*inputs)

    return fn


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def parity(case, device, provider_fns: dict) -> dict[str, dict]:
    """Max abs error of outputs and grads vs float64 per provider, with pass/fail by the tests' rule
    (only fusedres is held to it; eager and torch.compile are the reference points)."""
    inputs = case.make_inputs(device, small=True)
    gen = torch.Generator(device="cpu").manual_seed(1)
    probe = _outputs(case.eager()(*inputs))
    upstream = [torch.randn(o.shape, generator=gen).to(device, o.dtype).double() for o in probe]

    def run(fn, tensors):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
        outs = _outputs(fn(*leaves))
        loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
        return list(outs) + list(torch.autograd.grad(loss, [t for t in leaves if t is not None]))

    ref = run(case.reference(), [t.double() if t is not None else None for t in inputs])
    eager_err = [max_abs_error(e, r) for e, r in zip(run(case.eager(), inputs), ref)]
    report = {}
    for name, fn in provider_fns.items():
        errs = [max_abs_error(o, r) for o, r in zip(run(fn, inputs), ref)]
        ok = None
        if name.startswith("fusedres"):
            ok = all(e <= parity_bound(ee, case.dtype, ref_scale(r)) for e, ee, r in zip(errs, eager_err, ref))
        report[name] = {"max_abs_error": max(errs), "eager_max_abs_error": max(eager_err), "pass": ok}
    return report


def _direction_runs(fn, inputs: list, wrt: list) -> dict:
    out = _outputs(fn(*inputs))
    grads_out = [torch.randn_like(o) for o in out]
    return {
        "fwd": lambda: fn(*inputs),
        "bwd": lambda: torch.autograd.grad(out, wrt, grads_out, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(_outputs(fn(*inputs)), wrt, grads_out),
    }


def time_case(case, device, provider_fns: dict, directions=("fwd", "bwd", "fwd+bwd"), reps=20) -> list[dict]:
    inputs = [t.requires_grad_() if t is not None else None for t in case.make_inputs(device)]
    wrt = [t for t in inputs if t is not None]
    rows = []
    for name, fn in provider_fns.items():
        runs = _direction_runs(fn, inputs, wrt)
        for direction in directions:
            t = measure(runs[direction], device, reps=reps)
            rows.append(
                {
                    "case": case.label,
                    "op": case.op,
                    "dtype": str(case.dtype).replace("torch.", ""),
                    "provider": name,
                    "direction": direction,
                    "median_ms": t.median_ms,
                    "p20_ms": t.p20_ms,
                    "p80_ms": t.p80_ms,
                    "gbps": case.bytes_moved(direction) / (t.median_ms * 1e-3) / 1e9,
                }
            )
    return rows
