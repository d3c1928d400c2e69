"""The benchmark's own pieces: byte model, timer, parity report, table."""

from __future__ import annotations

import torch

from fusedres.bench import harness
from fusedres.bench.__main__ import add_speedups, format_table
from fusedres.bench.add_norm import NormCase
from fusedres.bench.batch_norm import BNCase
from fusedres.bench.byte_model import add_norm_bytes, batch_norm_add_relu_bytes, copy_bytes
from fusedres.bench.timing import measure


def test_add_norm_byte_model():
    common = dict(
        x_dtype=torch.bfloat16,
        residual_dtype=torch.bfloat16,
        h_dtype=torch.bfloat16,
        weight_dtype=torch.bfloat16,
        has_bias=True,
        rms_norm=False,
        prenorm=False,
        store_h=True,
    )
    m, n = 16, 8
    fwd = add_norm_bytes(m, n, direction="fwd", **common)
    # read x, residual; write y, h (2 bytes each); weight + bias; mean + rstd in fp32
    assert fwd == m * n * 2 * 4 + n * 2 * 2 + m * 4 * 2
    bwd = add_norm_bytes(m, n, direction="bwd", **common)
    assert bwd == m * n * 2 * 3 + 2 * n * 2 * 2 + m * 4 * 2  # dy, h read; dx written
    assert add_norm_bytes(m, n, direction="fwd+bwd", **common) == fwd + bwd
    assert copy_bytes(10, torch.float32) == 80


def test_batch_norm_byte_model():
    kw = dict(dtype=torch.float32, residual=True, training=True)
    assert batch_norm_add_relu_bytes(100, 4, direction="fwd", **kw) == 100 * 4 * 4 + 4 * 16
    assert batch_norm_add_relu_bytes(100, 4, direction="bwd", **kw) == 100 * 4 * 7 + 4 * 16


def test_measure_reports_quantiles():
    t = measure(lambda: torch.randn(64, 64).sum(), "cpu", warmup=1, reps=5)
    assert t.reps == 5 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms


def test_parity_report_passes_for_fused_and_marks_references():
    for case in (
        NormCase(8, 32, torch.float32, rms_norm=False, prenorm=True),
        BNCase((2, 3, 4, 4), torch.float32, channels_last=True),
    ):
        fns = {
            name: harness.provider_fn(name, backend, case)
            for name, backend in harness.providers(torch.device("cpu")).items()
            if name != "compile"
        }
        report = harness.parity(case, torch.device("cpu"), fns)
        assert report["eager"]["pass"] is None
        for name, result in report.items():
            if name.startswith("fusedres"):
                assert result["pass"] is True, (case.label, name, result)


def test_table_has_speedups():
    rows = [
        {"case": "c", "direction": "fwd", "provider": p, "median_ms": ms, "gbps": 10.0}
        for p, ms in (("eager", 2.0), ("compile", 1.0), ("fusedres-cpu", 0.5))
    ]
    add_speedups(rows)
    assert rows[2]["vs_eager"] == 4.0 and rows[2]["vs_compile"] == 2.0
    table = format_table(rows, copy_gbps=20.0)
    assert "4.00x" in table and "50%" in table
