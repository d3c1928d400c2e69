"""The dropout mask as a Triton kernel: ``fusedres::dropout_mask_triton``, the spec's schema (fusedres/spec/dropout.py).

``dropout_mask(seed_offset, rows, cols, p) -> mask``: the (rows, cols) bool keep-mask of the
Philox counter layout (fusedres/triton/philox.py; spec: fusedres/reference/philox.py), on
seed_offset's device. The kernel walks rows as a fused Add & Norm kernel would: one program per
(row, block of BLOCK_N columns), the aligned Philox path when cols % 4 == 0 and the per-element
one otherwise (ALIGNED), so the tests exercise both.

Specializations: BLOCK_N (next_power_of_2(cols), 16..1024) and ALIGNED; ``threshold`` is not
specialized (it changes with p).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedres._rng import check_dropout_mask_op
from fusedres.reference.philox import dropout_threshold
from fusedres.spec.dropout import DROPOUT_MASK
from fusedres.triton.add_norm import _cdiv, _direct
from fusedres.triton.philox import philox_bits, philox_bits_aligned, philox_key_offset
from fusedres.triton.register import register_op

_MIN_BLOCK_N, _MAX_BLOCK_N = 16, 1024


@triton.jit(do_not_specialize=["threshold"])
def _dropout_mask_kernel(SO, MASK, N, threshold, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK_N
    cols = start + tl.arange(0, BLOCK_N)
    e0 = row * N + start
    k0, k1, offset = philox_key_offset(SO)
    if ALIGNED:
        bits = philox_bits_aligned(k0, k1, offset, e0, BLOCK_N)
    else:
        bits = philox_bits(k0, k1, offset, e0 + tl.arange(0, BLOCK_N))
    keep = bits >= threshold.to(tl.uint32)
    tl.store(MASK + e0 + tl.arange(0, BLOCK_N), keep, mask=cols < N)


def _outputs(seed_offset, rows, cols, p):
    return torch.empty((rows, cols), dtype=torch.bool, device=seed_offset.device)


def dropout_mask(seed_offset, rows, cols, p, launch=_direct):
    """The (rows, cols) keep-mask for seed_offset, as csrc/dropout.cpp's dropout_mask. `launch`
    wraps the kernel before it is launched (wrap_triton inside the registered operator)."""
    mask = _outputs(seed_offset, rows, cols, p)
    if rows == 0 or cols == 0:
        return mask
    block_n = min(max(triton.next_power_of_2(int(cols)), _MIN_BLOCK_N), _MAX_BLOCK_N)
    launch(_dropout_mask_kernel)[(rows, _cdiv(cols, block_n))](
        seed_offset, mask, cols, dropout_threshold(p), BLOCK_N=block_n, ALIGNED=cols % 4 == 0
    )
    return mask


dropout_mask_triton = register_op(DROPOUT_MASK, dropout_mask, check_dropout_mask_op, (_dropout_mask_kernel,))
