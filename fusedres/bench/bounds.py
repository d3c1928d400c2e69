"""How much of a transformer's step fuse()'s add -> norm sites can act on: the bound on the speedup.

As bench.tails does for ResNets: record the sites one step of fuse(model) fuses (the adds inside
blocks and those carried across blocks; shapes, dtypes and the model's own norm module), time each
distinct one as the original model runs it (``h = x + residual`` then the norm module; forward, and
in training the backward of both y and h, so autograd's accumulation of the residual stream's
grad is counted), and divide: the original step over the step with those sites taking no time is
the most fuse() can give, whatever its kernels do.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from dataclasses import dataclass

import torch

from fusedres.bench.timing import quantiles
from fusedres.convert import sites


@dataclass(frozen=True)
class SiteCall:
    shape: tuple[int, ...]
    x_dtype: torch.dtype
    residual_dtype: torch.dtype
    prenorm: bool
    norm: str  # the norm module's class, its parameters' dtype

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{dims} {self.norm}{' prenorm' if self.prenorm else ''} {str(self.x_dtype).removeprefix('torch.')}"


def site_calls(fused: torch.nn.Module, step) -> tuple[Counter, dict]:
    """The sites `step()` (one step of the fused model) fuses, counted, and a copy of a norm module
    (as the original model has it) per kind."""
    calls: Counter = Counter()
    norms: dict[SiteCall, torch.nn.Module] = {}
    original = sites._Fused.fused

    def record(self, module, norm, spec, x, residual, dyn, prenorm, folded, wide_y=False):
        param = next(norm.parameters(), None)
        cls = vars(type(norm)).get("_fusedres_original", type(norm))  # a norm carried into: its own class
        kind = f"{cls.__name__}[{str(param.dtype).removeprefix('torch.') if param is not None else '-'}]"
        call = SiteCall(tuple(x.shape), x.dtype, residual.dtype, prenorm, kind)
        calls[call] += 1
        if call not in norms:
            norms[call] = copy.deepcopy(norm).requires_grad_(True)
            norms[call].__class__ = cls
            norms[call].__dict__.pop(sites.LINK, None)
        return original(self, module, norm, spec, x, residual, dyn, prenorm, folded, wide_y)

    sites._Fused.fused = record
    try:
        step()
    finally:
        sites._Fused.fused = original
    return calls, norms


def eager_site(call: SiteCall, norm: torch.nn.Module, device, train: bool, autocast):
    """One site as the original model runs it: x + residual, then its norm module."""
    norm = copy.deepcopy(norm).to(device)  # its grads are its own
    x = torch.randn(call.shape, device=device, dtype=call.x_dtype, requires_grad=train)
    residual = torch.randn(call.shape, device=device, dtype=call.residual_dtype, requires_grad=train)
    wrt = (x, residual, *norm.parameters())
    grads = None

    def run():
        nonlocal grads
        with autocast:
            h = residual + x
            y = norm(h)
        if not train:
            return
        if grads is None:
            grads = [torch.randn_like(t) for t in (y, h)]
        outputs, seeds = ([y, h], grads) if call.prenorm else ([y], grads[:1])
        torch.autograd.grad(outputs, wrt, seeds)

    if train:
        return run

    @torch.no_grad()
    def infer():
        run()

    return infer


def bound(case, fused, batch, device, dtype, mode: str, step_ms: float, reps: int) -> dict | None:
    """{"share", "bound", "sites"} for one mode, given the original model's step time; None when
    the fused model fuses no add -> norm site (a ResNet: see bench.tails)."""
    from fusedres.bench import models

    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    train = mode == "train"
    fused.train(train)
    with torch.set_grad_enabled(train), autocast:
        calls, norms = site_calls(fused, lambda: case.loss(fused, batch))
    if not calls:
        return None
    total = 0.0
    for call, count in calls.items():
        fn = eager_site(call, norms[call], device, train, autocast)
        for _ in range(2):
            fn()
        total += count * quantiles(models.alternating_times({"site": fn}, device, reps)["site"]).median_ms
    return {
        "sites": sum(calls.values()),
        "sites_ms": total,
        "share": total / step_ms,
        "bound": step_ms / (step_ms - total) if total < step_ms else float("inf"),
    }
