"""`python -m fusedres.bench --overhead`: host time, dispatched ops and kernel launches per call,
fused vs eager. On the CPU at a few calls per block: the schema and the counting, not the speed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres.bench import cli, overhead
from fusedres.ops import add_norm, batch_norm

CPU = torch.device("cpu")
BACKENDS = [b for b in fusedres.available_backends("cpu") if b != "triton"]
TINY = ["--overhead", "--device", "cpu", "--calls", "5", "--repeats", "2"]


def _run(tmp_path, *extra) -> tuple[int, dict, str]:
    rc = cli.main([*TINY, "--out", str(tmp_path), "--name", "t", *extra])
    results = json.loads((tmp_path / "t-overhead.json").read_text())
    return rc, results, (tmp_path / "t-overhead.md").read_text()


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def test_cli_overhead_writes_every_case_and_backend(tmp_path, capsys):
    threads = torch.get_num_threads()
    rc, results, md = _run(tmp_path)
    assert rc == 0
    assert torch.get_num_threads() == threads  # one thread while timing, then restored
    env = results["environment"]
    assert results["kind"] == "overhead" and results["schema"] == overhead.SCHEMA
    assert env["device_type"] == "cpu" and env["threads"] == 1 and env["torch"] == torch.__version__
    assert results["method"]["calls"] == 5 and results["method"]["repeats"] == 2
    rows = results["overhead"]
    # With fusedres._fastpath, add-norm and BatchNorm cases also time the Python path of each C++ backend.
    python_path = [f"{b} {overhead.PYTHON_PATH}" for b in BACKENDS if b in ("cpu", "cuda")]
    families = {"add_norm": add_norm, "batch_norm": batch_norm}
    expected = [
        (c.label, b)
        for c in overhead.CASES
        for b in BACKENDS + (python_path if families[c.family].has_fastpath() else [])
    ]
    assert [(r["case"], r["backend"]) for r in rows] == expected
    assert {r["case"] for r in rows} == {
        "add_layer_norm fwd no_grad",
        "add_layer_norm fwd+bwd",
        "add_rms_norm prenorm fwd+bwd",
        "BatchNormAddReLU2d train fwd+bwd",
        "BatchNormAddReLU2d eval fwd no_grad",
    }
    for r in rows:
        where = f"{r['case']} {r['backend']}"
        assert r["fused_us"] > 0 and r["eager_us"] > 0, where
        assert len(r["fused_repeats_us"]) == len(r["eager_repeats_us"]) == 2, where
        assert r["fused_us"] == min(r["fused_repeats_us"]) and r["eager_us"] == min(r["eager_repeats_us"]), where
        assert r["ratio"] == pytest.approx(r["fused_us"] / r["eager_us"]), where
        assert r["target"] == (1.25 if r["mode"] == "fwd+bwd" else 2.0), where
        assert r["met"] == (r["ratio"] <= r["target"]), where
        assert r["matches_eager"] is True, where
        assert _is_count(r["fused_ops_fwd"]) and _is_count(r["eager_ops_fwd"]), where
        assert r["fused_ops_fwd"] == sum(r["fused_op_names"]["fwd"].values()), where
        if r["mode"] == "fwd+bwd":
            assert _is_count(r["fused_ops_bwd"]) and _is_count(r["eager_ops_bwd"]), where
        else:
            assert r["fused_ops_bwd"] is None and r["eager_ops_bwd"] is None, where
        assert r["fused_launches"] is None and r["eager_launches"] is None, where  # CUDA only
    out = capsys.readouterr().out
    assert "fused/eager" in out and "<= 1.25x" in out and "n/a" in out
    assert "| add_rms_norm prenorm | fwd+bwd |" in md and "within target" in md


def test_eager_op_counts_are_the_ops_eager_dispatches(tmp_path):
    """LayerNorm(x + r) is an add and a native_layer_norm forward, one native_layer_norm_backward."""
    _, results, _ = _run(tmp_path, "--ops", "add_layer_norm", "--backends", "reference")
    fwd, fwd_bwd = results["overhead"]
    assert fwd["eager_op_names"] == {"fwd": {"aten.add.Tensor": 1, "aten.native_layer_norm.default": 1}, "bwd": None}
    assert fwd_bwd["eager_op_names"]["bwd"] == {"aten.native_layer_norm_backward.default": 1}
    assert fwd_bwd["eager_ops_bwd"] == 1


def test_a_fused_side_that_disagrees_with_eager_fails_the_run(tmp_path, monkeypatch, capsys):
    wrong = lambda x, r, w, b, eps: F.layer_norm(x - r, x.shape[-1:], w, b, eps)  # subtracts the residual
    monkeypatch.setattr(fusedres, "add_layer_norm", wrong)
    rc, results, _ = _run(tmp_path, "--ops", "add_layer_norm", "--backends", "reference")
    assert rc == 1
    assert [r["matches_eager"] for r in results["overhead"]] == [False, False]
    assert "results differ from eager" in capsys.readouterr().err


def test_cli_lists_filters_and_rejects_what_it_does_not_use(capsys):
    assert cli.main([*TINY, "--list", "--ops", "batch_norm"]) == 0
    out = capsys.readouterr().out
    assert "BatchNormAddReLU2d train fwd+bwd" in out and "add_layer_norm" not in out
    assert cli.main([*TINY, "--backends", "no-such-backend"]) == 2
    with pytest.raises(SystemExit):
        cli.main([*TINY, "--shapes", "x64"])


def test_op_counter_counts_forward_and_backward_apart():
    x = torch.randn(3, requires_grad=True)
    side = overhead.Side(lambda: (x * 2).relu(), (x,), torch.ones(3))
    fwd, bwd = overhead.dispatched_ops(side)
    # relu saves its output for the backward: a detach besides the two ops
    assert fwd["aten.mul.Tensor"] == 1 and fwd["aten.relu.default"] == 1
    assert bwd["aten.threshold_backward.default"] == 1 and "aten.relu.default" not in bwd
    fwd, bwd = overhead.dispatched_ops(overhead.Side(lambda: x + 1))
    assert fwd == {"aten.add.Tensor": 1} and bwd is None


def test_launch_counts_keep_gpu_kernels_per_call():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = lambda device, kind, name="k": SimpleNamespace(device_type=device, activity_type=kind, name=name)
    events = [ev(cuda, "kernel")] * 6 + [ev(cuda, "gpu_memcpy"), ev(cpu, "cpu_op"), ev(cpu, "cuda_runtime")]
    assert overhead.launch_counts(events, calls=3) == {"kernels": 2.0, "copies": 1 / 3}
    # without an activity type (older profilers) copies and fills are told by name
    old = [ev(cuda, None, "void at::native::kernel"), ev(cuda, None, "Memset (Device)")]
    assert overhead.launch_counts(old, calls=1) == {"kernels": 1.0, "copies": 1.0}


def test_sides_take_turns_and_report_per_call_time():
    order = []
    sides = {name: (lambda n=name: order.append(n), overhead.contextlib.nullcontext) for name in "abc"}
    samples = overhead.alternate(sides, calls=2, repeats=3, device=CPU)
    assert order == [*"aabbcc", *"ccbbaa", *"aabbcc"]
    assert all(len(v) == 3 and min(v) > 0 for v in samples.values())


def test_triton_is_timed_only_off_the_interpreter(monkeypatch):
    monkeypatch.setattr(fusedres, "available_backends", lambda device: ["cuda", "triton", "reference"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert overhead.overhead_backends(torch.device("cuda")) == ["cuda", "triton", "reference"]
    assert overhead.overhead_backends(CPU) == ["cuda", "reference"]
    assert overhead.overhead_backends(torch.device("cuda"), ["triton"]) == ["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert overhead.overhead_backends(torch.device("cuda")) == ["cuda", "reference"]
