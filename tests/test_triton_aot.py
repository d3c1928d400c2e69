"""fusedres.triton.aot: every Triton specialization the launchers choose, compiled without a GPU.

Compiles and the enumeration run in a subprocess (`python -m fusedres.triton.aot`): the launchers
must choose GPU configurations, and tests/conftest.py sets TRITON_INTERPRET=1 on machines without
a GPU (the tool then runs itself again without it). In process: the verdict on spills and
compile failures, and that the tool calls the launchers exactly as fusedres/ops does.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres import available_backends
from fusedres.bench.add_norm import NormCase
from fusedres.bench.batch_norm import BNCase
from fusedres.bench.harness import make_run
from fusedres.bench.registry import select_cases

pytest.importorskip("triton")
from fusedres.triton import add_norm as triton_add_norm  # noqa: E402
from fusedres.triton import aot  # noqa: E402
from fusedres.triton import batch_norm as triton_batch_norm  # noqa: E402

KERNELS = {
    "_add_norm_fwd_kernel",
    "_add_norm_bwd_kernel",
    "_column_sum_kernel",
    "_reduce_partials_kernel",
    "_merge_partials_kernel",
    "_combine_stats_kernel",
    "_elementwise_kernel",
}
ARCHS = (80, 90)
# A representative subset of the bench's GPU cases (labels, as --shapes matches them): narrow
# and wide rows (float64 at 8192 is the looped backward), an fp32 residual stream, both BatchNorm
# layouts, training (with SyncBatchNorm's combine) and eval (with the folded conv's tail).
SUBSET = (
    "add_layer_norm 16384x768 float32",
    "add_rms_norm/prenorm/fp32res 16384x8192 bfloat16",
    "add_layer_norm/prenorm 16384x8192 float64",
    "bn_add_relu/train 256x256x56x56 nchw float32",
    "bn_add_relu/eval 256x2048x7x7 cl bfloat16",
    "bn_add_relu/train 256x1024x14x14 cl float64",
)


def run_aot(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m fusedres.triton.aot ARGS, importing the fusedres these tests import, with a fresh
    Triton cache (so that everything is compiled), without TRITON_INTERPRET unless env sets it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fusedres.__file__)))
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    command = [sys.executable, "-m", "fusedres.triton.aot", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)


def output(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"


def kernels_and_archs(rows: list[dict]) -> set:
    return {(r["name"], r["arch"]) for r in rows}


def test_representative_subset_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    dtypes = ("float32", "bfloat16", "float64")
    done = run_aot(tmp_path, "--arch", "80,90", "--dtypes", *dtypes, "--shapes", *SUBSET, "--json", str(out))
    assert done.returncode == 0, output(done)
    assert "specializations compiled; 0 failures" in done.stdout, output(done)
    rows = json.loads(out.read_text())
    assert rows and all(r["error"] is None and r["spill_bytes"] == 0 and r["regs"] > 0 for r in rows), output(done)
    assert kernels_and_archs(rows) == {(k, a) for k in KERNELS for a in ARCHS}
    assert {"*fp32", "*bf16", "*fp64"} <= {t for r in rows for _, t in r["signature"] if t.startswith("*")}
    constexprs = [dict(r["constexprs"]) for r in rows]
    assert {c["SINGLE_BLOCK"] for c in constexprs if "SINGLE_BLOCK" in c} == {True, False}
    assert {c["CHANNELS_LAST"] for c in constexprs if "CHANNELS_LAST" in c} == {True, False}


def configs(rows: list[dict], kernel: str, arch: int, *constexprs: str) -> set:
    """(num_warps, *constexpr values) of the kernel's specializations for arch."""
    return {
        (r["num_warps"], *(dict(r["constexprs"])[c] for c in constexprs))
        for r in rows
        if (r["name"], r["arch"]) == (kernel, arch)
    }


def bench_activations() -> set:
    """(channels_last, N, C, S) of the BatchNorm inputs of the bench's GPU set, at the timing and
    the parity shape."""
    shapes = set()
    with torch.device("meta"):
        for _, case in select_cases(torch.device("cuda"), "full", ops=["batch_norm"]):
            for small in (False, True):
                x = case.make_inputs("meta", small=small)[0]
                shapes.add((case.channels_last, x.shape[0], x.shape[1], math.prod(x.shape[2:])))
    return shapes


