"""Loads fusedres._C (the C++/CUDA kernels). Never fatal: without it the Triton and reference
backends still work, and `python -m fusedres` reports why it did not load.

Before loading, the build info that setup.py recorded is compared with the running torch
(`check_compatibility`), so that the usual mismatches of a prebuilt wheel give one message that
names the mismatch and the remedy instead of a loader error; loader errors that still happen are
explained by `explain_load_error`. Both are pure functions (tests/test_packaging.py).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable

import torch

try:
    from fusedres._build_info import BUILD_INFO
except ImportError:  # a source tree that setup.py has not built
    BUILD_INFO = {"extension": False}

MIN_TORCH = (2, 10)
FROM_SOURCE = (
    "build fusedres from source against this torch (pip install --no-build-isolation --no-binary fusedres fusedres)"
)


def _version_tuple(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match[1]), int(match[2])) if match else None


def _major(cuda: str | None) -> str | None:
    return str(cuda).split(".")[0] if cuda else None


def check_compatibility(build_info: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why fusedres._C (as described by build_info) cannot load under this torch, or None."""
    running = _version_tuple(torch_version)
    if running is not None and running < MIN_TORCH:
        return (
            f"torch {torch_version} is older than 2.10, the stable ABI that fusedres._C is built for; "
            "upgrade torch: pip install 'torch>=2.10'"
        )
    built_cuda = build_info.get("cuda")
    if not built_cuda:  # CPU kernels only: they load under any torch >= 2.10, CUDA build or not
        return None
    if not torch_cuda:
        return (
            f"fusedres._C was built with CUDA {built_cuda} kernels but torch {torch_version} is not a CUDA build; "
            f"install a CUDA {_major(built_cuda)} build of torch, or {FROM_SOURCE}"
        )
    if _major(built_cuda) != _major(torch_cuda):
        return (
            f"fusedres._C was built for CUDA {built_cuda} but torch {torch_version} uses CUDA {torch_cuda}; "
            f"install the fusedres wheel built for CUDA {_major(torch_cuda)}, or {FROM_SOURCE}"
        )
    return None


def explain_load_error(error: BaseException, build_info: dict, torch_version: str, torch_cuda: str | None) -> str:
    """One message for an exception raised by importing fusedres._C."""
    msg = str(error)
    if isinstance(error, ModuleNotFoundError) and getattr(error, "name", None) == "fusedres._C":
        return "fusedres._C is not built (a source checkout?): pip install --no-build-isolation -e ."
    # The CUDA runtime, or torch's CUDA libraries (absent from a CPU build of torch), not found.
    missing = re.search(r"(libcudart|libtorch_cuda|libc10_cuda)\.so[.\d]*", msg)
    if missing and "undefined symbol" not in msg:
        built = build_info.get("cuda")
        needs = f"CUDA {_major(built)}" if built else "the CUDA that fusedres._C was built for"
        return (
            f"fusedres._C needs {missing[0]}, which was not found: torch {torch_version} (CUDA {torch_cuda or 'none'}) "
            f"does not provide it; install a torch built for {needs}, which brings it, or {FROM_SOURCE}"
        )
    if "undefined symbol" in msg and build_info.get("torch"):
        return (
            f"fusedres._C (built against torch {build_info['torch']}) does not fit torch {torch_version}: {msg}; "
            f"{FROM_SOURCE}"
        )
    return msg or f"fusedres._C failed to load ({type(error).__name__})"


def _import_extension() -> None:
    importlib.import_module("fusedres._C")  # registers the ops with the dispatcher


def load(
    build_info: dict | None = None,
    torch_version: str | None = None,
    torch_cuda: str | None = None,
    importer: Callable[[], None] = _import_extension,
) -> tuple[bool, str | None]:
    """(loaded, error): checks build_info against the running torch, then imports _C.

    The arguments default to this build and the running torch; tests pass others."""
    build_info = BUILD_INFO if build_info is None else build_info
    if torch_version is None:
        torch_version, torch_cuda = torch.__version__, torch.version.cuda
    error = check_compatibility(build_info, torch_version, torch_cuda)
    if error:
        return False, error
    try:
        importer()
    except (ImportError, OSError) as e:
        return False, explain_load_error(e, build_info, torch_version, torch_cuda)
    return True, None


EXTENSION_LOADED, EXTENSION_ERROR = load()


def fastpath_mismatch(build_info: dict, torch_version: str, torch_git: str | None, python_tag: str) -> str | None:
    """Why fusedres._fastpath (built as build_info says) cannot run here, or None.

    It is built against torch's C++ and Python APIs, which have no stable ABI: only the exact
    torch (version and commit) and CPython of the build will do."""
    built_for = build_info.get("fastpath")
    if not built_for:
        return "not built (FUSEDRES_FASTPATH=0, or no C++ extension)"
    built = f"torch {build_info.get('torch')} and {built_for}"
    if torch_version != build_info.get("torch") or torch_git != build_info.get("torch_git"):
        return f"built for {built}, running torch {torch_version}"
    if python_tag != built_for:
        return f"built for {built}, running {python_tag}"
    return None


def _import_fastpath():
    return importlib.import_module("fusedres._fastpath")


def load_fastpath(importer: Callable[[], object] = _import_fastpath) -> tuple[object | None, str | None]:
    """(fusedres._fastpath or None, why not): the eager add_norm, batch_norm_add_relu and frozen-BN
    conv calls as C++ autograd nodes. Without it fusedres/ops/{add_norm,batch_norm,conv_epilogue}.py
    run the same formulas as Python autograd.Functions.
    FUSEDRES_FASTPATH=0 in the environment (read once, here, at import) turns it off."""
    if not EXTENSION_LOADED:
        return None, "needs fusedres._C"
    if os.environ.get("FUSEDRES_FASTPATH", "1") == "0":
        return None, "off (FUSEDRES_FASTPATH=0)"
    python_tag = f"cpython-{sys.version_info[0]}{sys.version_info[1]}"
    why = fastpath_mismatch(BUILD_INFO, torch.__version__, torch.version.git_version, python_tag)
    if why:
        return None, why
    try:
        return importer(), None
    except (ImportError, OSError) as e:
        return None, f"failed to load: {e}"


FASTPATH, FASTPATH_ERROR = load_fastpath()


def has_cuda_kernels() -> bool:
    """True when _C loaded and was compiled with the CUDA kernels."""
    return EXTENSION_LOADED and bool(BUILD_INFO.get("cuda"))
