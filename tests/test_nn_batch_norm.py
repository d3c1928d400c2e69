"""BatchNormAddReLU*d and ConvBN(Add)ReLU2d as drop-in replacements, and the synchronized variant."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import run_distributed
from torch import nn

import fusedres
from fusedres.nn import (
    BatchNormAddReLU1d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    ConvBNAddReLU2d,
    ConvBNReLU2d,
    SyncBatchNormAddReLU2d,
)

VARIANTS = [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="cumulative-average"),
    pytest.param({"affine": False}, id="no-affine"),
    pytest.param({"track_running_stats": False}, id="no-running-stats"),
]


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("kwargs", VARIANTS)
@pytest.mark.parametrize(
    "ours_cls,torch_cls,shape",
    [
        pytest.param(BatchNormAddReLU1d, nn.BatchNorm1d, (6, 5, 7), id="1d"),
        pytest.param(BatchNormAddReLU2d, nn.BatchNorm2d, (4, 5, 6, 6), id="2d"),
        pytest.param(BatchNormAddReLU3d, nn.BatchNorm3d, (2, 5, 3, 4, 4), id="3d"),
    ],
)
def test_matches_torch_module_over_steps(ours_cls, torch_cls, shape, kwargs, autograd_path):
    torch.manual_seed(0)
    theirs = randomize(torch_cls(5, **kwargs))
    ours = ours_cls(5, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    for _step in range(3):
        x = torch.randn(shape, requires_grad=True)
        residual = torch.randn(shape, requires_grad=True)
        y = ours(x, residual)
        expected = F.relu(theirs(x) + residual)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(y.square().sum(), [x, residual, *ours.parameters()])
        want = torch.autograd.grad(expected.square().sum(), [x, residual, *theirs.parameters()])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after training steps")
    ours.eval()
    theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), F.relu(theirs(x)), rtol=1e-5, atol=1e-5)


def test_from_module_shares_state():
    bn = randomize(nn.BatchNorm2d(4))
    fused = BatchNormAddReLU2d.from_module(bn)
    assert fused.weight is bn.weight and fused.running_mean is bn.running_mean
    fused(torch.randn(2, 4, 3, 3))
    assert bn.num_batches_tracked.item() == 1
    with pytest.raises(TypeError, match="bn must be an torch.nn.modules.batchnorm.BatchNorm2d"):
        BatchNormAddReLU2d.from_module(nn.BatchNorm1d(4))


class _Scaled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_parametrized_weight_is_used(autograd_path):
    """A parametrization turns `weight` into a property (gone from _parameters): the module must
    still read it, as nn.BatchNorm2d does, not take the weight for absent."""
    from torch.nn.utils import parametrize

    theirs = randomize(nn.BatchNorm2d(4))
    ours = BatchNormAddReLU2d(4)
    ours.load_state_dict(theirs.state_dict())
    for module in (theirs, ours):
        parametrize.register_parametrization(module, "weight", _Scaled())
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y, expected = ours(x), F.relu(theirs(x))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.square().sum(), [x, ours.parametrizations.weight.original])
    want = torch.autograd.grad(expected.square().sum(), [x, theirs.parametrizations.weight.original])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def make_block(residual: bool):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = randomize(nn.BatchNorm2d(6))
    ref_conv, ref_bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    ref_conv.load_state_dict(conv.state_dict())
    ref_bn.load_state_dict(bn.state_dict())
    block = ConvBNAddReLU2d.from_modules(conv, bn) if residual else ConvBNReLU2d.from_modules(conv, bn)
    return block, ref_conv, ref_bn


@pytest.mark.parametrize("residual", [True, False], ids=["add", "noadd"])
def test_conv_bn_relu_train_eval_switching(residual, autograd_path):
    block, ref_conv, ref_bn = make_block(residual)
    assert list(block.state_dict()) == [
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    for mode in ("train", "eval", "train", "eval", "eval"):
        block.train(mode == "train")
        ref_conv.train(mode == "train")
        ref_bn.train(mode == "train")
        x = torch.randn(3, 4, 8, 8).contiguous(memory_format=torch.channels_last)
        r = torch.randn(3, 6, 8, 8) if residual else None
        y = block(x, r) if residual else block(x)
        expected = ref_bn(ref_conv(x))
        expected = F.relu(expected + r) if residual else F.relu(expected)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4, msg=f"mode {mode}")
    # The folded weights never reach the state_dict.
    assert all(not k.startswith("_") for k in block.state_dict())


def test_eval_folding_follows_parameter_updates():
    block, ref_conv, ref_bn = make_block(True)
    block.eval()
    ref_conv.eval()
    ref_bn.eval()
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        block(x, r)  # caches the folded weights
        for m in (block.conv, ref_conv):
            m.weight.mul_(1.5)
        for m in (block.bn, ref_bn):
            m.running_var.add_(0.25)
        torch.testing.assert_close(block(x, r), F.relu(ref_bn(ref_conv(x)) + r), rtol=1e-4, atol=1e-4)


def test_eval_mode_grads_flow_through_folding():
    block, ref_conv, ref_bn = make_block(True)
    block.eval()
    ref_conv.eval()
    ref_bn.eval()
    x = torch.randn(2, 4, 5, 5)
    r = torch.randn(2, 6, 5, 5)
    got = torch.autograd.grad(block(x, r).sum(), [block.conv.weight, block.bn.weight, block.bn.bias])
    want = torch.autograd.grad(F.relu(ref_bn(ref_conv(x)) + r).sum(), [ref_conv.weight, ref_bn.weight, ref_bn.bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_conv_bn_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="conv has 6 output channels but bn has 5 features"):
        ConvBNAddReLU2d(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        ConvBNReLU2d(nn.Linear(3, 6), nn.BatchNorm2d(6))


def test_sync_variant_is_plain_outside_distributed():
    torch.manual_seed(0)
    sync, plain = SyncBatchNormAddReLU2d(4), BatchNormAddReLU2d(4)
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(sync(x, r), plain(x, r))


def _sync_worker(rank, channels_last):
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(0)
    # Uneven local batches (3 and 5), as a last batch can be.
    x_full = torch.randn(8, 4, 5, 5, generator=gen) * 2 + 1
    r_full = torch.randn(8, 4, 5, 5, generator=gen)
    g_full = torch.randn(8, 4, 5, 5, generator=gen)
    lo, hi = (0, 3) if rank == 0 else (3, 8)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x_full[lo:hi].contiguous(memory_format=fmt).requires_grad_()
    r = r_full[lo:hi].clone().requires_grad_()
    module = SyncBatchNormAddReLU2d(4)
    with torch.no_grad():
        module.weight.copy_(torch.arange(1.0, 5.0))
        module.bias.copy_(torch.linspace(-0.5, 0.5, 4))
    y = module(x, r)
    (y * g_full[lo:hi]).sum().backward()
    dw = module.weight.grad.clone()
    dist.all_reduce(dw)  # what DDP does with parameter grads

    # The single-process answer on the whole batch.
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("running")}, strict=False)
    ref.running_mean.zero_()
    ref.running_var.fill_(1)
    xf, rf = x_full.clone().requires_grad_(), r_full.clone().requires_grad_()
    with torch.no_grad():
        ref.weight.copy_(torch.arange(1.0, 5.0))
        ref.bias.copy_(torch.linspace(-0.5, 0.5, 4))
    yf = F.relu(ref(xf) + rf)
    (yf * g_full).sum().backward()
    checks = {
        "out": (y, yf[lo:hi]),
        "dx": (x.grad, xf.grad[lo:hi]),
        "dresidual": (r.grad, rf.grad[lo:hi]),
        "dweight": (dw, ref.weight.grad),
        "running_mean": (module.running_mean, ref.running_mean),
        "running_var": (module.running_var, ref.running_var),
    }
    errors = {k: (a - b).abs().max().item() for k, (a, b) in checks.items()}
    return errors, y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_sync_batch_norm_matches_full_batch_on_two_processes(channels_last):
    if not fusedres.EXTENSION_LOADED and "triton" not in fusedres.available_backends("cpu"):
        pytest.skip("needs a kernel backend on cpu")
    results = run_distributed(_sync_worker, channels_last)
    for rank, (errors, layout_kept) in enumerate(results):
        assert layout_kept, f"rank {rank}: output lost the input's memory format"
        for name, err in errors.items():
            assert err < 1e-4, f"rank {rank}: {name} differs from the full-batch result by {err}"


def test_convert_sync_batchnorm_keeps_state_and_computes_batch_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4, momentum=None)))
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = list(model.parameters())
    fusedres.nn.convert_sync_batchnorm(model)
    assert [type(m).__name__ for m in model.modules()].count("SyncBatchNorm2d") == 2
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    x = torch.randn(5, 3, 6, 6)
    for _ in range(2):  # outside distributed training: plain BatchNorm, running stats included
        torch.testing.assert_close(model(x), reference(x))
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b)
