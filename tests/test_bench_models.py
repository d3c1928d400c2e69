"""The end-to-end bench (fusedres.bench.models) on tiny models: rows, speedups and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import fusedres
from fusedres.bench import models

torchvision = pytest.importorskip("torchvision")

if "cpu" not in fusedres.available_backends("cpu"):
    pytest.skip("needs the cpu kernel backend", allow_module_level=True)


def tiny_case() -> models.ModelCase:
    from torchvision.models.resnet import BasicBlock, ResNet

    return models.ModelCase(
        "tiny-resnet",
        "images",
        lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3),
        lambda dev: torch.randn(2, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last),
        2,
        channels_last=True,
    )


def test_bench_model_times_both_variants_in_both_modes():
    rows = models.bench_model(tiny_case(), torch.device("cpu"), None, reps=2)
    assert [(r["mode"], r["variant"]) for r in rows] == [
        ("train", "original"),
        ("train", "fused"),
        ("inference", "original"),
        ("inference", "fused"),
    ]
    for r in rows:
        assert r["median_ms"] > 0 and r["unit"] == "images/s" and r["peak_mem_gb"] is None
        assert r["throughput"] == pytest.approx(2 / (r["median_ms"] * 1e-3))
    for mode in ("train", "inference"):
        original, fused = (r for r in rows if r["mode"] == mode)
        assert original["speedup"] == 1.0
        assert fused["speedup"] == pytest.approx(original["median_ms"] / fused["median_ms"])
    assert "tiny-resnet" in models.format_rows(rows)


def test_cli_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "default_cases", lambda device: {"tiny": tiny_case()})
    assert models.main(["--models", "tiny", "--device", "cpu", "--reps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "models.json").read_text())
    assert len(data["rows"]) == 4 and data["environment"]["autocast"] == "none"
    assert "tiny-resnet" in (tmp_path / "models.md").read_text()
    with pytest.raises(SystemExit):
        models.main(["--models", "nope", "--device", "cpu"])
    assert "unknown model" in capsys.readouterr().err


def test_alternating_times_take_turns():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    samples = models.alternating_times(fns, torch.device("cpu"), reps=3)
    assert order == ["a", "b"] * 3
    assert all(len(v) == 3 and min(v) >= 0 for v in samples.values())
