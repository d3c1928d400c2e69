"""Packaging: the build configuration that setup.py and the wheel scripts share (build_config.py),
the load checks of fusedres._C (a wheel that does not fit the running torch gives one clear message
and leaves the Triton and reference backends working), and, after the Quickstart's
scripts/install.sh, that the tests run the installed wheel rather than this checkout.
scripts/check_wheel.py's own checks are in test_check_wheel.py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fusedres
from fusedres import _extension
from fusedres.__main__ import build_info_report

REPO = Path(__file__).resolve().parent.parent
# Written by scripts/install.sh into the venv it makes: the wheel installed there.
WHEEL_MARKER = Path(sys.prefix) / "fusedres-wheel.txt"
CUDA13_BUILD = {"extension": True, "torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda": "13.0"}
CPU_BUILD = {"extension": True, "torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda": None}
CUDART_MISSING = "libcudart.so.13: cannot open shared object file: No such file or directory"


def _never_called():
    raise AssertionError("_C must not be imported when the build does not fit torch")


# --- build_config.py: the defaults and the CUDA decision, defined once ----------------------------

BUILD_CONFIG = REPO / "build_config.py"  # not in the wheel: next to setup.py (and in the sdist)


@pytest.fixture
def build_config():
    spec = importlib.util.spec_from_file_location("build_config", BUILD_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toolkit(root: Path, *, runtime_header: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    if runtime_header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_arch_list(build_config):
    assert build_config.arch_list({}) == "8.0;9.0+PTX" == build_config.DEFAULT_ARCH_LIST
    assert build_config.arch_list({"TORCH_CUDA_ARCH_LIST": ""}) == "8.0;9.0+PTX"
    assert build_config.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0a"}) == "9.0a"


def test_find_cuda_home(build_config, tmp_path, monkeypatch):
    monkeypatch.setattr(build_config, "DEFAULT_CUDA_HOME", str(tmp_path / "no-cuda"))
    home, other = _toolkit(tmp_path / "cuda-13.0"), _toolkit(tmp_path / "cuda-12.8")
    empty = tmp_path / "empty"
    assert build_config.find_cuda_home({"CUDA_HOME": str(home), "CUDA_PATH": str(other), "PATH": ""}) == str(home)
    # a CUDA_HOME without nvcc is passed over, as setup.py always did
    assert build_config.find_cuda_home({"CUDA_HOME": str(empty), "CUDA_PATH": str(other), "PATH": ""}) == str(other)
    monkeypatch.setattr(build_config, "DEFAULT_CUDA_HOME", str(home))
    assert build_config.find_cuda_home({"PATH": ""}) == str(home)
    monkeypatch.setattr(build_config, "DEFAULT_CUDA_HOME", str(empty))
    # else the toolkit above the nvcc on PATH (through symlinks), if it has the runtime headers
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(other / "bin" / "nvcc")
    assert build_config.find_cuda_home({"PATH": str(tmp_path / "bin")}) == str(other)
    wrapper = _toolkit(tmp_path / "wrapper", runtime_header=False)
    assert build_config.find_cuda_home({"PATH": str(wrapper / "bin")}) is None
    assert build_config.find_cuda_home({"PATH": ""}) is None


@pytest.mark.parametrize(
    "mode, cuda_home, torch_cuda, expected",
    [
        ("auto", "/cuda", "13.0", True),
        ("auto", None, "13.0", False),
        ("auto", "/cuda", None, False),
        ("0", "/cuda", "13.0", False),
        ("1", "/cuda", "13.0", True),
        ("1", None, "13.0", "FUSEDRES_CUDA=1 but the CUDA kernels cannot be built: nvcc was not found (set CUDA_HOME)"),
        ("1", "/cuda", None, "FUSEDRES_CUDA=1 but the CUDA kernels cannot be built: torch was built without CUDA"),
    ],
)
def test_use_cuda(build_config, mode, cuda_home, torch_cuda, expected):
    if isinstance(expected, str):
        with pytest.raises(SystemExit, match=re.escape(expected)):
            build_config.use_cuda(mode, cuda_home, torch_cuda)
    else:
        assert build_config.use_cuda(mode, cuda_home, torch_cuda) is expected


def test_cuda_mode(build_config):
    assert build_config.cuda_mode({}) == "auto"
    assert build_config.cuda_mode({"FUSEDRES_CUDA": "AUTO"}) == "auto"
    assert build_config.cuda_mode({"FUSEDRES_CUDA": "1"}) == "1"
    with pytest.raises(SystemExit, match="FUSEDRES_CUDA must be auto, 0 or 1, got 'yes'"):
        build_config.cuda_mode({"FUSEDRES_CUDA": "yes"})


def _build_config_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    # The CLI that scripts/build_wheel.sh calls, with the Python running the tests (it has torch).
    env = {**os.environ, **env}
    return subprocess.run([sys.executable, str(BUILD_CONFIG), *args], capture_output=True, text=True, env=env)


def test_build_config_cli(tmp_path):
    assert _build_config_cli("arch-list", TORCH_CUDA_ARCH_LIST="").stdout == "8.0;9.0+PTX\n"
    assert _build_config_cli("arch-list", TORCH_CUDA_ARCH_LIST="9.0").stdout == "9.0\n"
    home = _toolkit(tmp_path / "cuda")
    assert _build_config_cli("cuda-home", CUDA_HOME=str(home)).stdout == f"{home}\n"
    assert _build_config_cli("cuda-mode", FUSEDRES_CUDA="0").stdout == "0\n"
    expected = "1" if torch.version.cuda else "0"
    assert _build_config_cli("cuda-mode", FUSEDRES_CUDA="auto", CUDA_HOME=str(home)).stdout == f"{expected}\n"
    bad = _build_config_cli("cuda-mode", FUSEDRES_CUDA="yes")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert "FUSEDRES_CUDA must be auto, 0 or 1" in bad.stderr
    assert _build_config_cli("cuda").returncode == 2


# --- the checks, as pure functions ---------------------------------------------------------------


def test_matching_builds_load():
    assert _extension.check_compatibility(CUDA13_BUILD, "2.14.1+cu130", "13.0") is None
    assert _extension.check_compatibility(CUDA13_BUILD, "2.10.0", "13.1") is None  # minor CUDA differs: fine
    assert _extension.check_compatibility(CPU_BUILD, "2.12.0+cu126", "12.6") is None  # CPU kernels: any torch
    assert _extension.check_compatibility(CPU_BUILD, "2.13.0+cpu", None) is None
    assert _extension.check_compatibility({"extension": False}, "2.14.1", None) is None
    assert _extension.load(CUDA13_BUILD, "2.14.1+cu130", "13.0", importer=lambda: None) == (True, None)


def test_torch_older_than_2_10():
    msg = _extension.check_compatibility(CPU_BUILD, "2.9.1+cu128", "12.8")
    assert msg.startswith("torch 2.9.1+cu128 is older than 2.10")
    assert "pip install 'torch>=2.10'" in msg
    assert _extension.load(CPU_BUILD, "2.9.1+cu128", "12.8", importer=_never_called) == (False, msg)


def test_cuda13_wheel_under_cuda12_torch():
    msg = _extension.check_compatibility(CUDA13_BUILD, "2.14.1+cu128", "12.8")
    assert "built for CUDA 13.0 but torch 2.14.1+cu128 uses CUDA 12.8" in msg
    assert "install the fusedres wheel built for CUDA 12" in msg
    assert "pip install --no-build-isolation" in msg
    assert _extension.load(CUDA13_BUILD, "2.14.1+cu128", "12.8", importer=_never_called) == (False, msg)


def test_cuda_wheel_under_cpu_only_torch():
    # _C links libcudart and torch's CUDA libraries: it cannot load under a CPU build of torch.
    msg = _extension.check_compatibility(CUDA13_BUILD, "2.14.1+cpu", None)
    assert "built with CUDA 13.0 kernels but torch 2.14.1+cpu is not a CUDA build" in msg
    assert "install a CUDA 13 build of torch" in msg
    assert "pip install --no-build-isolation" in msg


@pytest.mark.parametrize("error_type", [ImportError, OSError])
def test_missing_libcudart(error_type):
    def importer():
        raise error_type(CUDART_MISSING)

    loaded, msg = _extension.load(CUDA13_BUILD, "2.14.1+cu130", "13.0", importer=importer)
    assert not loaded
    assert msg.startswith("fusedres._C needs libcudart.so.13, which was not found")
    assert "install a torch built for CUDA 13" in msg
    assert "\n" not in msg


def test_other_load_errors():
    not_built = ModuleNotFoundError("No module named 'fusedres._C'", name="fusedres._C")
    assert "pip install --no-build-isolation -e ." in _extension.explain_load_error(not_built, {}, "2.14.1", None)
    no_torch_cuda = ImportError("libtorch_cuda.so: cannot open shared object file: No such file or directory")
    msg = _extension.explain_load_error(no_torch_cuda, CUDA13_BUILD, "2.14.1+cpu", None)
    assert msg.startswith("fusedres._C needs libtorch_cuda.so, which was not found: torch 2.14.1+cpu (CUDA none)")
    assert "install a torch built for CUDA 13" in msg
    symbol = ImportError("_C.abi3.so: undefined symbol: aoti_torch_new_thing")
    msg = _extension.explain_load_error(symbol, CPU_BUILD, "2.11.0", None)
    assert "built against torch 2.14.1+cu130" in msg and "torch 2.11.0" in msg and "aoti_torch_new_thing" in msg


def test_build_info_report():
    report = build_info_report({**CUDA13_BUILD, "nvcc": "13.0.88", "cuda_arch_list": "8.0;9.0+PTX"})
    assert report["_C CUDA kernels"] == "yes, CUDA 13.0 (nvcc 13.0.88), archs 8.0;9.0+PTX"
    assert report["_C built against torch"] == "2.14.1+cu130 (CUDA 13.0)"
    assert "none" in build_info_report({"extension": False})["_C build"]


# --- the same, end to end: `import fusedres` never fails ----------------------------------------

# Run in a fresh interpreter before fusedres is imported: fake a mismatch, then use the backends.
AFTER_IMPORT = """
import fusedres
from fusedres._extension import EXTENSION_ERROR, EXTENSION_LOADED
assert not EXTENSION_LOADED
print("ERROR:", EXTENSION_ERROR)
x, r = torch.randn(4, 32), torch.randn(4, 32)
want = torch.nn.functional.layer_norm(x + r, (32,))
for backend in fusedres.available_backends("cpu"):
    with fusedres.use_backend(backend):
        torch.testing.assert_close(fusedres.add_layer_norm(x, r), want)
