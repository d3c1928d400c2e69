"""How much of a ResNet training step fuse() can act on, and what the fused block tails gain there.

python -m fusedres.bench.tails [--device cpu|cuda] [--dtype bfloat16|none] [--reps N] [--out DIR]

fuse() replaces every conv's BatchNorm (+ identity) + ReLU of resnet50 with one fused call; the
convolutions, the pooling and the classifier stay torch's. This records the tails a fused
resnet50 calls (models.py's default batch and resolution for the device, channels_last), then
times each distinct one as the model runs it, forward + backward, taking turns: eager
(nn.BatchNorm2d, += identity, relu_) against fusedres (the fused module path). It also times the
eager model's whole training step. The tails' eager time over the step is the share fuse() can
act on at all, and step / (step - saved) bounds the speedup the fused tails can give the model,
whatever the end-to-end run (`python -m fusedres.bench.models`) measures on top.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fusedres
from fusedres.bench import models
from fusedres.bench.timing import quantiles
from fusedres.nn import batch_norm as fused_bn


@dataclass(frozen=True)
class Tail:
    shape: tuple[int, ...]
    residual: bool
    dtype: torch.dtype  # the activation's (autocast's)

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{dims} {'bn+add+relu' if self.residual else 'bn+relu'} {str(self.dtype).removeprefix('torch.')}"


def tail_calls(model: torch.nn.Module, batch: torch.Tensor, autocast) -> Counter:
    """The fused tails one training forward of fuse(model) calls, with how often."""
    calls: Counter = Counter()
    original = fused_bn.bn_add_relu

    def record(bn, input, residual=None, relu=True):
        calls[Tail(tuple(input.shape), residual is not None, input.dtype)] += 1
        return original(bn, input, residual, relu)

    fused_bn.bn_add_relu = record  # conv_bn_add_relu looks it up in its module at each call
    try:
        model.train()
        with autocast:
            model(batch)
    finally:
        fused_bn.bn_add_relu = original
    return calls


def tail_steps(tail: Tail, device: torch.device) -> dict[str, Callable[[], None]]:
    """One tail's forward + backward, eager and fused, on fresh channels_last tensors."""
    make = lambda: torch.randn(tail.shape, device=device, dtype=tail.dtype).contiguous(  # noqa: E731
        memory_format=torch.channels_last
    )
    x, grad = make().requires_grad_(), make()
    identity = make().requires_grad_() if tail.residual else None
    channels = tail.shape[1]
    eager_bn = torch.nn.BatchNorm2d(channels, device=device)
    fused = fusedres.nn.BatchNormAddReLU2d(channels, device=device)

    # The grads of everything that gets one in the model (nothing accumulates into .grad, as in a
    # step, where the input's grad flows on to the conv and the parameters' start at None).
    eager_wrt = tuple(t for t in (x, identity, eager_bn.weight, eager_bn.bias) if t is not None)
    fused_wrt = tuple(t for t in (x, identity, fused.weight, fused.bias) if t is not None)

    def eager():
        out = eager_bn(x)
        if identity is not None:
            out += identity
        torch.autograd.grad(torch.relu_(out), eager_wrt, grad)

    def fusedres_tail():
        torch.autograd.grad(fused(x, identity), fused_wrt, grad)

    return {"eager": eager, "fusedres": fusedres_tail}


def measure(case: models.ModelCase, device: torch.device, dtype: torch.dtype | None, reps: int) -> dict:
    torch.manual_seed(0)
    model = case.build().to(device).to(memory_format=torch.channels_last)
    batch = case.make_batch(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    calls = tail_calls(fusedres.fuse(model, inplace=False), batch, autocast)

    train_step = models._Pair(case, device, batch, autocast, {"eager": model}).step("eager", "train")

    rows = []
    for tail, count in sorted(calls.items(), key=lambda kv: (kv[0].shape[1], kv[0].shape[2], kv[0].residual)):
        steps = tail_steps(tail, device)
        for fn in steps.values():  # warm-up: allocator, lazy inits
            for _ in range(2):
                fn()
        t = {name: quantiles(s).median_ms for name, s in models.alternating_times(steps, device, reps).items()}
        rows.append({"tail": tail.label, "calls": count, "eager_ms": t["eager"], "fused_ms": t["fusedres"]})
    for _ in range(2):
        train_step()
    step_ms = quantiles(models.alternating_times({"step": train_step}, device, reps)["step"]).median_ms
    eager_total = sum(r["calls"] * r["eager_ms"] for r in rows)
    fused_total = sum(r["calls"] * r["fused_ms"] for r in rows)
    saved = eager_total - fused_total
    return {
        "model": case.name,
        "rows": rows,
        "step_ms": step_ms,
        "tails_eager_ms": eager_total,
        "tails_fused_ms": fused_total,
        "share": eager_total / step_ms,
        "speedup_bound": step_ms / (step_ms - saved),
        "ideal_bound": step_ms / (step_ms - eager_total) if eager_total < step_ms else float("inf"),
    }


def format_result(r: dict) -> str:
    lines = [f"{'tail (N x C x H x W)':<34} {'calls':>5} {'eager ms':>9} {'fused ms':>9} {'speedup':>8}"]
    lines.append("-" * len(lines[0]))
    for row in r["rows"]:
        speedup = row["eager_ms"] / row["fused_ms"]
        lines.append(
            f"{row['tail']:<34} {row['calls']:>5} {row['eager_ms']:>9.3f} {row['fused_ms']:>9.3f} {speedup:>7.2f}x"
        )
    lines.append("-" * len(lines[0]))
    lines.append(
        f"{'all tails of one step':<34} {sum(x['calls'] for x in r['rows']):>5} {r['tails_eager_ms']:>9.2f} "
        f"{r['tails_fused_ms']:>9.2f} {r['tails_eager_ms'] / r['tails_fused_ms']:>7.2f}x"
    )
    lines.append("")
    lines.append(f"eager training step of {r['model']}: {r['step_ms']:.1f} ms")
    lines.append(f"share of the step in the tails fuse() replaces: {100 * r['share']:.1f}%")
    lines.append(f"bound on fuse()'s model speedup from these tails: {r['speedup_bound']:.3f}x")
    lines.append(f"(with tails that took no time at all: {r['ideal_bound']:.3f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.tails", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="autocast dtype: bfloat16, float16 or none (default: bf16 on GPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per tail and steps (default: 20 GPU, 9 CPU)")
    p.add_argument("--out", default=None, help="directory for tails.md")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "none")
    dtype = None if dtype_name == "none" else getattr(torch, dtype_name)
    reps = args.reps or (20 if device.type == "cuda" else 9)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    result = measure(models.default_cases(device)["resnet50"], device, dtype, reps)
    text = (
        f"fusedres {fusedres.__version__} block tails on {where}, torch {torch.__version__}, autocast {dtype_name}\n\n"
    )
    text += format_result(result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tails.md"), "w") as f:
            f.write(f"# fusedres: resnet50's block tails against its training step\n\n```\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
