"""Which kernels run: "triton", "cuda", "cpu", "reference", or "auto" (the default).

Selection, most specific first: the `use_backend(name)` context, `set_backend(name)`, the
FUSEDRES_BACKEND environment variable, then "auto".
"""

from __future__ import annotations

import contextlib
import os

import torch

from fusedres._extension import EXTENSION_LOADED, has_cuda_kernels

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

_selected: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fusedres backend {name!r} (from {source}); valid backends: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Selects the backend for every fused op in this process."""
    global _selected
    _selected = _check_name(name, "set_backend")


def get_backend() -> str:
    """The selected backend name (possibly "auto")."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get("FUSEDRES_BACKEND", "auto"), "FUSEDRES_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Runs the enclosed code with the given backend, then restores the previous choice."""
    global _selected
    previous = _selected
    _selected = _check_name(name, "use_backend")
    try:
        yield
    finally:
        _selected = previous


def triton_usable(device: torch.device | str) -> bool:
    """Triton runs on CUDA GPUs, and on CPU tensors through Triton's interpreter when
    TRITON_INTERPRET=1 was set before fusedres was imported (how CI tests the kernels)."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable for tensors on `device` in this process, fastest first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and has_cuda_kernels() and torch.cuda.is_available():
        names.append("cuda")
    if device.type == "cpu" and EXTENSION_LOADED:
        names.append("cpu")
    if triton_usable(device):
        names.append("triton")
    names.append("reference")
    return names


def resolve_backend(device: torch.device) -> str:
    """The concrete backend that runs for tensors on `device`."""
    name = get_backend()
    usable = available_backends(device)
    if name == "auto":
        # The interpreter is for testing, never chosen automatically.
        if device.type == "cpu":
            return "cpu" if "cpu" in usable else "reference"
        return usable[0]
    if name not in usable:
        raise RuntimeError(
            f"fusedres backend {name!r} cannot run on {device.type} tensors here; usable: {', '.join(usable)} "
            "(see `python -m fusedres`)"
        )
    return name
