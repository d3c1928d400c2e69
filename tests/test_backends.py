"""Backend selection: names, the context manager, the environment variable, availability."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres import backends
from fusedres.backends import cuda_support, parse_arch_list, resolve_backend


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="valid backends: auto, triton, cuda, cpu, reference"):
        fusedres.set_backend("tensorrt")
    with pytest.raises(ValueError, match="unknown fusedres backend 'x'"):
        with fusedres.use_backend("x"):
            pass


def test_use_backend_restores_previous_choice():
    before = fusedres.get_backend()
    with fusedres.use_backend("reference"):
        assert fusedres.get_backend() == "reference"
        with fusedres.use_backend("auto"):
            assert fusedres.get_backend() == "auto"
        assert fusedres.get_backend() == "reference"
    assert fusedres.get_backend() == before


def test_set_backend_is_global():
    previous = fusedres.backends._selected
    fusedres.set_backend("reference")
    try:
        assert resolve_backend(torch.device("cpu")) == "reference"
    finally:
        fusedres.backends._selected = previous
        fusedres.backends._resolved.clear()
    assert fusedres.backends._selected == previous


def test_auto_on_cpu_prefers_cpp_kernels():
    expected = "cpu" if fusedres.EXTENSION_LOADED else "reference"
    with fusedres.use_backend("auto"):
        assert resolve_backend(torch.device("cpu")) == expected


def test_available_backends_cpu():
    names = fusedres.available_backends("cpu")
    assert names[-1] == "reference"
    assert ("cpu" in names) == fusedres.EXTENSION_LOADED
    assert ("triton" in names) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert "cuda" not in names


def test_unusable_backend_says_what_is_usable():
    # The cuda backend never runs on CPU tensors, GPU present or not.
    with fusedres.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run on cpu tensors here; usable:"):
        fusedres.add_layer_norm(torch.randn(2, 4))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_env_var_selects_backend():
    out = _run("import fusedres; print(fusedres.get_backend())", FUSEDRES_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_env_var_unknown_name_is_clear():
    out = _run("import torch, fusedres; fusedres.add_layer_norm(torch.randn(2, 4))", FUSEDRES_BACKEND="fast")
    assert out.returncode != 0
    assert "unknown fusedres backend 'fast' (from FUSEDRES_BACKEND)" in out.stderr


def test_environment_report_runs():
    out = subprocess.run([sys.executable, "-m", "fusedres"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for needle in ("fusedres", "torch", "triton", "_C loaded", "backends"):
        assert needle in out.stdout


# --- capability-aware selection (mocked GPUs: no GPU needed) ---------------------------------

WHEEL_ARCHS = "8.0;9.0+PTX"  # the default build (build_config.py)


@pytest.mark.parametrize(
    "capability,arch_list,usable,jit",
    [
        ((7, 5), WHEEL_ARCHS, False, False),  # T4: no SASS, and PTX cannot go backwards
        ((8, 0), WHEEL_ARCHS, True, False),  # A100
        ((8, 6), WHEEL_ARCHS, True, False),  # sm_80 SASS runs on every 8.x
        ((8, 9), WHEEL_ARCHS, True, False),
        ((9, 0), WHEEL_ARCHS, True, False),  # H100 / H200
        ((10, 0), WHEEL_ARCHS, True, True),  # B200: compute_90 PTX, compiled by the driver
        ((12, 0), WHEEL_ARCHS, True, True),
        ((9, 0), "8.0", False, False),  # SASS does not cross majors
        ((10, 0), "8.0;9.0", False, False),  # no PTX at all
        ((8, 9), "8.0 8.6", True, False),
        ((9, 0), "9.0a", True, False),
    ],
)
def test_cuda_support_by_capability(capability, arch_list, usable, jit):
    support = cuda_support(capability, arch_list)
    assert (support.usable, support.jit) == (usable, jit), support.why
    if not usable:
        assert f"sm_{capability[0]}{capability[1]}" in support.why


def test_parse_arch_list():
    assert parse_arch_list("8.0;9.0+PTX") == ({(8, 0), (9, 0)}, {(9, 0)})
    assert parse_arch_list("7.5 8.6+PTX") == ({(7, 5), (8, 6)}, {(8, 6)})
    assert parse_arch_list(None) == (set(), set())


def test_recorded_arch_list_covers_a100_h100_and_newer():
    """The arch list this wheel recorded (fusedres/_build_info.py) runs on sm_80 and sm_90 from
    SASS, on newer GPUs through PTX, and refuses sm_75 (which then falls back to reference)."""
    if not backends.has_cuda_kernels():
        pytest.skip("this build has no CUDA kernels (FUSEDRES_CUDA=0)")
    recorded = backends.BUILD_INFO["cuda_arch_list"]
    assert cuda_support((8, 0), recorded) == (True, False, "SASS for sm_80")
    assert cuda_support((9, 0), recorded) == (True, False, "SASS for sm_90")
    assert cuda_support((10, 0), recorded).jit
    assert not cuda_support((7, 5), recorded).usable


@pytest.fixture
def mocked_gpu(monkeypatch):
    """A CUDA device of a chosen capability, and a wheel with the default archs."""

    def make(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(backends, "_capability", lambda device: capability)
        monkeypatch.setattr(backends, "EXTENSION_LOADED", True)
        monkeypatch.setattr(backends, "has_cuda_kernels", lambda: True)
        monkeypatch.setattr(backends, "BUILD_INFO", {"cuda_arch_list": WHEEL_ARCHS})
        monkeypatch.setattr(backends, "_triton_importable", lambda: True)
        backends._resolved.clear()
        return torch.device("cuda", 0)

    yield make
    backends._resolved.clear()


@pytest.mark.parametrize(
    "capability,usable,auto",
    [
        ((7, 5), ["reference"], "reference"),
        ((8, 0), ["cuda", "triton", "reference"], "cuda"),
        ((9, 0), ["cuda", "triton", "reference"], "cuda"),
        ((10, 0), ["cuda", "triton", "reference"], "cuda"),
    ],
    ids=["sm_75", "sm_80", "sm_90", "sm_100"],
)
def test_auto_follows_the_device_capability(mocked_gpu, capability, usable, auto):
    device = mocked_gpu(capability)
    assert fusedres.available_backends(device) == usable
    with fusedres.use_backend("auto"):
        if capability == (10, 0):
            with pytest.warns(UserWarning, match="compiles it"):
                assert backends.resolve_backend(device) == auto
        else:
            assert backends.resolve_backend(device) == auto


def test_unusable_cuda_backend_says_why(mocked_gpu):
    device = mocked_gpu((7, 5))
    with fusedres.use_backend("cuda"), pytest.raises(RuntimeError, match="the wheel holds no code for sm_75"):
        backends.resolve_backend(device)
    with fusedres.use_backend("triton"), pytest.raises(RuntimeError, match="compute capability 8.0 and newer"):
        backends.resolve_backend(device)


def test_environment_report_says_why_per_backend():
    out = subprocess.run([sys.executable, "-m", "fusedres"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends (cpu)" in out.stdout
    assert "  cuda" in out.stdout and "CUDA tensors only" in out.stdout
