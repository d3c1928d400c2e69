"""A detection backbone's case: resnet50 with FrozenBatchNorm2d, fused, against eager and float64.

python -m fusedres.bench.frozen [--batch 8] [--size 224] [--reps 3] [--device cpu|cuda] [--out DIR]

torchvision's detection models (Faster/Mask R-CNN, RetinaNet) build their ResNet backbone with
torchvision.ops.misc.FrozenBatchNorm2d and fine-tune the convs of layer2..layer4 (the stem and
layer1 frozen too, torchvision's default of three trainable layers). This builds that model
(random weights, random frozen statistics, channels_last) and reports:

- what fuse() fused and skipped;
- inference: the logits of fuse(model), eager and a float64 copy; fused within the tests' rule
  (|fused - fp64| <= 2 |eager - fp64| + atol) or not; times, in turns;
- a fine-tuning step (cross-entropy on the logits, backward): every trainable parameter's grad
  the same way; the step's time, in turns.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

import fusedres
from fusedres.bench.models import alternating_times
from fusedres.bench.timing import quantiles
from fusedres.testing import max_abs_error, parity_bound, ref_scale

TRAINABLE = ("layer2", "layer3", "layer4", "fc")  # torchvision's resnet_fpn_backbone default: 3 layers


def build(device: torch.device) -> torch.nn.Module:
    from torchvision.models import resnet50
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = resnet50(norm_layer=FrozenBatchNorm2d)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):  # statistics as pretrained weights have them, not 0 and 1
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE))
    return model.to(device=device, memory_format=torch.channels_last).train()  # FrozenBN ignores train()


def _judge(name: str, ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict:
    ref = ref.double()
    err, eager_err = max_abs_error(ours.double(), ref), max_abs_error(eager.double(), ref)
    bound = parity_bound(eager_err, dtype, ref_scale(ref))
    return {"tensor": name, "fused_err": err, "eager_err": eager_err, "bound": bound, "within_rule": err <= bound}


def run(device: torch.device, batch: int, size: int, reps: int) -> dict:
    original = build(device)
    fused, report = fusedres.fuse(copy.deepcopy(original), report=True)
    reference = copy.deepcopy(original).double()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    models = {"eager": original, "fused": fused}

    with torch.no_grad():
        logits = {name: m(x) for name, m in models.items()}
        ref_logits = reference(x.double())
    parity = [_judge("logits (inference)", logits["fused"], logits["eager"], ref_logits, x.dtype)]

    grads = {}
    for name, m in {**models, "fp64": reference}.items():
        m.zero_grad(set_to_none=True)
        inp = x.double() if name == "fp64" else x
        torch.nn.functional.cross_entropy(m(inp), target).backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    parity += [
        _judge(f"{n}.grad", grads["fused"][n], grads["eager"][n], grads["fp64"][n], x.dtype) for n in grads["fp64"]
    ]

    def infer(m):
        return torch.no_grad()(lambda: m(x))

    def step(m):
        def fn():
            m.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), target).backward()

        return fn

    timings = {}
    for mode, make in (("inference", infer), ("fine-tuning step", step)):
        fns = {name: make(m) for name, m in models.items()}
        for fn in fns.values():
            fn()
        t = {name: quantiles(v).median_ms for name, v in alternating_times(fns, device, reps).items()}
        timings[mode] = {**t, "speedup": t["eager"] / t["fused"]}
    return {
        "model": f"resnet50 FrozenBatchNorm2d b{batch} {size}px channels_last, {x.dtype}",
        "fused_blocks": len(report.replaced),
        "skipped_blocks": len(report.skipped),
        "report": str(report),
        "parity": parity,
        "timings_ms": timings,
    }


def markdown(result: dict, where: str) -> str:
    bad = [p for p in result["parity"] if not p["within_rule"]]
    worst = max(result["parity"], key=lambda p: p["fused_err"] / p["bound"])
    lines = [
        f"# fusedres: {result['model']}, {where}",
        "",
        f"fuse(): {result['fused_blocks']} blocks fused, {result['skipped_blocks']} skipped.",
        "",
        f"Parity against a float64 copy (the tests' rule, |fused - fp64| <= 2 |eager - fp64| + atol): "
        f"{len(result['parity']) - len(bad)} of {len(result['parity'])} tensors within it (the logits, then every "
        f"trainable parameter's grad after one cross-entropy backward). Closest to its bound: {worst['tensor']} "
        f"({worst['fused_err']:.3g} against {worst['bound']:.3g}; eager {worst['eager_err']:.3g}).",
        "",
        "| | eager ms | fused ms | speedup |",
        "|---|---:|---:|---:|",
    ]
    for mode, t in result["timings_ms"].items():
        lines.append(f"| {mode} | {t['eager']:.1f} | {t['fused']:.1f} | {t['speedup']:.2f}x |")
    if bad:
        lines += ["", "Outside the rule: " + ", ".join(p["tensor"] for p in bad)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.frozen", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3, help="timed calls per variant and mode, in turns")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="directory for frozen.json and frozen.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    result = run(device, args.batch, args.size, args.reps)
    text = markdown(result, where)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = {"device": where, "torch": torch.__version__, "fusedres": fusedres.__version__}
        with open(os.path.join(args.out, "frozen.json"), "w") as f:
            json.dump({"environment": env, **result}, f)
        with open(os.path.join(args.out, "frozen.md"), "w") as f:
            f.write(text + f"\n{env}\n")
    return 0 if all(p["within_rule"] for p in result["parity"]) and not result["skipped_blocks"] else 1


if __name__ == "__main__":
    sys.exit(main())