print("BACKENDS:", fusedres.available_backends("cpu"))
"""
OLD_TORCH = "import torch\ntorch.__version__ = '2.9.1'\n"
MISSING_CUDART = f"""
import importlib.abc, sys, torch
class NoCudart(importlib.abc.MetaPathFinder):  # as the loader fails when libcudart is not found
    def find_spec(self, name, path=None, target=None):
        if name == "fusedres._C":
            raise ImportError({CUDART_MISSING!r})
sys.meta_path.insert(0, NoCudart())
"""


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    # The parent's sys.path, so that the child imports the same fusedres (installed or the checkout).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "setup, expected",
    [(OLD_TORCH, "torch 2.9.1 is older than 2.10"), (MISSING_CUDART, "fusedres._C needs libcudart.so.13")],
    ids=["old-torch", "missing-libcudart"],
)
def test_import_survives_and_backends_work(setup, expected):
    out = _fresh_python(setup + AFTER_IMPORT)
    assert out.returncode == 0, out.stderr
    assert f"ERROR: {expected}" in out.stdout
    assert "reference" in out.stdout.split("BACKENDS:")[1]


# --- the installed wheel (after scripts/install.sh) ---------------------------------------------


def _installed_wheel() -> str:
    if WHEEL_MARKER.exists():
        return WHEEL_MARKER.read_text().strip()
    if os.environ.get("FUSEDRES_TEST_INSTALLED") == "1" or os.environ.get("CI") == "true":
        pytest.fail(f"{WHEEL_MARKER} is missing: CI must test the wheel that scripts/install.sh installs")
    pytest.skip("not a venv made by scripts/install.sh (no fusedres-wheel.txt)")


def _site_packages() -> set[Path]:
    return {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}


def test_tests_import_the_installed_wheel():
    wheel = _installed_wheel()
    package = Path(fusedres.__file__).resolve().parent
    assert package.parent in _site_packages(), f"fusedres imported from {package}, not site-packages"
    assert package != REPO / "fusedres", "the checkout's fusedres, not the wheel"
    assert str(REPO) not in {str(Path(p).resolve()) for p in sys.path if p}, "the checkout is on sys.path"
    dist = importlib.metadata.distribution("fusedres")
    assert wheel.startswith(f"fusedres-{dist.version}-"), (wheel, dist.version)
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), "an editable install, not the wheel"

    assert fusedres.EXTENSION_LOADED, fusedres.EXTENSION_ERROR
    c_module = Path(sys.modules["fusedres._C"].__file__).resolve()
    assert c_module == package / "_C.abi3.so"
    if _extension.FASTPATH is not None:
        assert Path(_extension.FASTPATH.__file__).resolve().parent == package
    if torch.version.cuda and _extension.BUILD_INFO.get("cuda"):
        assert _extension.has_cuda_kernels()


def test_fastpath_can_be_turned_off():
    out = subprocess.run(
        [sys.executable, "-c", "from fusedres import _extension as e; print(e.FASTPATH, '|', e.FASTPATH_ERROR)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "FUSEDRES_FASTPATH": "0"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("|")[0].strip() == "None"
    assert "FUSEDRES_FASTPATH=0" in out.stdout or "not built" in out.stdout or "needs fusedres._C" in out.stdout


def test_subprocesses_import_the_installed_wheel_too():
    # Tests that start Python from the checkout's root (tests/test_backends.py) must see the wheel
    # as well: the Quickstart sets PYTHONSAFEPATH=1, which keeps the cwd off their sys.path.
    _installed_wheel()
    out = subprocess.run(
        [sys.executable, "-c", "import fusedres; print(fusedres.__file__)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == Path(fusedres.__file__).resolve()
