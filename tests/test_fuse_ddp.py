"""A fused model trains under DistributedDataParallel (2 CPU processes, gloo) and gets the grads
one process gets on the whole batch: for a ResNet through synchronized BatchNorm (fusedres's
SyncBatchNorm2d, since DDP refuses nn.SyncBatchNorm on the CPU), for a transformer stack because
its norms never mix samples."""

from __future__ import annotations

import copy
import os
import socket
import traceback

import pytest
import torch
from torch import nn

import fusedres

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank: int, port: int, kind: str, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
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
        queue.put((rank, len(report.replaced), errors))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind,blocks", [("resnet", 2), ("transformer", 2)])
def test_ddp_grads_match_one_process_on_the_whole_batch(kind, blocks):
    if "cpu" not in fusedres.available_backends("cpu"):
        pytest.skip("the synchronized BatchNorm path needs the cpu kernel backend")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, kind, queue)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, replaced, errors in results:
        assert replaced is not None, f"rank {rank} failed:\n{errors}"
        assert replaced == blocks, f"rank {rank}: {replaced} blocks fused"
        for name, err in errors.items():
            assert err < 1e-5, f"rank {rank}: {name} differs from the one-process result by {err}"
