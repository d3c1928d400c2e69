"""The op families the bench runs, and the case sets and filters over them.

A family is a module with `quick_cases(device)` and `full_cases(device)` (and optionally
`smoke_cases(device)`: tiny shapes for CI) returning cases as harness.py describes them. Adding a
family is one line below; modules are imported only when their cases are asked for.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

FAMILIES = {
    "add_norm": "fusedres.bench.add_norm",
    "batch_norm": "fusedres.bench.batch_norm",
}

SETS = ("smoke", "quick", "full")


def family_cases(family: str, case_set: str, device: torch.device) -> list:
    module = importlib.import_module(FAMILIES[family])
    make = getattr(module, f"{case_set}_cases", None)
    return list(make(device)) if make else []


def dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def with_dtypes(case, dtypes: list[str]) -> list:
    """The case in each of the dtypes: remade when it is a dataclass with a dtype field, else
    kept only when its own dtype is listed (or it has none)."""
    own = dtype_name(getattr(case, "dtype", None))
    if own is None:
        return [case]
    if dataclasses.is_dataclass(case) and "dtype" in {f.name for f in dataclasses.fields(case)}:
        return [dataclasses.replace(case, dtype=getattr(torch, d)) for d in dtypes]
    return [case] if own in dtypes else []


def select_cases(
    device: torch.device,
    case_set: str = "quick",
    *,
    ops: list[str] | None = None,
    dtypes: list[str] | None = None,
    shapes: list[str] | None = None,
) -> list[tuple[str, object]]:
    """(family, case) pairs of the set, filtered:
    ops     family names or case.op values (add_norm, add_rms_norm, batch_norm_add_relu, ...);
    dtypes  run every case in these dtypes instead of its own (float32, bfloat16, float16);
    shapes  substrings of the case label ("x4096", "56x56", "prenorm", "/eval")."""
    selected = []
    for family in FAMILIES:
        for case in family_cases(family, case_set, device):
            if ops and family not in ops and getattr(case, "op", None) not in ops:
                continue
            for c in with_dtypes(case, dtypes) if dtypes else [case]:
                if shapes and not any(s in c.label for s in shapes):
                    continue
                if all(c.label != other.label for _, other in selected):
                    selected.append((family, c))
    return selected
