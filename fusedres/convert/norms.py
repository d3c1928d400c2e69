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
    wide_y: bool = False,
    weight_offset: float = 0.0,
    **branch,
):
    """norm(a + b), or with prenorm=True (norm(a + b), a + b), in the dtypes eager gives them
    (arguments in add_norm's order: x, residual, weight, bias, eps): the sum in
    promote_types(a, b); a post-norm output in that dtype too; a pre-norm output in the narrower
    dtype, since it only feeds the next sublayer's matmul, unless `wide_y` (a model's last norm,
    whose output is the model's).

    `weight_offset` and the branch keywords (dropout_p, rowscale, colscale: they act on a, the
    branch) go to add_layer_norm / add_rms_norm as issue 23 defines them; fuse() passes them only
    where fusedres.convert.features says the ops take them."""
    if branch:
        return _with_branch_features(
            a, b, norm_weight, norm_bias, eps, rms_norm, prenorm, wide_y, weight_offset, branch
        )
    residual_in_fp32 = False
    if b is not None and a.dtype != b.dtype:
        wide = torch.promote_types(a.dtype, b.dtype)
        if wide == torch.float32 and torch.float32 in (a.dtype, b.dtype):
            narrow_first = prenorm and not wide_y
            a, b = (a, b) if (a.dtype != wide) == narrow_first else (b, a)
            residual_in_fp32 = not narrow_first
        else:
            a, b = a.to(wide), b.to(wide)
    if weight_offset:
        return _public(rms_norm)(
            a, b, norm_weight, *(() if rms_norm else (norm_bias,)), eps, prenorm=prenorm,
            residual_in_fp32=residual_in_fp32, weight_offset=weight_offset,
        )  # fmt: skip
    return add_norm(
        a, b, norm_weight, norm_bias, eps, rms_norm=rms_norm, prenorm=prenorm, residual_in_fp32=residual_in_fp32
    )


def _public(rms_norm: bool):
    from fusedres.ops.add_norm import add_layer_norm, add_rms_norm

    return add_rms_norm if rms_norm else add_layer_norm


def _with_branch_features(a, b, weight, bias, eps, rms_norm, prenorm, wide_y, weight_offset, branch):
    # The branch ops scale `a`, so the operands keep their places: a narrow branch may meet an
    # fp32 residual stream (h stays fp32); any other mix is computed in the wider dtype.
    if a.dtype != b.dtype:
        wide = torch.promote_types(a.dtype, b.dtype)
        if not (prenorm and not wide_y and b.dtype == wide == torch.float32):
            a, b = a.to(wide), b.to(wide)
    if weight_offset:
        branch["weight_offset"] = weight_offset
    return _public(rms_norm)(a, b, weight, *(() if rms_norm else (bias,)), eps, prenorm=prenorm, **branch)
