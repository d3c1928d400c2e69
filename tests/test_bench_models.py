"""The end-to-end bench (fusedres.bench.models) on tiny models: rows, speedups and the CLI."""

from __future__ import annotations

import contextlib
import json
import time

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


def test_dtype_trains_under_autocast_and_infers_with_the_model_in_it(monkeypatch):
    seen = []

    def record(pair, mode, reps):
        model = pair.variants["fused"]
        with pair.autocast:
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.append((mode, next(model.parameters()).dtype, pair.batch.dtype, autocast))
        return [{"median_ms": 1.0}, {"median_ms": 1.0}]  # (original, fused)

    monkeypatch.setattr(models._Pair, "rows", record)
    models.bench_model(tiny_case(), torch.device("cpu"), torch.bfloat16, reps=1)
    assert seen == [
        ("train", torch.float32, torch.float32, torch.bfloat16),
        ("inference", torch.bfloat16, torch.bfloat16, None),
    ]


def test_cli_dtype_bf16_runs_both_modes(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "default_cases", lambda device: {"tiny": tiny_case()})
    argv = ["--models", "tiny", "--device", "cpu", "--reps", "1", "--dtype", "bf16", "--out", str(tmp_path)]
    assert models.main(argv) == 0
    data = json.loads((tmp_path / "models.json").read_text())
    assert data["environment"]["autocast"] == "bfloat16"
    assert [(r["mode"], r["variant"]) for r in data["rows"]] == [
        (mode, variant) for mode in ("train", "inference") for variant in ("original", "fused")
    ]


def test_alternating_times_take_turns():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    samples = models.alternating_times(fns, torch.device("cpu"), reps=3)
    assert order == ["a", "b"] * 3
    assert all(len(v) == 3 and min(v) >= 0 for v in samples.values())


# --- --compile -------------------------------------------------------------------------------------


def tiny_block_case() -> models.ModelCase:
    """The smallest model fuse() changes: a conv-BN-ReLU stem and one BasicBlock, at 8x8."""
    from torchvision.models.resnet import BasicBlock

    def build():
        stem = [torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU()]
        return torch.nn.Sequential(*stem, BasicBlock(8, 8))

    return models.ModelCase(
        "tiny-block",
        "images",
        build,
        lambda dev: torch.randn(2, 3, 8, 8, device=dev).contiguous(memory_format=torch.channels_last),
        2,
        channels_last=True,
    )


def test_cli_compile_adds_compiled_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "default_cases", lambda device: {"tiny": tiny_block_case()})
    compile_calls, real_compile = [], torch.compile

    def spy(model, **kwargs):
        compile_calls.append((type(model).__name__, kwargs))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    args = ["--models", "tiny", "--device", "cpu", "--reps", "1", "--out", str(tmp_path)]
    assert models.main([*args, "--compile", "--compile-backend", "aot_eager"]) == 0
    # the plain model and its fused copy (fuse() swaps the BasicBlock's class, not the container's)
    assert compile_calls == [("Sequential", {"backend": "aot_eager"})] * 2
    data = json.loads((tmp_path / "models.json").read_text())
    assert data["environment"]["compile_backend"] == "aot_eager" and data["notes"] == []
    rows = data["rows"]
    assert [(r["mode"], r["variant"]) for r in rows] == [
        ("train", "original"),
        ("train", "fused"),
        ("inference", "original"),
        ("inference", "fused"),
        ("train", "compiled"),
        ("train", "fused compiled"),
        ("inference", "compiled"),
        ("inference", "fused compiled"),
    ]
    for r in rows:
        assert r["median_ms"] > 0 and r["throughput"] > 0
        if "compiled" in r["variant"]:
            # warm-up (compilation) is reported apart from the timed steps, and speedups are over torch.compile
            assert r["compile_s"] > 0 and r["baseline"] == "compiled"
        else:
            assert r["compile_s"] is None and r["baseline"] == "original"
    for mode in ("train", "inference"):
        compiled, fused = (r for r in rows if r["mode"] == mode and "compiled" in r["variant"])
        assert compiled["speedup"] == 1.0
        assert fused["speedup"] == pytest.approx(compiled["median_ms"] / fused["median_ms"])
    md = (tmp_path / "models.md").read_text()
    assert "fused compiled" in md and "compile s" in md


