"""BatchNorm (+ residual) (+ ReLU) as eager PyTorch: the spec of fusedres.batch_norm_add_relu.

Equivalent upstream code being fused: torchvision's BasicBlock / Bottleneck tail,
``out = self.bn3(self.conv3(out)); out += identity; out = self.relu(out)``; with rowscale, timm's
(``x = self.bn3(self.conv3(x)); x = self.drop_path(x); x += shortcut; x = self.act3(x)``), the
drop path's per-sample keep mask (scaled by 1 / keep probability) being the rowscale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_norm_add_relu_reference(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    relu: bool = True,
    rowscale: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.relu(F.batch_norm(...) * rowscale[n] + residual) with fp32 maths for low-precision input
    (what autocast produces: fp16/bf16 activations, fp32 weight, bias and running stats); output in
    input's dtype. rowscale: (N,), a per-sample scale of the normalized branch; no grad."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    y = F.batch_norm(input.to(acc), running_mean, running_var, weight, bias, training, momentum, eps)
    if rowscale is not None:
        y = y * rowscale.detach().to(acc).reshape(-1, *([1] * (input.dim() - 1)))
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = F.relu(y)
    return y.to(input.dtype)
