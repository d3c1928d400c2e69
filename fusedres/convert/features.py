"""Which residual features the fused Add & Norm ops take: the one place fuse() asks.

Issue 23 gives fusedres.add_layer_norm / add_rms_norm the keywords `dropout_p`, `rowscale`,
`colscale` and `weight_offset`. fuse() folds a branch's dropout, drop path (rowscale), LayerScale
or scalar multiplier (colscale) into the fused call, and computes Gemma's `(1 + w) * x_hat` norms
with weight_offset. Two questions, asked at two times:

- `supported(feature)`, when fuse() plans a site: whether the public ops take the keyword at all;
- `available(device)`, per call: which of them the backend that runs on `device` implements.
  Backends gain them at different times (the reference and the CPU kernels first, the Triton and
  CUDA kernels later), so each backend is asked once, by a tiny call with each feature on that
  device, and the answer is kept. A folded op the backend lacks is applied by torch in front of
  the fused call instead; a `(1 + w)` norm without weight_offset runs the original expression.
"""

from __future__ import annotations

import functools
import inspect

import torch

from fusedres.backends import resolve_backend
from fusedres.ops.add_norm import add_layer_norm, add_rms_norm

DROPOUT, ROWSCALE, COLSCALE, WEIGHT_OFFSET = "dropout_p", "rowscale", "colscale", "weight_offset"
FEATURES = (DROPOUT, ROWSCALE, COLSCALE, WEIGHT_OFFSET)
ALL = frozenset(FEATURES)
NONE = frozenset()

_is_compiling = torch.compiler.is_compiling
_AVAILABLE: dict[str, frozenset] = {}  # backend name -> the features its kernels implement


@functools.cache
def supported(feature: str) -> bool:
    """Whether both add_layer_norm and add_rms_norm take the keyword `feature`."""
    return all(feature in inspect.signature(f).parameters for f in (add_layer_norm, add_rms_norm))


def unsupported_reason(feature: str) -> str:
    return f"needs {feature} (fusedres does not support it yet)"


def available(device: torch.device) -> frozenset:
    """The features the backend that runs on `device` implements (asked once per backend). Under
    torch.compile an unasked backend counts as having none: torch then applies the branch ops,
    and the compiler fuses them itself."""
    backend = resolve_backend(device)
    found = _AVAILABLE.get(backend)
    if found is None:
        if _is_compiling():
            return NONE
        found = _AVAILABLE[backend] = _ask(device)
    return found


def _ask(device: torch.device) -> frozenset:
    x = torch.linspace(-1.0, 1.0, 16, device=device).reshape(2, 8)
    w = torch.ones(8, device=device)
    calls = {
        DROPOUT: dict(dropout_p=0.5),
        ROWSCALE: dict(rowscale=torch.ones(2, device=device)),
        COLSCALE: dict(colscale=w),
        WEIGHT_OFFSET: dict(weight_offset=1.0),
    }
    found = set()
    # The dropout call draws a seed offset: the caller's random stream must not move.
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for feature, kwargs in calls.items():
            if not supported(feature):
                continue
            try:
                add_layer_norm(x, x, w, None, **kwargs)
                add_rms_norm(x, x, w, **kwargs)
            except (NotImplementedError, RuntimeError):  # refused by this backend's kernels
                continue
            found.add(feature)
    return frozenset(found)
