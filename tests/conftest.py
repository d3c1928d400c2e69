"""Test setup: Triton's interpreter on GPU-less machines, and `gpu`-marked tests skipped cleanly."""

import os
import sys
import tempfile
import types

import torch

# tests/test_triton_launchers.py imports `tests.helpers`, a name that resolves only while the
# checkout's root is on sys.path, which PYTHONSAFEPATH=1 (the Quickstart's) keeps off it so that
# the installed wheel is what runs. This folder as the package `tests` serves that import without
# putting the root, and the checkout's fusedres with it, on sys.path.
if "tests" not in sys.modules:
    _package = types.ModuleType("tests")
    _package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules["tests"] = _package

# A fresh compile cache per run: a cached graph can outlive a change to an operator's schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fusedres-inductor-"))

# Triton reads this when kernels are defined, so it must be set before fusedres is imported:
# on a machine without a GPU the real Triton kernels then run through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedres  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    from fusedres._extension import EXTENSION_ERROR, EXTENSION_LOADED

    return [
        f"fusedres {fusedres.__version__}: _C loaded={EXTENSION_LOADED} ({EXTENSION_ERROR or 'ok'}), "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"backends cpu={fusedres.available_backends('cpu')}",
        _imported_from(),
    ]


def _imported_from() -> str:
    """Which fusedres the tests run: the installed wheel (site-packages) or this checkout."""
    package = os.path.dirname(os.path.abspath(fusedres.__file__))
    where = "site-packages" if os.path.basename(os.path.dirname(package)) == "site-packages" else "not site-packages"
    return f"fusedres imported from {package} ({where})"


def pytest_terminal_summary(terminalreporter):
    # `pytest -q` (the Quickstart) prints no header: say which fusedres ran at the end instead.
    if terminalreporter.verbosity < 0:
        for line in pytest_report_header(terminalreporter.config):
            terminalreporter.write_line(line)
