"""Loads fusedres._C (the C++/CUDA kernels). Never fatal: without it the Triton and reference
backends still work, and `python -m fusedres` reports why it did not load."""

from __future__ import annotations

import torch

try:
    from fusedres._build_info import BUILD_INFO
except ImportError:  # a source tree that setup.py has not built
    BUILD_INFO = {"extension": False}

MIN_TORCH = (2, 10)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _load() -> tuple[bool, str | None]:
    if _torch_version() < MIN_TORCH:
        return False, (
            f"torch {torch.__version__} is older than 2.10, the stable ABI fusedres._C is built for; "
            "upgrade torch (pip install 'torch>=2.10')"
        )
    try:
        import fusedres._C  # noqa: F401  (registers the ops with the dispatcher)
    except ImportError as e:
        msg = str(e)
        if "libcudart" in msg:
            return False, f"{msg}: the CUDA runtime is missing; install a CUDA build of torch"
        built_cuda = BUILD_INFO.get("cuda")
        if built_cuda and torch.version.cuda and built_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
            return False, (
                f"{msg}: fusedres was built for CUDA {built_cuda} but torch uses CUDA {torch.version.cuda}; "
                "install the fusedres build for your CUDA major or rebuild from source"
            )
        return False, msg or "fusedres._C is not built (pip install --no-build-isolation -e .)"
    except OSError as e:
        return False, str(e)
    return True, None


EXTENSION_LOADED, EXTENSION_ERROR = _load()


def has_cuda_kernels() -> bool:
    """True when _C loaded and was compiled with the CUDA kernels."""
    return EXTENSION_LOADED and bool(BUILD_INFO.get("cuda"))
