"""Add & Norm as eager PyTorch: the spec of fusedres.add_layer_norm / add_rms_norm.

Equivalent upstream code being fused: in BERT (transformers' BertSelfOutput),
``LayerNorm(dropout(dense(h)) + input)``; in GPT-2 / Llama pre-norm blocks,
``residual = hidden; hidden = norm(hidden)`` after ``hidden = residual + attn_out``; timm's ViT
``x + drop_path(ls(attn(norm(x))))`` (rowscale, colscale); Gemma's RMSNorm ``x * (1 + w)``
(weight_offset).
"""

from __future__ import annotations

import torch


def h_dtype_for(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """dtype of h = x + residual: residual's (x's when there is none), at least float32 when
    residual_in_fp32 (float64 inputs stay float64)."""
    base = residual.dtype if residual is not None else x.dtype
    return torch.promote_types(base, torch.float32) if residual_in_fp32 else base


def add_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    rms_norm: bool,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    colscale: torch.Tensor | None = None,
    weight_offset: float = 0.0,
    compute_dtype: torch.dtype | None = None,
):
    """h = residual + dropout(x) * rowscale[..., None] * colscale (in the compute dtype, rounded
    to h's dtype), then y = norm(h) * (weight + weight_offset) + bias over the last dimension, in
    the compute dtype, cast to x's dtype.

    dropout_mask: the bool keep-mask (x's shape) when dropout_p > 0; kept elements are scaled by
    1 / (1 - dropout_p). compute_dtype defaults to float32 (float64 for float64 inputs): the
    precision the fused kernels accumulate in. Tests call this with float64 inputs for the exact
    answer.
    """
    h_dtype = h_dtype_for(x, residual, residual_in_fp32)
    acc = compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    branch = x.to(acc)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("dropout_p > 0 needs the dropout_mask")
        branch = branch * dropout_mask.to(acc) * (1.0 / (1.0 - dropout_p))
    if rowscale is not None:
        branch = branch * rowscale.to(acc).unsqueeze(-1)
    if colscale is not None:
        branch = branch * colscale.to(acc)
    h = branch if residual is None else residual.to(acc) + branch
    h = h.to(h_dtype)
    hf = h.to(acc)
    if rms_norm:
        rstd = torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)
        y = hf * rstd
    else:
        mean = hf.mean(-1, keepdim=True)
        rstd = torch.rsqrt((hf - mean).square().mean(-1, keepdim=True) + eps)
        y = (hf - mean) * rstd
    if weight is not None:
        y = y * (weight.to(acc) + weight_offset)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    return (y, h) if prenorm else y
