"""Backend selection: names, the context manager, the environment variable, availability."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres.backends import resolve_backend


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
    fusedres.set_backend("reference")
    try:
        assert resolve_backend(torch.device("cpu")) == "reference"
    finally:
        fusedres.set_backend("auto")


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
