"""A fused model trains under DistributedDataParallel (2 CPU processes, gloo) and gets the grads
one process gets on the whole batch: for a ResNet through synchronized BatchNorm (fusedres's
SyncBatchNorm2d, since DDP refuses nn.SyncBatchNorm on the CPU), for a transformer stack because
its norms never mix samples."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import run_distributed
from torch import nn

import fusedres

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock  # noqa: E402


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            BasicBlock(16, 16),
            BasicBlock(16, 16),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 5),
        )
    layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return nn.Sequential(encoder, nn.Flatten(), nn.Linear(7 * 32, 5))


def _batch(kind: str):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 10, 10, generator=gen) if kind == "resnet" else torch.randn(8, 7, 32, generator=gen)
    return x, torch.randint(0, 5, (8,), generator=gen)


def _worker(rank: int, kind: str):
    from torch.nn.parallel import DistributedDataParallel

    original = _model(kind)
    reference = copy.deepcopy(original)  # one process, whole batch, plain torch
    model = fusedres.nn.convert_sync_batchnorm(original) if kind == "resnet" else original
    model, report = fusedres.fuse(model, report=True)
    ddp = DistributedDataParallel(model)
    x, y = _batch(kind)
    lo, hi = rank * 4, rank * 4 + 4
    nn.functional.cross_entropy(ddp(x[lo:hi]), y[lo:hi]).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    errors = {
        f"{name}.grad": (p.grad - q.grad).abs().max().item()
        for (name, p), q in zip(model.named_parameters(), reference.parameters())
    }
    errors.update(
        {
            name: (b - c).abs().max().item()
            for (name, b), c in zip(model.named_buffers(), reference.buffers())
            if b.is_floating_point()
        }
    )
    return len(report.replaced), errors


@pytest.mark.parametrize("kind,blocks", [("resnet", 2), ("transformer", 2)])
def test_ddp_grads_match_one_process_on_the_whole_batch(kind, blocks):
    if "cpu" not in fusedres.available_backends("cpu"):
        pytest.skip("the synchronized BatchNorm path needs the cpu kernel backend")
    results = run_distributed(_worker, kind)
    for rank, (replaced, errors) in enumerate(results):
        assert replaced == blocks, f"rank {rank}: {replaced} blocks fused"
        for name, err in errors.items():
            assert err < 1e-5, f"rank {rank}: {name} differs from the one-process result by {err}"
