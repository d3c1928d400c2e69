"""torchvision (and timm) ResNets (resnet18..152, resnext, wide_resnet): the conv-BN-ReLU pairs,
the block tails `relu(bn(conv(x)) + identity)` and the downsample branch's conv-BN, as
torchvision.models.resnet writes them, with nn.BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d
(torchvision's, which timm uses too: detection backbones).

Each fused forward below is the torchvision forward with its BN/add/ReLU runs replaced by
conv_bn_add_relu: the fused BN kernel with batch statistics (training), BN folded into the conv
and one fused library call with fixed ones (eval, frozen BN).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from fusedres.convert.core import Pattern, register
from fusedres.nn.batch_norm import SyncBatchNorm2d, conv_bn_add_relu, is_frozen_bn, uses_batch_statistics

_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling

# Modules whose forward(x) is exactly batch norm; bn_add_relu handles each (synchronized ones too),
# and conv_bn_add_relu folds each, frozen ones included.
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm2d)


def _is_bn(module) -> bool:
    return type(module) in _BN_TYPES or is_frozen_bn(module)


def _check_parts(
    module: nn.Module, convs: tuple[str, ...], bns: tuple[str, ...], relu: str | None = "relu"
) -> str | None:
    if relu is not None and type(getattr(module, relu, None)) is not nn.ReLU:
        return f"activation is {type(getattr(module, 'relu', None)).__name__}, not nn.ReLU"
    for name in convs:
        if type(getattr(module, name, None)) is not nn.Conv2d:
            return f"{name} is {type(getattr(module, name, None)).__name__}, not nn.Conv2d"
    for name in bns:
        if not _is_bn(getattr(module, name, None)):
            kind = type(getattr(module, name, None)).__name__
            return f"{name} is {kind}, not a BatchNorm2d / SyncBatchNorm / FrozenBatchNorm2d"
    return None


def _hooked(*modules: nn.Module) -> bool:
    """Whether a hook (global, or on one of `modules`) could see their inputs or outputs: forward
    hooks, and the backward hooks that Module.__call__ sets up (a loop calling forward itself would
    skip them)."""
    m = _module
    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks:
        return True
    if m._global_backward_pre_hooks:
        return True
    return any(
        mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks
        for mod in modules
    )


def _shortcut(self, x: torch.Tensor, input_dead: bool) -> tuple[torch.Tensor, bool]:
    """The block's identity branch, and whether the block holds the only reference to it. The
    downsample's conv-BN (nn.Sequential(Conv2d, BN), torchvision's and timm's) is fused when BN
    uses fixed statistics and no hook watches it: its output is then made here and dead after the
    block's add, so the tail may accumulate into it. Anything else is called as it is. Without a
    downsample the identity is the block's input, the block's own only when the caller says it is
    dead after the block (`input_dead`, see _resnet_forward)."""
    ds = self.downsample
    if ds is None:
        return x, input_dead
    if type(ds) is nn.Sequential and len(ds) == 2:
        conv, bn = ds[0], ds[1]
        if type(conv) is nn.Conv2d and _is_bn(bn) and not uses_batch_statistics(bn) and not _hooked(ds, conv, bn):
            return conv_bn_add_relu(conv, bn, x, relu=False), True
    return ds(x), False


def _basic_block_forward(self, x: torch.Tensor, *, input_dead: bool = False) -> torch.Tensor:
    # torchvision.models.resnet.BasicBlock.forward (the downsample in its place: after conv1..bn2)
    out = conv_bn_add_relu(self.conv1, self.bn1, x)
    identity, own = _shortcut(self, x, input_dead)
    return conv_bn_add_relu(self.conv2, self.bn2, out, identity, consume_residual=own)


def _bottleneck_forward(self, x: torch.Tensor, *, input_dead: bool = False) -> torch.Tensor:
    # torchvision.models.resnet.Bottleneck.forward (the downsample in its place: after conv1..bn3)
    out = conv_bn_add_relu(self.conv1, self.bn1, x)
    out = conv_bn_add_relu(self.conv2, self.bn2, out)
    identity, own = _shortcut(self, x, input_dead)
    return conv_bn_add_relu(self.conv3, self.bn3, out, identity, consume_residual=own)


_BLOCK_FORWARDS = (_basic_block_forward, _bottleneck_forward)


def _owns_block_chain(self) -> bool:
    """Whether _resnet_forward may run the blocks itself, telling each its input is dead after it:
    eager (not traced or compiled), the maxpool and every layer plain torch modules, every block
    fused, and no forward hook anywhere on the way that could keep an activation."""
    if _tracing_state() is not None or _is_compiling() or type(self.maxpool) is not nn.MaxPool2d:
        return False
    layers = (self.layer1, self.layer2, self.layer3, self.layer4)
    if any(type(layer) is not nn.Sequential for layer in layers) or _hooked(self.maxpool, *layers):
        return False
    blocks = [block for layer in layers for block in layer]
    return all(type(block).forward in _BLOCK_FORWARDS for block in blocks) and not _hooked(*blocks)


def _resnet_forward(self, x: torch.Tensor) -> torch.Tensor:
    # torchvision.models.resnet.ResNet._forward_impl, with the stem's conv-BN-ReLU fused.
    x = conv_bn_add_relu(self.conv1, self.bn1, x)
    x = self.maxpool(x)
    if _owns_block_chain(self):
        # Only this loop holds each block's input (the maxpool's output, then the previous block's
        # output), so a block without a downsample may accumulate its tail into its input, as
        # Inductor's freezing passes do for every residual add.
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = type(block).forward(block, x, input_dead=True)
    else:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.flatten(self.avgpool(x), 1)
    return self.fc(x)


register(
    Pattern(
        "torchvision.models.resnet.BasicBlock",
        "conv1-bn1-relu and the tail relu(bn2(conv2(x)) + identity)",
        lambda m: _check_parts(m, ("conv1", "conv2"), ("bn1", "bn2")),
        _basic_block_forward,
    )
)
register(
    Pattern(
        "torchvision.models.resnet.Bottleneck",
        "conv1-bn1-relu, conv2-bn2-relu and the tail relu(bn3(conv3(x)) + identity)",
        lambda m: _check_parts(m, ("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3")),
        _bottleneck_forward,
    )
)
register(
    Pattern(
        "torchvision.models.resnet.ResNet",
        "the stem's conv1-bn1-relu",
        lambda m: _check_parts(m, ("conv1",), ("bn1",)),
        _resnet_forward,
    )
)


# timm's ResNet blocks are torchvision's with optional extras (DropBlock, anti-aliasing,
# squeeze-excitation, stochastic depth) and named activations. Fused when the extras are off
# (Identity / None), which is how timm builds resnet18..152, resnext and wide_resnet by default.


def _check_timm_block(module: nn.Module, n: int) -> str | None:
    convs = tuple(f"conv{i}" for i in range(1, n + 1))
    bns = tuple(f"bn{i}" for i in range(1, n + 1))
    for name in [f"act{i}" for i in range(1, n + 1)]:
        if type(getattr(module, name, None)) is not nn.ReLU:
            return f"{name} is {type(getattr(module, name, None)).__name__}, not nn.ReLU"
    for name in ("drop_block", "aa"):
        if type(getattr(module, name, None)) is not nn.Identity:
            return f"{name} is {type(getattr(module, name, None)).__name__}; only Identity is fused"
    for name in ("se", "drop_path"):
        if getattr(module, name, None) is not None:
            return f"has {name} ({type(getattr(module, name)).__name__}); only blocks without it are fused"
    return _check_parts(module, convs, bns, relu=None)


register(
    Pattern(
        "timm.models.resnet.BasicBlock",
        "conv1-bn1-act1 and the tail act2(bn2(conv2(x)) + shortcut)",
        lambda m: _check_timm_block(m, 2),
        _basic_block_forward,
    )
)
register(
    Pattern(
        "timm.models.resnet.Bottleneck",
        "conv1-bn1-act1, conv2-bn2-act2 and the tail act3(bn3(conv3(x)) + shortcut)",
        lambda m: _check_timm_block(m, 3),
        _bottleneck_forward,
    )
)
