"""Test setup: Triton's interpreter on GPU-less machines, and `gpu`-marked tests skipped cleanly."""

import os
import tempfile

import torch

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


@pytest.fixture(params=["fastpath", "function"])
def autograd_path(request):
    """Runs a test on each of the eager paths of add_norm, batch_norm_add_relu and the frozen-BN conv
    under autograd: the C++ autograd nodes (fusedres._fastpath, built for one torch and CPython)
    and the Python autograd.Functions that run everywhere else. The fast path serves the C++
    backends; tests of other backends run once, as "function"."""
    from fusedres._extension import FASTPATH_ERROR
    from fusedres.ops import add_norm, batch_norm, conv_epilogue

    families = (add_norm, batch_norm, conv_epilogue)

    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None  # None: the default, auto
    if request.param == "function":
        with add_norm.without_fastpath(), batch_norm.without_fastpath(), conv_epilogue.without_fastpath():
            yield request.param
        return
    if backend not in (None, "auto", "cpu", "cuda"):
        pytest.skip(f"the fast path serves the cpu and cuda backends, not {backend}")
    if not all(f.has_fastpath() for f in families):
        pytest.skip(f"fusedres._fastpath: {FASTPATH_ERROR or 'built without every family'}")
    yield request.param


def pytest_report_header(config):
    from fusedres._extension import EXTENSION_ERROR, EXTENSION_LOADED, FASTPATH_ERROR

    return [
        f"fusedres {fusedres.__version__}: _C loaded={EXTENSION_LOADED} ({EXTENSION_ERROR or 'ok'}), "
        f"_fastpath {FASTPATH_ERROR or 'loaded'}, "
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
