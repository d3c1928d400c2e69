"""Bytes each op must move at the least: the denominator of every GB/s figure we report.

Add & Norm over an (M, N) activation, one pass:
  forward : read x, residual; write y and h (when h is stored); read weight/bias; write mean/rstd.
  backward: read dy, h, dh (prenorm), weight, mean/rstd; write dx, dresidual (when its dtype
            differs from x's, else dx serves both) and dweight/dbias.
"""

from __future__ import annotations

import torch


def _size(dtype: torch.dtype | None) -> int:
    return 0 if dtype is None else torch.empty((), dtype=dtype).element_size()


def add_norm_bytes(
    m: int,
    n: int,
    *,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    h_dtype: torch.dtype,
    weight_dtype: torch.dtype | None,
    has_bias: bool,
    rms_norm: bool,
    prenorm: bool,
    store_h: bool,
    direction: str,
) -> int:
    """direction: "fwd", "bwd" or "fwd+bwd"."""
    if direction == "fwd+bwd":
        common = dict(
            x_dtype=x_dtype,
            residual_dtype=residual_dtype,
            h_dtype=h_dtype,
            weight_dtype=weight_dtype,
            has_bias=has_bias,
            rms_norm=rms_norm,
            prenorm=prenorm,
            store_h=store_h,
        )
        return add_norm_bytes(m, n, direction="fwd", **common) + add_norm_bytes(m, n, direction="bwd", **common)
    act = m * n
    x, res, h, w = _size(x_dtype), _size(residual_dtype), _size(h_dtype), _size(weight_dtype)
    params = n * w * (2 if has_bias else 1)
    stats = m * 4 * (1 if rms_norm else 2)
    if direction == "fwd":
        return act * (x + res + x + (h if store_h else 0)) + params + stats
    if direction == "bwd":
        normalized = h if store_h else x
        dresidual = res if residual_dtype not in (None, x_dtype) else 0
        return act * (x + normalized + (h if prenorm else 0) + x + dresidual) + 2 * params + stats
    raise ValueError(f"direction must be fwd, bwd or fwd+bwd, got {direction!r}")


def copy_bytes(numel: int, dtype: torch.dtype) -> int:
    """A copy reads and writes every element once."""
    return 2 * numel * _size(dtype)


def batch_norm_add_relu_bytes(
    numel: int, channels: int, *, dtype: torch.dtype, residual: bool, training: bool, direction: str
) -> int:
    """BatchNorm + add + ReLU over `numel` activations:
    forward : (training: read x for the statistics) read x, residual; write out.
    backward: read dy, out, x (writing the masked grad as the residual's grad when there is one);
              then read that grad (or dy and out again), x; write dx.
    Per-channel vectors are counted as fp32 and are noise next to the activations."""
    if direction == "fwd+bwd":
        kw = dict(dtype=dtype, residual=residual, training=training)
        return batch_norm_add_relu_bytes(numel, channels, direction="fwd", **kw) + batch_norm_add_relu_bytes(
            numel, channels, direction="bwd", **kw
        )
    act = numel * _size(dtype)
    per_channel = channels * 4 * 4
    if direction == "fwd":
        return act * ((1 if training else 0) + 2 + (1 if residual else 0)) + per_channel
    if direction == "bwd":
        second_pass = 3 if residual else 4  # g + x + dx, or dy + out + x + dx
        return act * (3 + (1 if residual else 0) + second_pass) + per_channel
    raise ValueError(f"direction must be fwd, bwd or fwd+bwd, got {direction!r}")
