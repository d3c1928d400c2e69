"""Where a run happened: device, versions, commit. Recorded in results.json and used to name
committed results (bench/results/<device-slug>-<date>.*)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess

import torch

import fusedres


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def slug(text: str) -> str:
    """Lower-case letters, digits and single dashes: safe in any file name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_stem(device_label: str, date: datetime.date | None = None) -> str:
    return f"{slug(device_label)}-{(date or datetime.date.today()).isoformat()}"


def git_commit() -> str | None:
    """The checkout's commit (with -dirty for uncommitted changes to tracked files), or None
    outside a git checkout; a built wheel falls back to the commit it was built from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fusedres.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):  # an installed wheel: any enclosing repo is not ours
        return None
    try:
        run = lambda *args: subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short=12", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_commit() -> str | None:
    try:
        from fusedres._build_info import BUILD_INFO
    except ImportError:
        return None
    return BUILD_INFO.get("commit")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: torch.device, copy_gbps: float | None) -> dict:
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "fusedres": fusedres.__version__,
        "commit": git_commit() or build_commit(),
        "build_commit": build_commit(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "copy_gbps": copy_gbps,
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["l2_cache_mib"] = getattr(props, "L2_cache_size", 0) / 2**20 or None
        env["compute_capability"] = f"{props.major}.{props.minor}"
    return env
