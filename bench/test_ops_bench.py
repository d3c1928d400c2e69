"""pytest-benchmark view of the bench cases: `pytest bench --benchmark-json=out.json`.

The cases, providers and parity rule of `python -m fusedres.bench` (set with --bench-set). One
benchmark per case, provider and direction, grouped by case (op, form and shape) and direction.
Inputs rotate among copies as in the CLI, so GPU runs read them from HBM, and the timed call
ends with a CUDA synchronize (the untimed setup starts with one), so pytest-benchmark's wall
clock covers exactly the kernels of one call. The provider's parity errors against float64 are
in extra_info; a fusedres provider outside the rule fails its test.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fusedres.bench import harness, parity, providers, registry
from fusedres.bench.timing import l2_cache_bytes, rotation_copies

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS, _ = providers.providers(DEVICE)
# Every case compiles the same eager code objects anew; the default limit (8) would send later
# cases quietly back to eager.
torch._dynamo.config.recompile_limit = 256


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    case_set = metafunc.config.getoption("--bench-set") or ("quick" if DEVICE.type == "cuda" else "smoke")
    cases = [case for _, case in registry.select_cases(DEVICE, case_set)]
    params = [
        pytest.param(case, p, d, id=f"{case.label}-{p.name}-{d}".replace(" ", "-"))
        for case in cases
        for p in PROVIDERS
        for d in harness.DIRECTIONS
    ]
    metafunc.parametrize(("case", "provider", "direction"), params)


_built: dict = {}  # (case label, provider) -> (fn, parity report): once for all directions


def _fn_and_parity(case, provider):
    key = (case.label, provider.name)
    if key not in _built:
        fn = provider.make(case)
        report = parity.parity(case, case.make_inputs(DEVICE, small=True), {provider.name: fn})
        _built[key] = fn, report.get(provider.name, {})
    return _built[key]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _extra_info(report: dict) -> dict:
    """The parity report flattened to JSON scalars: pass, max errors, and each tensor's."""
    info = {k: v for k, v in report.items() if not isinstance(v, dict)}
    for name, t in report.get("tensors", {}).items():
        info[f"{name}_abs_error"] = t["abs"]
        info[f"{name}_rel_error"] = t["rel"]
    return info


def test_op(benchmark, request, case, provider, direction):
    reason = provider.skip_reason(case)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    fn, report = _fn_and_parity(case, provider)
    benchmark.group = f"{case.label} {direction}"
    benchmark.extra_info.update(_extra_info(report))
    assert not parity.failed(report), report

    copies = rotation_copies(harness.case_bytes(case, direction), l2_cache_bytes(DEVICE))
    first = harness.leaves(case.make_inputs(DEVICE))
    runs = itertools.cycle(
        [
            harness.make_run(fn, s, direction)
            for s in [first, *(harness.leaves(first, copy=True) for _ in range(copies - 1))]
        ]
    )

    def setup():
        _sync()
        return (next(runs),), {}

    def timed(run):
        run()
        _sync()

    benchmark.pedantic(timed, setup=setup, rounds=request.config.getoption("--bench-rounds"), warmup_rounds=2)
