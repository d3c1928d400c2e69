"""Add & Norm benchmark cases: parity against float64 and timings per provider.

Providers: "eager" (the plain PyTorch expression), "compile" (torch.compile of it) and
"fusedres-<backend>" for each fusedres backend usable on the device (the Triton interpreter and
the reference backend are not timed: they are test vehicles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedres
from fusedres.bench.byte_model import add_norm_bytes
from fusedres.bench.timing import measure
from fusedres.reference import add_norm_reference, h_dtype_for
from fusedres.testing import max_abs_error, parity_bound, ref_scale


@dataclass(frozen=True)
class NormCase:
    m: int
    n: int
    dtype: torch.dtype
    rms_norm: bool
    prenorm: bool = False

    @property
    def op(self) -> str:
        return "add_rms_norm" if self.rms_norm else "add_layer_norm"

    @property
    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.op}{'/prenorm' if self.prenorm else ''} {self.m}x{self.n} {dt}"


def quick_cases(device: torch.device) -> list[NormCase]:
    if device.type == "cuda":
        return [NormCase(16384, n, torch.bfloat16, rms) for rms in (False, True) for n in (1024, 4096, 8192)]
    return [NormCase(8192, 1024, torch.float32, rms) for rms in (False, True)]


def full_cases(device: torch.device) -> list[NormCase]:
    if device.type != "cuda":
        return quick_cases(device) + [NormCase(2048, 4096, torch.float32, rms, True) for rms in (False, True)]
    # Hidden sizes of BERT-base/large, GPT-2, Llama-7B/70B at 16k tokens, pre- and post-norm.
    ns = (768, 1024, 2048, 4096, 8192, 16384)
    return [NormCase(16384, n, torch.bfloat16, rms, pre) for rms in (False, True) for pre in (False, True) for n in ns]


def make_inputs(case: NormCase, device, dtype=None, seed=0):
    dtype = dtype or case.dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x, residual = rand(case.m, case.n, shift=0.5), rand(case.m, case.n)
    weight = rand(case.n, scale=0.5, shift=1.0)
    bias = None if case.rms_norm else rand(case.n, scale=0.5)
    return x, residual, weight, bias


def eager_expression(case: NormCase):
    """The code fusedres replaces, as a user writes it."""

    def fn(x, residual, weight, bias):
        h = x + residual
        y = F.rms_norm(h, (case.n,), weight, 1e-6) if case.rms_norm else F.layer_norm(h, (case.n,), weight, bias, 1e-5)
        return (y, h) if case.prenorm else y

    return fn


def providers(device: torch.device, backends: list[str] | None = None) -> dict[str, object]:
    usable = [b for b in fusedres.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        usable = [b for b in usable if b != "triton"]  # the interpreter is for tests, not timing
    if backends:
        usable = [b for b in usable if b in backends]
    return {"eager": None, "compile": None, **{f"fusedres-{b}": b for b in usable}}


def provider_fn(name: str, backend: str | None, case: NormCase):
    eager = eager_expression(case)
    if name == "eager":
        return eager
    if name == "compile":
        # Timing backward alone re-runs it on one graph (retain_graph), which donated buffers forbid;
        # they save memory, not time.
        torch._functorch.config.donated_buffer = False
        return torch.compile(eager)

    def fused(x, residual, weight, bias):
        with fusedres.use_backend(backend):
            eps = 1e-6 if case.rms_norm else 1e-5
            return fusedres.add_norm(x, residual, weight, bias, eps, rms_norm=case.rms_norm, prenorm=case.prenorm)

    return fused


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def parity(case: NormCase, device, provider_fns: dict) -> dict[str, dict]:
    """Max abs error of outputs and grads vs float64, per provider, with pass/fail by the rule."""
    m = min(case.m, 512)  # parity does not need the full batch
    small = NormCase(m, case.n, case.dtype, case.rms_norm, case.prenorm)
    inputs = make_inputs(small, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    n_out = 2 if case.prenorm else 1
    upstream = [torch.randn(m, case.n, generator=gen).to(device, case.dtype).double() for _ in range(n_out)]

    def run(fn, tensors):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
        outs = _outputs(fn(*leaves))
        loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
        wrt = [t for t in leaves if t is not None]
        return list(outs) + list(torch.autograd.grad(loss, wrt))

    eps = 1e-6 if case.rms_norm else 1e-5
    ref = run(
        lambda *t: add_norm_reference(*t, eps, rms_norm=case.rms_norm, prenorm=case.prenorm),
        [t.double() if t is not None else None for t in inputs],
    )
    eager = run(eager_expression(small), inputs)
    eager_err = [max_abs_error(e, r) for e, r in zip(eager, ref)]
    report = {}
    for name, fn in provider_fns.items():
        errs = [max_abs_error(o, r) for o, r in zip(run(fn, inputs), ref)]
        # Only fusedres is held to the rule; eager and torch.compile are reported for comparison.
        ok = (
            all(e <= parity_bound(ee, case.dtype, ref_scale(r)) for e, ee, r in zip(errs, eager_err, ref))
            if name.startswith("fusedres")
            else None
        )
        report[name] = {"max_abs_error": max(errs), "eager_max_abs_error": max(eager_err), "pass": ok}
    return report


def bytes_moved(case: NormCase, direction: str) -> int:
    h_dtype = h_dtype_for(torch.empty(0, dtype=case.dtype), torch.empty(0, dtype=case.dtype), False)
    return add_norm_bytes(
        case.m,
        case.n,
        x_dtype=case.dtype,
        residual_dtype=case.dtype,
        h_dtype=h_dtype,
        weight_dtype=case.dtype,
        has_bias=not case.rms_norm,
        rms_norm=case.rms_norm,
        prenorm=case.prenorm,
        store_h=True,
        direction=direction,
    )


def _direction_runs(fn, inputs: list, wrt: list) -> dict:
    out = _outputs(fn(*inputs))
    grads_out = [torch.randn_like(o) for o in out]
    return {
        "fwd": lambda: fn(*inputs),
        "bwd": lambda: torch.autograd.grad(out, wrt, grads_out, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(_outputs(fn(*inputs)), wrt, grads_out),
    }


def time_case(case: NormCase, device, provider_fns: dict, directions=("fwd", "bwd", "fwd+bwd"), reps=20) -> list[dict]:
    inputs = [t.requires_grad_() if t is not None else None for t in make_inputs(case, device)]
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
                    "m": case.m,
                    "n": case.n,
                    "dtype": str(case.dtype).replace("torch.", ""),
                    "prenorm": case.prenorm,
                    "provider": name,
                    "direction": direction,
                    "median_ms": t.median_ms,
                    "p20_ms": t.p20_ms,
                    "p80_ms": t.p80_ms,
                    "gbps": bytes_moved(case, direction) / (t.median_ms * 1e-3) / 1e9,
                }
            )
    return rows
