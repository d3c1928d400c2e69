"""BatchNorm + add + ReLU modules, and conv -> BN (+ add) -> ReLU blocks that fold BN in eval."""

from __future__ import annotations

import torch
from torch import nn

from fusedres.ops.batch_norm import batch_norm_add_relu, bias_add_relu, sync_batch_norm_add_relu


class _BatchNormAddReLU:
    """forward(x, residual=None) = relu(bn(x) + residual), with nn.BatchNorm*'s parameters,
    buffers, momentum=None (cumulative average) and track_running_stats semantics."""

    relu: bool = True

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        # Mirrors nn.modules.batchnorm._BatchNorm.forward, so behaviour matches it exactly.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm_add_relu(
            input,
            residual,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
            relu=self.relu,
        )

    @classmethod
    def from_module(cls, bn: nn.modules.batchnorm._BatchNorm):
        """A fused module sharing `bn`'s parameters and buffers (so optimizers keep working)."""
        expected = next(k for k in cls.__mro__ if k.__module__.startswith("torch.nn"))  # the nn.BatchNorm*d
        if not isinstance(bn, expected):
            raise TypeError(f"bn must be an {expected.__module__}.{expected.__name__}, got {type(bn).__name__}")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        new._parameters = bn._parameters
        new._buffers = bn._buffers
        new.train(bn.training)
        return new


class BatchNormAddReLU1d(_BatchNormAddReLU, nn.BatchNorm1d):
    """nn.BatchNorm1d followed by + residual and ReLU, fused."""


class BatchNormAddReLU2d(_BatchNormAddReLU, nn.BatchNorm2d):
    """nn.BatchNorm2d followed by + residual and ReLU, fused: the ResNet block tail."""


class BatchNormAddReLU3d(_BatchNormAddReLU, nn.BatchNorm3d):
    """nn.BatchNorm3d followed by + residual and ReLU, fused."""


class SyncBatchNormAddReLU2d(BatchNormAddReLU2d):
    """BatchNormAddReLU2d whose training statistics span every process of `process_group` (all of
    torch.distributed's default group when None), as nn.SyncBatchNorm. Outside distributed
    training (not initialized, or one process) it is BatchNormAddReLU2d."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _synchronized(self) -> bool:
        import torch.distributed as dist

        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and (dist.get_world_size(self.process_group) > 1)
        )

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self._synchronized():
            return super().forward(input, residual)
        self._check_input_dim(input)
        factor = self.momentum if self.momentum is not None else 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return sync_batch_norm_add_relu(
            input,
            residual,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight,
            self.bias,
            factor,
            self.eps,
            relu=self.relu,
            group=self.process_group,
        )


class ConvBNAddReLU2d(nn.Module):
    """relu(bn(conv(x)) + residual). Training: batch statistics through the fused BN kernel.
    Eval: BN folded into the conv's weight and bias, then one bias + add + ReLU pass. The folded
    weights are derived on the fly (cached while the parameters are unchanged and no grad is
    needed); the state_dict holds only conv.* and bn.*."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if conv.out_channels != bn.num_features:
            raise ValueError(f"conv has {conv.out_channels} output channels but bn has {bn.num_features} features")
        self.conv = conv
        self.bn = bn if isinstance(bn, BatchNormAddReLU2d) else BatchNormAddReLU2d.from_module(bn)
        self._folded = None  # (versions, weight, bias): plain attribute, never in the state_dict

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        return cls(conv, bn)

    def _versions(self):
        tensors = [
            self.conv.weight,
            self.conv.bias,
            self.bn.weight,
            self.bn.bias,
            self.bn.running_mean,
            self.bn.running_var,
        ]
        return tuple((id(t), t._version) if t is not None else None for t in tensors)

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """conv weight and bias with eval-mode BN folded in (differentiable)."""
        bn = self.bn
        if bn.running_mean is None or bn.running_var is None:
            raise RuntimeError("eval-mode folding needs running stats (track_running_stats=True)")
        invstd = torch.rsqrt(bn.running_var.float() + bn.eps)
        scale = invstd * bn.weight.float() if bn.weight is not None else invstd
        w = self.conv.weight
        folded_w = (w.float() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        conv_bias = self.conv.bias.float() if self.conv.bias is not None else torch.zeros_like(scale)
        shift = bn.bias.float() if bn.bias is not None else torch.zeros_like(scale)
        folded_b = ((conv_bias - bn.running_mean.float()) * scale + shift).to(w.dtype)
        return folded_w, folded_b

    def _folded_params(self):
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if needs_grad or torch.compiler.is_compiling():
            return self.folded_weight_and_bias()
        versions = self._versions()
        if self._folded is None or self._folded[0] != versions:
            with torch.no_grad():
                self._folded = (versions, *self.folded_weight_and_bias())
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.training or not self.bn.track_running_stats:
            return self.bn(self.conv(x), residual)
        weight, bias = self._folded_params()
        y = self.conv._conv_forward(x, weight, None)
        return bias_add_relu(y, bias, residual)

    def train(self, mode: bool = True):
        self._folded = None  # statistics move in training: fold afresh afterwards
        return super().train(mode)


class ConvBNReLU2d(ConvBNAddReLU2d):
    """relu(bn(conv(x))): ConvBNAddReLU2d without the residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, None)


__all__ = [
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
    "ConvBNAddReLU2d",
    "ConvBNReLU2d",
    "SyncBatchNormAddReLU2d",
]
