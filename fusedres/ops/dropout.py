"""Fused dropout's keep-mask: ``dropout_mask(shape, p, seed_offset)``, the mask that a fused
dropout with this seed_offset applies to an input of that shape (True = kept).

The operator is declared in fusedres/spec/dropout.py; the C++ kernels (CPU and CUDA) and the
Triton kernel (fusedres/triton/dropout.py) implement it; fusedres/reference/philox.py is the spec
(the Philox counter layout) and the "reference" backend. Every backend returns the same mask for
the same seed_offset. This module adds the fake kernel (torch.compile) and the public function.
"""

from __future__ import annotations

import math

import torch

from fusedres._extension import EXTENSION_LOADED
from fusedres._rng import check_dropout_mask_op, check_dropout_p, check_seed_offset, philox_seed_offset
from fusedres.backends import resolve_backend
from fusedres.reference.philox import dropout_mask_reference

__all__ = ["dropout_mask", "philox_seed_offset"]

_OPS: dict[str, object] = {}
if EXTENSION_LOADED:
    _OPS["cpu"] = _OPS["cuda"] = torch.ops.fusedres.dropout_mask.default

try:
    from fusedres.triton import dropout as _triton  # noqa: F401  (registers dropout_mask_triton)
except ImportError:  # no triton on this platform
    pass
else:
    _OPS["triton"] = torch.ops.fusedres.dropout_mask_triton.default


def dropout_mask_fake(seed_offset, rows, cols, p):
    check_dropout_mask_op(seed_offset, rows, cols, p)
    return seed_offset.new_empty((rows, cols), dtype=torch.bool)


if EXTENSION_LOADED:
    torch.library.register_fake("fusedres::dropout_mask")(dropout_mask_fake)


def _rows_cols(shape) -> tuple[tuple, int, int]:
    """(shape as a tuple, rows, cols): the (M, N) rows of an input of that shape."""
    try:
        shape = tuple(shape)
        ok = len(shape) > 0 and all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) for s in shape)
    except TypeError:
        ok = False
    if not ok or any(s < 0 for s in shape):
        raise ValueError(f"shape must be a sequence of one or more sizes >= 0 (the input's (..., N)), got {shape!r}")
    return shape, math.prod(shape[:-1]), shape[-1]


def dropout_mask(shape, p: float, seed_offset: torch.Tensor, *, device: torch.device | None = None) -> torch.Tensor:
    """The keep-mask of fused dropout for an input of `shape`: a bool tensor of that shape on
    seed_offset's device, True where the element is kept (and scaled by 1 / (1 - p)).

    Element e of the input in row-major order (e = row * N + col over its (M, N) rows, whatever
    its strides) is kept iff lane e % 4 of the Philox4x32-10 block at counter offset + e // 4 under
    key seed is >= floor(p * 2**32) (fusedres/reference/philox.py states the layout in full).

    Args:
        shape: the input's shape (..., N).
        p: the dropout probability, in [0, 1).
        seed_offset: [seed, offset], a contiguous (2,) int64 tensor, as
            ``fusedres.philox_seed_offset(device)`` draws it from torch's generator.
        device: when given, seed_offset must be on it (the device of the input).

    Example::

        >>> so = fusedres.philox_seed_offset(torch.device("cpu"))
        >>> keep = fusedres.dropout_mask((8, 768), 0.1, so)
        >>> keep.shape, keep.dtype
        (torch.Size([8, 768]), torch.bool)
    """
    shape, rows, cols = _rows_cols(shape)
    p = check_dropout_p(p)
    check_seed_offset(seed_offset, device, "device")
    backend = resolve_backend(seed_offset.device)
    if backend == "reference":
        return dropout_mask_reference(shape, p, seed_offset)
    mask = _OPS[backend](seed_offset, rows, cols, p)
    return mask if len(shape) == 2 else mask.view(shape)
