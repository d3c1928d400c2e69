"""Build facts that setup.py, scripts/build_wheel.sh and scripts/check_wheel.py share, defined once.

    python build_config.py arch-list   TORCH_CUDA_ARCH_LIST, else the default (8.0;9.0+PTX)
    python build_config.py cuda-home   the CUDA toolkit setup.py builds with; empty when none is found
    python build_config.py cuda-mode   FUSEDRES_CUDA resolved: 1 (build the CUDA kernels) or 0;
                                       exits 1 with the reason when FUSEDRES_CUDA=1 cannot be met

Stdlib only (setup.py imports it before torch, and an sdist carries it: MANIFEST.in); not part of
the wheel. `cuda-mode` imports torch from the Python that runs it: run it with the build's Python.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping

# sm_80 and sm_90 code, plus compute_90 PTX that newer GPUs JIT-compile.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
CUDA_MODES = ("auto", "0", "1")
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def arch_list(env: Mapping[str, str] = os.environ) -> str:
    return env.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def find_cuda_home(env: Mapping[str, str] = os.environ) -> str | None:
    """CUDA_HOME, CUDA_PATH or /usr/local/cuda, the first with bin/nvcc; else the toolkit above the
    nvcc on PATH. torch guesses CUDA_HOME from `which nvcc` alone, which is wrong when nvcc is a
    wrapper script outside the toolkit: setup.py settles it before torch.utils.cpp_extension is
    imported (a wrapper is not followed: set CUDA_HOME then)."""
    for candidate in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), DEFAULT_CUDA_HOME):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cuda_mode(env: Mapping[str, str] = os.environ) -> str:
    """FUSEDRES_CUDA, checked: auto (the default), 0 or 1."""
    mode = env.get("FUSEDRES_CUDA", "auto").lower() or "auto"
    if mode not in CUDA_MODES:
        raise SystemExit(f"FUSEDRES_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def use_cuda(mode: str, cuda_home: str | None, torch_cuda: str | None) -> bool:
    """The one CUDA decision: build the CUDA kernels when torch has CUDA (torch_cuda, i.e.
    torch.version.cuda) and nvcc was found, unless FUSEDRES_CUDA=0; FUSEDRES_CUDA=1 fails otherwise."""
    possible = torch_cuda is not None and cuda_home is not None
    if mode == "1" and not possible:
        why = "torch was built without CUDA" if torch_cuda is None else "nvcc was not found (set CUDA_HOME)"
        raise SystemExit(f"FUSEDRES_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return mode != "0" and possible


def resolve_cuda_mode(env: Mapping[str, str] = os.environ) -> str:
    """FUSEDRES_CUDA with auto decided, "1" or "0", by the torch of the Python running this."""
    mode = cuda_mode(env)
    if mode == "0":
        return "0"
    try:
        import torch

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    return str(int(use_cuda(mode, find_cuda_home(env), torch_cuda)))


def main(argv: list[str]) -> int:
    commands = {
        "arch-list": lambda: arch_list(),
        "cuda-home": lambda: find_cuda_home() or "",
        "cuda-mode": lambda: resolve_cuda_mode(),
    }
    if len(argv) != 1 or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(commands[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