def test_compile_rows_are_time_boxed(monkeypatch):
    """A compilation past --compile-timeout leaves that mode's compiled pair out, with a note, and
    the eager rows stand. (A stand-in compile that sleeps: interrupting a real one is what the box
    is for, but it is slow to provoke.)"""

    class SlowToCompile(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.compiled = model, False

        def forward(self, x):
            if not self.compiled:
                time.sleep(5)
                self.compiled = True
            return self.model(x)

    monkeypatch.setattr(torch, "compile", lambda model, backend=None: SlowToCompile(model))
    notes = []
    options = models.CompileOptions(backend="stand-in", timeout_s=0.05, warmup=1)
    start = time.perf_counter()
    rows = models.bench_model(tiny_block_case(), torch.device("cpu"), None, reps=1, compile=options, notes=notes)
    assert time.perf_counter() - start < 4  # neither sleep ran out
    assert [r["variant"] for r in rows] == ["original", "fused"] * 2
    assert len(notes) == 2 and all("compilation took longer than 0.05 s" in n for n in notes)


def test_time_box_raises_past_its_seconds_and_restores_the_alarm():
    with pytest.raises(models.CompileTimeout):
        with models.time_box(0.05):
            time.sleep(2)
    with models.time_box(1.0):
        pass
    time.sleep(1.1)  # a stray alarm would raise here


def test_tails_records_every_fused_tail_and_bounds_the_model_speedup(tmp_path, monkeypatch):
    from fusedres.bench import tails

    monkeypatch.setattr(models, "default_cases", lambda device: {"resnet50": tiny_case()})
    result = tails.measure(tiny_case(), torch.device("cpu"), None, reps=1)
    # ResNet(BasicBlock, [1, 1, 1, 1]): the stem's conv-BN-ReLU and two tails per block (the
    # downsample BNs have no ReLU and stay torch's); the second tail of each block adds identity.
    assert sum(r["calls"] for r in result["rows"]) == 9
    assert sum(r["calls"] for r in result["rows"] if "bn+add+relu" in r["tail"]) == 4
    assert {r["tail"].split()[0] for r in result["rows"]} >= {"2x64x16x16", "2x64x8x8", "2x512x1x1"}
    eager, fused, step = result["tails_eager_ms"], result["tails_fused_ms"], result["step_ms"]
    assert eager == pytest.approx(sum(r["calls"] * r["eager_ms"] for r in result["rows"]))
    assert result["share"] == pytest.approx(eager / step)
    assert result["speedup_bound"] == pytest.approx(step / (step - (eager - fused)))
    assert tails.main(["--device", "cpu", "--reps", "1", "--out", str(tmp_path)]) == 0
    assert "share of the step" in (tmp_path / "tails.md").read_text()


def test_tails_restores_the_fused_function_after_recording():
    from fusedres.bench import tails
    from fusedres.nn import batch_norm

    before = batch_norm.bn_add_relu
    case = tiny_case()
    with pytest.raises(RuntimeError):
        tails.tail_calls(fusedres.fuse(case.build()), torch.randn(2, 5, 32, 32), contextlib.nullcontext())
    assert batch_norm.bn_add_relu is before


@pytest.mark.parametrize(
    "dtype_args, dtypes", [([], ("float32", "bfloat16")), (["--dtype", "bf16"], ("bfloat16",))], ids=["both", "bf16"]
)
def test_eval_rows_time_eager_fused_and_compile_with_freezing(tmp_path, monkeypatch, dtype_args, dtypes):
    """--models resnet50-eval: per dtype (fp32 and bf16, or the one --dtype names), eager, fused and
    torch.compile (Inductor with freezing; aot_eager here, for speed) inference rows; the compiled
    row reports its compile time."""
    import torch._inductor.config as inductor_config

    real_compile, frozen = torch.compile, []

    def spy(model, **kwargs):
        compiled = real_compile(model, backend="aot_eager")
        return lambda *a: frozen.append(inductor_config.freezing) or compiled(*a)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(models, "eval_cases", lambda device: {"tiny-eval": tiny_block_case()})
    args = ["--models", "tiny-eval", "--device", "cpu", "--reps", "1", "--out", str(tmp_path), *dtype_args]
    assert models.main(args) == 0
    rows = json.loads((tmp_path / "models.json").read_text())["rows"]
    assert [(r["dtype"], r["variant"]) for r in rows] == [
        (dtype, variant) for dtype in dtypes for variant in ("original", "fused", "compiled freezing")
    ]
    assert frozen and all(frozen[:2])  # compiled (the warm-up calls) with freezing on
    for r in rows:
        assert r["mode"] == "inference" and r["median_ms"] > 0 and r["baseline"] == "original"
        assert (r["compile_s"] is not None and r["compile_s"] > 0) == (r["variant"] == "compiled freezing")
        assert r["err_vs_fp64"] >= 0 and r["within_rule"], r  # against a float64 copy, the tests' rule
    md = (tmp_path / "models.md").read_text()
    assert "compiled freezing" in md and "max |out - float64 copy|" in md