def test_full_enumeration_is_nonempty_deduplicated_and_from_the_config_functions(tmp_path):
    out = tmp_path / "aot.json"
    # Under TRITON_INTERPRET=1 the tool runs itself again without it.
    done = run_aot(tmp_path, "--list", "--json", str(out), env={"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, output(done)
    rows = json.loads(out.read_text())
    keys = [
        json.dumps([r[k] for k in ("kernel", "arch", "num_warps", "signature", "constexprs", "attrs")]) for r in rows
    ]
    assert rows and len(set(keys)) == len(keys)
    assert kernels_and_archs(rows) == {(k, a) for k in KERNELS for a in ARCHS}
    assert all(r["cases"] and "regs" not in r for r in rows)

    # The launch configurations are the config functions' for every shape and dtype of the set.
    hidden = {case.n for _, case in select_cases(torch.device("cuda"), "full", ops=["add_norm"])}
    dtypes = [getattr(torch, d) for d in aot.DTYPES]
    activations = bench_activations()
    for arch in ARCHS:
        for direction in ("fwd", "bwd"):
            config = getattr(triton_add_norm, f"add_norm_{direction}_config")
            flags = [()] if direction == "fwd" else [(), (False, True)]  # the backward's x transformed or not
            want = {
                (c.num_warps, c.single_block, c.block_n)
                for n in hidden
                for d in dtypes
                for f in flags
                for c in [config(n, d, *f)]
            }
            assert configs(rows, f"_add_norm_{direction}_kernel", arch, "SINGLE_BLOCK", "BLOCK_N") == want
        sms = aot.SM_COUNTS[arch]
        for kernel, config in (
            ("_elementwise_kernel", triton_batch_norm.bn_elementwise_config),
            ("_reduce_partials_kernel", functools.partial(triton_batch_norm.bn_reduce_config, sm_count=sms)),
        ):
            want = {(c.num_warps, cl, c.block_r, c.block_c) for cl, *s in activations for c in [config(cl, *s)]}
            assert configs(rows, kernel, arch, "CHANNELS_LAST", "BLOCK_R", "BLOCK_C") == want


def test_a_compile_failure_exits_nonzero(tmp_path):
    # A ptxas that reports the real one's version but fails every compile.
    from triton import knobs

    fake = tmp_path / "ptxas"
    real = knobs.nvidia.ptxas.path
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec "{real}" --version\necho "ptxas: failed" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    args = ("--arch", "90", "--shapes", "add_layer_norm 16384x768 float32", "--jobs", "1")
    done = run_aot(tmp_path, *args, env={"TRITON_PTXAS_PATH": str(fake)})
    assert done.returncode == 1, output(done)
    assert "compile failed: sm_90 _add_norm_fwd_kernel" in done.stdout, output(done)


def spec(name="_add_norm_bwd_kernel", arch=90, **constexprs) -> aot.Spec:
    constexprs = constexprs or {"IS_RMS": False, "SINGLE_BLOCK": True, "BLOCK_N": 8192}
    signature = (("DY", "*fp64"), *((k, "constexpr") for k in constexprs))
    return aot.Spec(f"fusedres.triton.add_norm:{name}", arch, 16, signature, tuple(constexprs.items()), (), ())


def test_report_fails_on_a_spill_or_a_compile_failure_unless_the_spill_is_known(capsys):
    clean = aot.Result(spec(), regs=120, spill_bytes=0, shared=128)
    spilled = aot.Result(spec(arch=80), regs=255, spill_bytes=96, shared=128)
    failed = aot.Result(spec("_column_sum_kernel", BLOCK_P=32), error="PTXASError: ptxas failed")
    assert aot.report([clean]) == 0
    assert aot.report([clean, spilled]) == 1
    assert "spills 96 bytes: sm_80 _add_norm_bwd_kernel IS_RMS=0 SINGLE_BLOCK=1 BLOCK_N=8192" in capsys.readouterr().out
    assert aot.report([clean, failed]) == 1
    assert "compile failed: sm_90 _column_sum_kernel BLOCK_P=32 | fp64: PTXASError" in capsys.readouterr().out
    known = {("_add_norm_bwd_kernel", "BLOCK_N=8192 SINGLE_BLOCK=1"): "measured: as fast as the loop"}
    assert aot.report([clean, spilled], known) == 0
    assert "(accepted: measured: as fast as the loop)" in capsys.readouterr().out
    assert aot.report([spilled], {("_add_norm_bwd_kernel", "BLOCK_N=4096"): "another block"}) == 1
    assert aot.KNOWN_SPILLS == {}, "every accepted spill needs its reason, and ideally there is none"


# --- the tool calls the launchers as fusedres/ops does ------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_CASES = [
    ("add_norm", NormCase(8, 64, torch.float32, rms_norm=False)),
    ("add_norm", NormCase(8, 64, torch.bfloat16, rms_norm=True, prenorm=True)),
    ("add_norm", NormCase(8, 64, torch.bfloat16, rms_norm=True, prenorm=True, residual_in_fp32=True)),
    ("add_norm", NormCase(8, 64, torch.float16, rms_norm=False, prenorm=True, residual_in_fp32=True)),
    ("add_norm", NormCase(8, 64, torch.bfloat16, rms_norm=False, dropout_p=0.1)),  # the bench's feature cases
    ("add_norm", NormCase(8, 64, torch.float32, rms_norm=False, prenorm=True, scales=True)),
    ("batch_norm", BNCase((2, 8, 4, 4), torch.float32, channels_last=False, training=True)),
    ("batch_norm", BNCase((2, 8, 4, 4), torch.bfloat16, channels_last=True, training=True)),
    ("batch_norm", BNCase((2, 8, 4, 4), torch.float64, channels_last=False, training=False)),
    ("batch_norm", BNCase((2, 8, 4, 4), torch.bfloat16, channels_last=True, training=False)),
]


def describe(v):
    return ("tensor", v.dtype, tuple(v.shape), v.stride()) if isinstance(v, torch.Tensor) else v


def recording(calls: list, name: str, launcher):
    """launcher, recording (name, described arguments) of each call in calls."""

    def call(*args):
        calls.append((name, [describe(a) for a in args]))
        return launcher(*args)

    return call


def aot_call(calls: list, name: str, *args):
    """The tool's `call` (aot.case_variants), running the launcher itself, recorded in calls."""
    return recording(calls, name, aot._LAUNCHERS[name])(*args)


def ops_calls(monkeypatch, family: str, case, variant: str) -> list:
    """The launcher calls fusedres/ops makes for the variant of the case, run as the bench runs it."""
    from fusedres.ops import add_norm as ops_add_norm
    from fusedres.ops import batch_norm as ops_batch_norm

    calls = []
    if family == "add_norm":
        kernels = ops_add_norm._KERNELS["triton"]
        spies = {f: recording(calls, f"add_norm_{f}", getattr(kernels, f)) for f in ("fwd", "bwd")}
        spies["inplace_op"] = recording(calls, "add_norm_inplace", kernels.inplace_op)
        monkeypatch.setitem(ops_add_norm._KERNELS, "triton", kernels._replace(**spies))
    else:
        direct, registered = ops_batch_norm._KERNELS["triton"]
        spies = {f: recording(calls, n, getattr(direct, f)) for f, n in zip(direct._fields, ops_batch_norm.OP_NAMES)}
        monkeypatch.setitem(ops_batch_norm._KERNELS, "triton", (direct._replace(**spies), registered))
    inputs = [t.requires_grad_() if t is not None else None for t in case.make_inputs(DEVICE, small=True)]
    with fusedres.use_backend("triton"):
        if variant == "features":
            x, residual, weight, bias, *_ = inputs
            rowscale, colscale = aot.feature_scales(x, weight)
            params = (weight,) if case.rms_norm else (weight, bias)
            fn = fusedres.add_rms_norm if case.rms_norm else fusedres.add_layer_norm
            *out, _mask = fn(
                x, residual, *params, case.eps, prenorm=case.prenorm, residual_in_fp32=case.residual_in_fp32,
                rowscale=rowscale, colscale=colscale.requires_grad_(), **aot.FEATURES,
            )  # fmt: skip
            torch.autograd.backward(out, [torch.randn_like(o) for o in out])
        elif variant == "inplace":
            x, residual, weight, bias, *_ = inputs
            _, colscale = aot.feature_scales(x, weight)
            with torch.no_grad():
                ops_add_norm.add_norm_(
                    x, residual, weight, bias, case.eps, rms_norm=case.rms_norm, colscale=colscale,
                    weight_offset=aot.FEATURES["weight_offset"],
                )  # fmt: skip
        elif variant == "grad":
            make_run(case.fused(), inputs, "bwd")()  # the forward, then the backward
        elif variant == "folded":
            with torch.no_grad():
                ops_batch_norm.bias_add_relu(inputs[0], inputs[3], inputs[1])
        else:
            with torch.no_grad():
                case.fused()(*inputs)
    return calls


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason=f"triton cannot run on {DEVICE}")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the tool's grads are torch.empty: any values
@pytest.mark.parametrize("family, case", SMALL_CASES, ids=[case.label for _, case in SMALL_CASES])
def test_launcher_calls_are_those_of_fusedres_ops(monkeypatch, family, case):
    """Each variant the tool plans (but SyncBatchNorm's, which needs torch.distributed) calls the
    launchers as fusedres/ops does for the bench's calls (for Add & Norm's residual features and in
    place, for the public functions' calls with aot.FEATURES): the same launchers in the same
    order, None where it passes None, tensors of the same dtypes, shapes and strides, the same
    flags."""
    variants = dict(aot.case_variants(family, case))
    extra = {"features", "inplace"} if family == "add_norm" else {"sync" if case.training else "folded"}
    assert set(variants) == {"grad", "no_grad", *extra}
    variants.pop("sync", None)
    for variant, calls_of in variants.items():
        ours = []
        calls_of(functools.partial(aot_call, ours), inputs=case.make_inputs(DEVICE, small=True))
        theirs = ops_calls(monkeypatch, family, case, variant)
        assert ours == theirs, f"{case.label} {variant}:\n aot: {ours}\n ops: {theirs}"
