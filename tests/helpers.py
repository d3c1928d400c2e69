"""Shared test utilities: which (device, backend) pairs to run, and the tolerance rule."""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres.testing import max_abs_error, parity_bound, ref_scale


def device_backends(include_reference: bool = True):
    """pytest params (device, backend) for every backend usable on CPU here, plus the CUDA and
    Triton backends on a GPU (marked `gpu`, skipped without one)."""
    params = [
        pytest.param("cpu", b, id=f"cpu-{b}")
        for b in fusedres.available_backends("cpu")
        if include_reference or b != "reference"
    ]
    for b in ("cuda", "triton"):
        params.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu))
    return params


def skip_if_unusable(device: str, backend: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend not in fusedres.available_backends(device):
        pytest.skip(f"backend {backend} is not usable on {device} here")


def describe_mismatch(ours: torch.Tensor, ref: torch.Tensor, bound: float) -> str:
    err = (ours.double() - ref.double()).abs()
    bad = err > bound
    idx = torch.nonzero(bad)[:5].tolist()
    rows = [f"  at {i}: ours={ours[tuple(i)].item():.6g} ref={ref[tuple(i)].item():.6g}" for i in idx]
    return (
        f"{int(bad.sum())} of {err.numel()} elements off by more than {bound:.3g} (max {err.max().item():.3g}):\n"
        + "\n".join(rows)
    )


def assert_close_to_ref(name: str, ours, eager, ref, dtype: torch.dtype) -> None:
    """ours and eager computed in `dtype`, ref in float64; NaN/Inf must sit where ref has them."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours64, eager64, ref64 = ours.double(), eager.double(), ref.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isnan(ours64), torch.isnan(ref64)), f"{name}: NaNs differ from the reference"
    assert torch.equal(ours64[~finite & ~torch.isnan(ref64)], ref64[~finite & ~torch.isnan(ref64)]), (
        f"{name}: infinities differ from the reference"
    )
    bound = parity_bound(max_abs_error(eager64, ref64), dtype, ref_scale(ref64))
    err = max_abs_error(ours64, ref64)
    assert err <= bound, f"{name} ({dtype}): " + describe_mismatch(
        torch.where(finite, ours64, 0), torch.where(finite, ref64, 0), bound
    )


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter grad and floating buffer (BN running stats), by name."""
    out = {f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None}
    out.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return out


def assert_model_parity(
    fused: torch.nn.Module, original: torch.nn.Module, reference: torch.nn.Module, atol: float = 1e-5
) -> None:
    """The flash-attn rule, model-wide: for every grad and running stat, the fused model's distance
    to a float64 copy of the original is at most twice the original's own, plus atol x magnitude."""
    ours, eager, ref = _model_tensors(fused), _model_tensors(original), _model_tensors(reference)
    assert ours.keys() == eager.keys() == ref.keys(), set(ours) ^ set(eager)
    for name, r in ref.items():
        assert_within_rule(name, ours[name], eager[name], r, atol)


def assert_within_rule(name: str, ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    assert ours.shape == eager.shape and ours.dtype == eager.dtype, (
        f"{name}: {ours.dtype}{tuple(ours.shape)} vs {eager.dtype}{tuple(eager.shape)}"
    )
    ref64 = ref.detach().double()
    err = max_abs_error(ours.detach().double(), ref64)
    bound = 2 * max_abs_error(eager.detach().double(), ref64) + atol * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: max error vs float64 {err:.3g} above {bound:.3g}"


def assert_checkpoints_load_both_ways(fused: torch.nn.Module, plain: torch.nn.Module) -> None:
    """A state_dict saved from either model loads into the other, key for key and value for value."""
    import io

    for src, dst in ((fused, plain), (plain, fused)):
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        buf.seek(0)
        dst.load_state_dict(torch.load(buf))
        for (ka, a), (kb, b) in zip(src.state_dict().items(), dst.state_dict().items()):
            assert ka == kb and torch.equal(a, b), ka


def _distributed_worker(target, rank: int, world: int, port: int, queue, args) -> None:
    import os
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, True, target(rank, *args)))
    except Exception:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_distributed(target, *args, world: int = 2, timeout: float = 240) -> list:
    """target(rank, *args) in `world` spawned CPU processes joined by a gloo process group; returns
    what each returned, by rank. A failure in any process fails the test with its traceback."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_distributed_worker, args=(target, rank, world, port, queue, args)) for rank in range(world)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for rank, ok, value in results:
        assert ok, f"rank {rank} failed:\n{value}"
    return [value for _, _, value in sorted(results, key=lambda r: r[0])]
