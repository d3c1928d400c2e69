"""The Add & Norm call every transformer pattern makes, with eager's dtypes.

The fused ops give y in x's dtype and h in residual's (or fp32). Blocks written in eager PyTorch
compute `x + residual` with type promotion: under autocast a bf16 sublayer output meets an fp32
residual stream and the sum, and a post-norm's output, are fp32. norm_after_add orders the
operands so the fused op produces those same dtypes.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedres.ops.add_norm import add_norm


def check_layer_norms(module: nn.Module, names: tuple[str, ...]) -> str | None:
    """None when each named submodule is an nn.LayerNorm over one dim, else why not."""
    for name in names:
        norm = getattr(module, name, None)
        if type(norm) is not nn.LayerNorm:
            return f"{name} is {type(norm).__name__}, not nn.LayerNorm"
        if len(norm.normalized_shape) != 1:
            return f"{name} normalizes over {len(norm.normalized_shape)} dims; fused norms take one"
    return None


def norm_after_add(
    a: torch.Tensor,
    b: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    *,
    rms_norm: bool = False,
    prenorm: bool = False,
):
    """norm(a + b), or with prenorm=True (norm(a + b), a + b), in the dtypes eager gives them
    (arguments in add_norm's order: x, residual, weight, bias, eps): the sum in
    promote_types(a, b); a post-norm output in that dtype too; a pre-norm output in the narrower
    dtype, since it only feeds the next sublayer's matmul."""
    residual_in_fp32 = False
    if b is not None and a.dtype != b.dtype:
        wide = torch.promote_types(a.dtype, b.dtype)
        if wide == torch.float32 and torch.float32 in (a.dtype, b.dtype):
            narrow_first = prenorm
            a, b = (a, b) if (a.dtype != wide) == narrow_first else (b, a)
            residual_in_fp32 = not prenorm
        else:
            a, b = a.to(wide), b.to(wide)
    return add_norm(
        a, b, norm_weight, norm_bias, eps, rms_norm=rms_norm, prenorm=prenorm, residual_in_fp32=residual_in_fp32
    )
