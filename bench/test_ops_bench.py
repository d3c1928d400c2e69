"""pytest-benchmark view of the Add & Norm cases: `pytest bench --benchmark-json=out.json`.

Same cases, providers and parity rule as `python -m fusedres.bench`; the timer synchronizes CUDA.
Parity errors go into each benchmark's extra_info.
"""

from __future__ import annotations

import pytest
import torch

from fusedres.bench import add_norm, batch_norm, harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = add_norm.quick_cases(DEVICE) + batch_norm.quick_cases(DEVICE)
PROVIDERS = harness.providers(DEVICE)


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_fwd_bwd(benchmark, case, provider):
    fn = harness.provider_fn(provider, PROVIDERS[provider], case)
    benchmark.group = case.label
    benchmark.extra_info.update(harness.parity(case, DEVICE, {provider: fn})[provider])
    inputs = [t.requires_grad_() if t is not None else None for t in case.make_inputs(DEVICE)]
    wrt = [t for t in inputs if t is not None]

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs])

    benchmark.pedantic(_synchronized(step), rounds=10, warmup_rounds=2)
    assert benchmark.extra_info["pass"] is not False
