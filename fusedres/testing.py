"""The accuracy rule shared by the tests and the benchmark's parity report.

A low-precision result is judged against the float64 answer relative to eager PyTorch's own
error in the same dtype (flash-attn's rule): |ours - ref64| <= 2 |eager - ref64| + atol, with
atol scaled by the reference's magnitude when that exceeds 1 (a dweight summed over many rows
carries rounding in proportion to its size, whoever computes it).
"""

from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_abs_error(t: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |t - ref| over the elements where ref is finite."""
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (t.double() - ref.double())[finite].abs().max().item()


def parity_bound(eager_error: float, dtype: torch.dtype, ref_scale: float = 1.0) -> float:
    return 2 * eager_error + ATOL[dtype] * max(1.0, ref_scale)


def ref_scale(ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    return ref[finite].abs().max().item() if finite.any() else 1.0
