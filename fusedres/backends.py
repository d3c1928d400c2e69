"""Which kernels run: "triton", "cuda", "cpu", "reference", or "auto" (the default).

Selection, most specific first: the `use_backend(name)` context, `set_backend(name)`, the
FUSEDRES_BACKEND environment variable (read once, when fusedres is imported), then "auto".

The choice for a device is made once and cached (`resolve_backend`): per call, dispatch is a
dict lookup. `set_backend` and `use_backend` clear the cache. Whether a backend can run on a
device is decided from the device's compute capability and the CUDA archs the wheel was built
for (`cuda_support`), so a GPU the wheel has no code for falls back to Triton (or the eager
reference) instead of failing with "no kernel image is available".
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import NamedTuple

import torch

from fusedres._extension import BUILD_INFO, EXTENSION_ERROR, EXTENSION_LOADED, has_cuda_kernels

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
# Triton's supported NVIDIA GPUs: compute capability 8.0 and newer.
TRITON_MIN_CAPABILITY = (8, 0)

_ENV_BACKEND = os.environ.get("FUSEDRES_BACKEND")
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_selected: str | None = None
_resolved: dict[torch.device, str] = {}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fusedres backend {name!r} (from {source}); valid backends: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Selects the backend for every fused op in this process."""
    global _selected
    _selected = _check_name(name, "set_backend")
    _resolved.clear()


def get_backend() -> str:
    """The selected backend name (possibly "auto")."""
    if _selected is not None:
        return _selected
    return _check_name(_ENV_BACKEND, "FUSEDRES_BACKEND") if _ENV_BACKEND else "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Runs the enclosed code with the given backend, then restores the previous choice."""
    global _selected
    previous = _selected
    _selected = _check_name(name, "use_backend")
    _resolved.clear()
    try:
        yield
    finally:
        _selected = previous
        _resolved.clear()


# --- what can run where ---------------------------------------------------------------------


class Support(NamedTuple):
    usable: bool
    jit: bool  # usable through PTX that the driver compiles on first use
    why: str


def parse_arch_list(arch_list: str | None) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "8.6 9.0a") -> (archs with SASS, archs with PTX)."""
    sass, ptx = set(), set()
    for entry in (arch_list or "").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        number = entry.split("+")[0].rstrip("af")
        major, _, minor = number.partition(".")
        arch = (int(major), int(minor or 0))
        sass.add(arch)
        if entry.endswith("+PTX"):
            ptx.add(arch)
    return sass, ptx


def cuda_support(capability: tuple[int, int], arch_list: str | None) -> Support:
    """Whether CUDA kernels built for arch_list run on a device of this compute capability.

    SASS for sm_XY runs on sm_XZ with Z >= Y (same major); PTX for compute_XY is compiled by the
    driver for any newer device, once, on first use (seconds per kernel)."""
    sass, ptx = parse_arch_list(arch_list)
    name = f"sm_{capability[0]}{capability[1]}"
    if any(a[0] == capability[0] and a[1] <= capability[1] for a in sass):
        return Support(True, False, f"SASS for {name}")
    if any(a <= capability for a in ptx):
        best = max(a for a in ptx if a <= capability)
        return Support(True, True, f"PTX for compute_{best[0]}{best[1]}, compiled by the driver on first use")
    built = ", ".join(f"sm_{a}{b}" for a, b in sorted(sass)) or "none"
    return Support(False, False, f"the wheel holds no code for {name} (built for {built})")


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def backend_support(device: torch.device | str, capability: tuple[int, int] | None = None) -> dict[str, Support]:
    """Every backend's Support on `device` in this process (capability: a stand-in for the
    device's, for tests)."""
    device = torch.device(device)
    out = {}
    if device.type == "cuda":
        gpu = capability is not None or torch.cuda.is_available()
        if capability is None and gpu:
            capability = _capability(device)
        if not gpu:
            out["cuda"] = out["triton"] = Support(False, False, "no CUDA device is visible to torch")
        else:
            if not EXTENSION_LOADED:
                out["cuda"] = Support(False, False, f"fusedres._C not loaded: {EXTENSION_ERROR}")
            elif not has_cuda_kernels():
                out["cuda"] = Support(False, False, "fusedres._C was built without CUDA kernels")
            else:
                out["cuda"] = cuda_support(capability, BUILD_INFO.get("cuda_arch_list"))
            out["triton"] = _triton_support(capability)
        out["cpu"] = Support(False, False, "CPU tensors only")
    else:
        out["cuda"] = Support(False, False, "CUDA tensors only")
        if device.type != "cpu":
            out["cpu"] = out["triton"] = Support(False, False, f"no kernels for {device.type} tensors")
        else:
            out["cpu"] = (
                Support(True, False, "C++ kernels")
                if EXTENSION_LOADED
                else Support(False, False, f"fusedres._C not loaded: {EXTENSION_ERROR}")
            )
            out["triton"] = (
                Support(True, False, "Triton's interpreter (TRITON_INTERPRET=1: for testing, never chosen by auto)")
                if _TRITON_INTERPRET and _triton_importable()
                else Support(False, False, "CPU tensors only under TRITON_INTERPRET=1 (for testing)")
            )
    out["reference"] = Support(True, False, "eager PyTorch")
    return out


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_support(capability: tuple[int, int]) -> Support:
    if not _triton_importable():
        return Support(False, False, "triton is not installed")
    if tuple(capability) < TRITON_MIN_CAPABILITY:
        return Support(
            False, False, f"Triton supports compute capability 8.0 and newer, not {capability[0]}.{capability[1]}"
        )
    return Support(True, False, "Triton kernels")


def available_backends(device: torch.device | str = "cpu", capability: tuple[int, int] | None = None) -> list[str]:
    """Backends usable for tensors on `device` in this process, in auto's order of preference."""
    support = backend_support(device, capability)
    return [name for name in ("cuda", "cpu", "triton", "reference") if support[name].usable]


def _warn_jit(device: torch.device, why: str) -> None:
    warnings.warn(
        f"fusedres: the cuda backend on {device} runs from {why}: the first call of each kernel "
        "compiles it (seconds); later calls and processes reuse the driver's cache",
        stacklevel=4,
    )


def _resolve(device: torch.device) -> str:
    name = get_backend()
    support = backend_support(device)
    usable = [n for n in ("cuda", "cpu", "triton", "reference") if support[n].usable]
    if name == "auto":
        # The interpreter is for testing, never chosen automatically.
        name = next(n for n in usable if not (device.type == "cpu" and n == "triton"))
    elif name not in usable:
        why = "; ".join(f"{n}: {s.why}" for n, s in support.items() if not s.usable)
        raise RuntimeError(
            f"fusedres backend {name!r} cannot run on {device.type} tensors here; usable: {', '.join(usable)} "
            f"({why}; see `python -m fusedres`)"
        )
    if name == "cuda" and support["cuda"].jit:
        _warn_jit(device, support["cuda"].why)
    return name


@torch.compiler.assume_constant_result
def resolve_backend(device: torch.device) -> str:
    """The concrete backend that runs for tensors on `device` (cached until the selection changes;
    a constant of the graph for torch.compile, which does not trace the choice)."""
    name = _resolved.get(device)
    if name is None:
        name = _resolved[device] = _resolve(device)
    return name
