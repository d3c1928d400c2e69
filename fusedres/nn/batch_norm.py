"""BatchNorm + add + ReLU modules, and conv -> BN (+ add) -> ReLU blocks that fold BN in eval."""

from __future__ import annotations

import torch
from torch import nn

from fusedres.ops.batch_norm import batch_norm_add_relu, sync_batch_norm_add_relu
from fusedres.ops.conv_epilogue import conv_frozen_bn, fold


def _sync_enabled(bn: nn.Module) -> bool:
    import torch.distributed as dist

    group = getattr(bn, "process_group", None)
    return bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _module_tensors(bn: nn.Module):
    """bn's weight, bias, running_mean, running_var and num_batches_tracked, read from the
    module's dicts: nn.Module.__getattr__ costs ~0.3 us a lookup, and a BN call makes nine. A
    name missing there (a parametrization turns a parameter into a property) is looked up as an
    attribute instead."""
    params, buffers = bn._parameters, bn._buffers
    try:
        return (
            params["weight"],
            params["bias"],
            buffers["running_mean"],
            buffers["running_var"],
            buffers["num_batches_tracked"],
        )
    except KeyError:
        return bn.weight, bn.bias, bn.running_mean, bn.running_var, getattr(bn, "num_batches_tracked", None)


def bn_add_relu(
    bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
) -> torch.Tensor:
    """relu(bn(input) + residual) for any nn.BatchNorm*d / nn.SyncBatchNorm module, with its
    parameters, buffers, momentum (None = cumulative average) and track_running_stats semantics.
    A SyncBatchNorm (or SyncBatchNormAddReLU2d) in distributed training reduces its statistics
    over its process group, as nn.SyncBatchNorm does."""
    bn._check_input_dim(input)
    weight, bias, running_mean, running_var, num_batches_tracked = _module_tensors(bn)
    # Mirrors nn.modules.batchnorm._BatchNorm.forward, so behaviour matches it exactly.
    training, momentum = bn.training, bn.momentum
    factor = 0.0 if momentum is None else momentum
    if training and bn.track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    if isinstance(bn, (nn.SyncBatchNorm, _ProcessGroup)) and _sync_enabled(bn):
        return sync_batch_norm_add_relu(
            input,
            residual,
            running_mean if bn.track_running_stats else None,
            running_var if bn.track_running_stats else None,
            weight,
            bias,
            factor,
            bn.eps,
            relu=relu,
            group=bn.process_group,
        )
    use_running = not training or bn.track_running_stats
    return batch_norm_add_relu(
        input,
        residual,
        running_mean if use_running else None,
        running_var if use_running else None,
        weight,
        bias,
        training or (running_mean is None and running_var is None),
        factor,
        bn.eps,
        relu=relu,
    )


# BatchNorm modules that always normalize with fixed statistics, whatever their training flag, by
# exact class (fusedres imports neither library). timm's FrozenBatchNorm2d is torchvision's class.
FROZEN_BN_CLASSES = frozenset(("torchvision.ops.misc.FrozenBatchNorm2d",))
_frozen_types: dict[type, bool] = {}


def is_frozen_bn(bn: nn.Module) -> bool:
    """Whether `bn` is a frozen BatchNorm (torchvision's / timm's FrozenBatchNorm2d)."""
    cls = type(bn)
    frozen = _frozen_types.get(cls)
    if frozen is None:
        frozen = _frozen_types[cls] = f"{cls.__module__}.{cls.__qualname__}" in FROZEN_BN_CLASSES
    return frozen


def uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether `bn` normalizes with the batch's statistics (training, or no running stats to use),
    as nn.BatchNorm2d decides; frozen BatchNorms never do."""
    return not is_frozen_bn(bn) and (bn.training or not bn.track_running_stats or bn.running_mean is None)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """conv's weight and bias with `bn`'s running statistics folded in (differentiable), computed in
    fp32 (fp64 for an fp64 conv) and returned in the conv weight's dtype."""
    if bn.running_mean is None or bn.running_var is None:
        raise RuntimeError("eval-mode folding needs running stats (track_running_stats=True)")
    w, b, _scale, _invstd = fold(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


def conv_bn_add_relu(
    conv: nn.Conv2d,
    bn: nn.Module,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    relu: bool = True,
    consume_residual: bool = False,
) -> torch.Tensor:
    """relu(bn(conv(x)) + residual). With batch statistics (training): the conv, then the fused BN
    kernels. With fixed statistics (eval, a frozen BN, a BN in eval while the conv fine-tunes): BN
    folded into the conv and one fused library call, oneDNN's on the CPU, cuDNN's on a GPU
    (fusedres.ops.conv_epilogue.conv_frozen_bn, which also says when the residual may be written
    over: `consume_residual`). relu=False gives conv-BN(-add) alone."""
    if uses_batch_statistics(bn):
        return bn_add_relu(bn, conv(x), residual, relu=relu)
    return conv_frozen_bn(conv, bn, x, residual, relu=relu, consume_residual=consume_residual)


class _BatchNormAddReLU:
    """forward(x, residual=None) = relu(bn(x) + residual), with nn.BatchNorm*'s parameters,
    buffers, momentum=None (cumulative average) and track_running_stats semantics."""

    relu: bool = True

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return bn_add_relu(self, input, residual, relu=self.relu)

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
    """``relu(nn.BatchNorm2d(x) + residual)`` fused (fusedres.batch_norm_add_relu): the ResNet
    block tail ``out = bn3(conv3(out)); out += identity; out = relu(out)``.

    A subclass of nn.BatchNorm2d: the same constructor, parameters, buffers (running stats,
    num_batches_tracked), state_dict, momentum=None and track_running_stats behaviour.

    Shape:
        forward(x, residual=None): x and residual (N, C, H, W), NCHW or channels_last; the output
        keeps x's memory format.

    Example::

        >>> bn = fusedres.nn.BatchNormAddReLU2d(64)
        >>> out = bn(torch.randn(8, 64, 56, 56), torch.randn(8, 64, 56, 56))
        >>> bn = fusedres.nn.BatchNormAddReLU2d.from_module(torch.nn.BatchNorm2d(64))  # shares its tensors
    """


class BatchNormAddReLU3d(_BatchNormAddReLU, nn.BatchNorm3d):
    """nn.BatchNorm3d followed by + residual and ReLU, fused."""


class _ProcessGroup:
    """Training statistics over every process of `process_group` (all of torch.distributed's
    default group when None), as nn.SyncBatchNorm. Outside distributed training (not
    initialized, or one process) the module computes local statistics."""

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


class SyncBatchNormAddReLU2d(_ProcessGroup, BatchNormAddReLU2d):
    """BatchNormAddReLU2d with statistics over every process of `process_group`, as
    nn.SyncBatchNorm."""


class SyncBatchNorm2d(_ProcessGroup, _BatchNormAddReLU, nn.BatchNorm2d):
    """nn.SyncBatchNorm for 4-D inputs through the fused kernels: also on the CPU (gloo), where
    nn.SyncBatchNorm refuses to run under DistributedDataParallel. forward(x) is plain BN, so it
    drops into any model (see convert_sync_batchnorm); fuse() still fuses the ReLU and residual
    around it."""

    relu = False


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like nn.SyncBatchNorm.convert_sync_batchnorm, but to SyncBatchNorm2d: every nn.BatchNorm2d
    (and 4-D nn.SyncBatchNorm) is replaced by one sharing its parameters and buffers, so the
    state_dict and the optimizer's view of the model do not change."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        new = SyncBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device="meta",
        )
        new._parameters = module._parameters
        new._buffers = module._buffers
        return new.train(module.training)
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class ConvBNAddReLU2d(nn.Module):
    """``relu(bn(conv(x)) + residual)``.

    Training (batch statistics): the conv, then the fused BN kernels. Eval, or a
    FrozenBatchNorm2d: BN folded into the conv and one fused library call (oneDNN on the CPU,
    cuDNN on a GPU), with grads through the fold when the conv or BN's affine parameters train.
    The folded and prepacked weights are cached while the parameters and running stats are
    unchanged; the state_dict holds only conv.* and bn.*.

    Args:
        conv: an nn.Conv2d with bn.num_features output channels.
        bn: an nn.BatchNorm2d (or BatchNormAddReLU2d), or a FrozenBatchNorm2d; shared, not copied.

    Shape:
        forward(x, residual=None): x the conv's input; residual the conv output's shape.

    Example::

        >>> block = fusedres.nn.ConvBNAddReLU2d(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False),
        ...                                     torch.nn.BatchNorm2d(64))
        >>> out = block(torch.randn(2, 64, 14, 14), torch.randn(2, 64, 14, 14))
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        frozen = is_frozen_bn(bn)
        if not frozen and not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d or a FrozenBatchNorm2d, got {type(bn).__name__}")
        features = bn.weight.shape[0] if frozen else bn.num_features
        if conv.out_channels != features:
            raise ValueError(f"conv has {conv.out_channels} output channels but bn has {features} features")
        self.conv = conv
        self.bn = bn if frozen or isinstance(bn, BatchNormAddReLU2d) else BatchNormAddReLU2d.from_module(bn)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module):
        return cls(conv, bn)

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """conv weight and bias with BN's running statistics folded in (differentiable)."""
        return fold_conv_bn(self.conv, self.bn)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv_bn_add_relu(self.conv, self.bn, x, residual)


class ConvBNReLU2d(ConvBNAddReLU2d):
    """relu(bn(conv(x))): ConvBNAddReLU2d without the residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, None)


__all__ = [
    "bn_add_relu",
    "conv_bn_add_relu",
    "fold_conv_bn",
    "is_frozen_bn",
    "uses_batch_statistics",
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
    "ConvBNAddReLU2d",
    "ConvBNReLU2d",
    "SyncBatchNorm2d",
    "SyncBatchNormAddReLU2d",
    "convert_sync_batchnorm",
]
