"""End-to-end: a training step (forward, backward, optimizer) and inference of whole models,
before and after fusedres.fuse(), with throughput and peak memory.

python -m fusedres.bench.models [--models resnet50 gpt2 llama qwen3-moe vit] [--device cuda|cpu]
                                [--dtype bf16|fp16|none] [--out DIR] [--compile]
python -m fusedres.bench.models --models resnet50-eval resnet18-eval   # inference vs compile with freezing

Models are built from configs with random weights (nothing is downloaded): torchvision's
resnet50 in channels_last, a GPT-2-small stack (transformers' GPT2Model), a Llama-like stack
(LlamaModel), a Qwen3-MoE-like stack (Qwen3MoeModel: Mixtral's layer with Qwen3's attention) and
a ViT (timm's VisionTransformer). Beside each transformer's fused row: the bound its add -> norm
sites allow (bench/bounds.py: the original step with those sites taking no time, over the
original step), and their share of the step. On a GPU the defaults are the issue's targets (bf16,
resnet50 at batch 256); on the CPU, small batches and fp32 so a run takes a few minutes. --dtype
bf16 trains under autocast and runs inference with the model itself in bf16, as each is done in
practice. The original and fused copies share initial weights and are timed in turns (step by
step), so drift in the machine hits both alike.

--compile adds rows for torch.compile(model) ("compiled") against torch.compile(fuse(model))
("fused compiled"), timed in turns with each other; their speedup is over "compiled" (each row's
`baseline` names what its speedup divides). The first steps compile: they are warm-up, never
timed, and their wall time is the row's `compile_s`. Each compiled variant's warm-up is
time-boxed (--compile-timeout); past it that mode's compiled pair is left out, with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import fusedres
from fusedres.bench import bounds
from fusedres.bench.timing import quantiles


@dataclass(frozen=True)
class ModelCase:
    name: str
    unit: str  # what throughput counts: "images" or "tokens"
    build: Callable[[], torch.nn.Module]
    make_batch: Callable[[torch.device], torch.Tensor]
    items_per_batch: int
    channels_last: bool = False

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(batch)
        out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        return out.float().square().mean()


def _resnet50(batch: int, size: int) -> ModelCase:
    def build():
        from torchvision.models import resnet50

        return resnet50()

    return ModelCase(
        f"resnet50 b{batch} {size}px",
        "images",
        build,
        lambda dev: torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last),
        batch,
        channels_last=True,
    )


def _gpt2(batch: int, seq: int, layers: int) -> ModelCase:
    def build():
        from transformers import GPT2Config, GPT2Model

        return GPT2Model(GPT2Config(n_embd=768, n_layer=layers, n_head=12, n_positions=max(seq, 1024)))

    return ModelCase(
        f"gpt2-small-like {layers}L b{batch} s{seq}",
        "tokens",
        build,
        lambda dev: torch.randint(0, 50257, (batch, seq), device=dev),
        batch * seq,
    )


def _llama(batch: int, seq: int, layers: int, hidden: int) -> ModelCase:
    def build():
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=int(hidden * 8 / 3) // 64 * 64,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 256),
            max_position_embeddings=max(seq, 2048),
        )
        return LlamaModel(cfg)

    return ModelCase(
        f"llama-like {layers}L d{hidden} b{batch} s{seq}",
        "tokens",
        build,
        lambda dev: torch.randint(0, 32000, (batch, seq), device=dev),
        batch * seq,
    )


def _qwen3_moe(batch: int, seq: int, layers: int, hidden: int, experts: int) -> ModelCase:
    def build():
        from transformers import Qwen3MoeConfig, Qwen3MoeModel

        cfg = Qwen3MoeConfig(
            vocab_size=32000,
            hidden_size=hidden,
            moe_intermediate_size=hidden // 2,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 256),
            head_dim=64,
            num_experts=experts,
            num_experts_per_tok=2,
            max_position_embeddings=max(seq, 2048),
        )
        return Qwen3MoeModel(cfg)

    return ModelCase(
        f"qwen3-moe-like {layers}L d{hidden} e{experts} b{batch} s{seq}",
        "tokens",
        build,
        lambda dev: torch.randint(0, 32000, (batch, seq), device=dev),
        batch * seq,
    )


def _vit(batch: int, size: int, layers: int, dim: int) -> ModelCase:
    def build():
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=size, patch_size=16, embed_dim=dim, depth=layers, num_heads=dim // 64)

    return ModelCase(
        f"vit-like {layers}L d{dim} b{batch} {size}px",
        "images",
        build,
        lambda dev: torch.randn(batch, 3, size, size, device=dev),
        batch,
    )


def default_cases(device: torch.device) -> dict[str, ModelCase]:
    if device.type == "cuda":
        return {
            "resnet50": _resnet50(256, 224),
            "gpt2": _gpt2(16, 1024, 12),
            "llama": _llama(8, 2048, 8, 2048),
            "qwen3-moe": _qwen3_moe(8, 2048, 8, 2048, 16),
            "vit": _vit(128, 224, 12, 768),
        }
    return {
        "resnet50": _resnet50(4, 128),
        "gpt2": _gpt2(2, 128, 4),
        "llama": _llama(2, 128, 4, 512),
        "qwen3-moe": _qwen3_moe(2, 128, 4, 512, 8),
        "vit": _vit(8, 160, 6, 384),
    }


def _time_call(fn: Callable[[], None], device: torch.device) -> float:
    """One call's wall time in ms (the GPU drained before and after, since a step is long)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def alternating_times(fns: dict[str, Callable[[], None]], device: torch.device, reps: int) -> dict[str, list[float]]:
    """Times each callable `reps` times, taking turns (a, b, a, b, ...), so that a slow stretch of
    the machine (another process, thermal or frequency changes) lands on both alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_call(fn, device))
    return samples


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class CompileTimeout(BaseException):
    """Raised from a SIGALRM when compilation outlasts its box. A BaseException, so that nothing on
    the way (dynamo's error handling included) can swallow it and quietly run the model eagerly."""


@contextlib.contextmanager
def time_box(seconds: float | None):
    """Raises CompileTimeout in the block after `seconds` (main thread on POSIX; elsewhere, or
    with no seconds, the block is not boxed)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise CompileTimeout(f"compilation took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    timeout_s: float | None = 600.0  # per compiled variant and mode: its warm-up steps
    warmup: int = 3  # untimed steps; the first compiles (train: forward and backward)


def bench_model(
    case: ModelCase,
    device: torch.device,
    dtype: torch.dtype | None,
    reps: int,
    compile: CompileOptions | None = None,
    notes: list[str] | None = None,
) -> list[dict]:
    """Rows for (train, inference) x (original, fused); with `compile`, then (train, inference) x
    (compiled, fused compiled). Reasons for compiled rows left out go to `notes`. With a `dtype`,
    training runs under autocast to it and inference runs the models in it (see in_dtype)."""
    torch.manual_seed(0)
    original = case.build().to(device)
    if case.channels_last:
        original = original.to(memory_format=torch.channels_last)
    fused = fusedres.fuse(copy.deepcopy(original))
    setups = {
        mode: in_dtype(mode, {"original": original, "fused": fused}, case.make_batch(device), dtype) for mode in MODES
    }
    rows = []
    for mode, (models, batch, ctx) in setups.items():
        pair_rows = _Pair(case, device, batch, ctx, models).rows(mode, reps)
        rows += pair_rows
        # the bound the fused sites' share of the original step allows (autocast in training only:
        # inference runs the model itself in dtype)
        original_row, fused_row = pair_rows
        site_dtype = dtype if mode == "train" else None
        bound = bounds.bound(case, models["fused"], batch, device, site_dtype, mode, original_row["median_ms"], reps)
        fused_row.update(bound or {})
    if compile is None:
        return rows
    torch._dynamo.reset()  # a fresh cache per model: recompile limits count per code object
    wrappers = {}  # one torch.compile per model object: modes that run the same model share it

    def compiled_of(model):
        if id(model) not in wrappers:
            wrappers[id(model)] = torch.compile(model, backend=compile.backend)
        return wrappers[id(model)]

    for mode, (models, batch, ctx) in setups.items():
        compiled = {"compiled": compiled_of(models["original"]), "fused compiled": compiled_of(models["fused"])}
        try:
            rows += _Pair(case, device, batch, ctx, compiled, compile).rows(mode, reps)
        except CompileTimeout as e:
            torch._dynamo.reset()
            if notes is not None:
                notes.append(f"{case.name} {mode}: compiled rows left out: {e} ({compile.backend})")
    return rows


MODES = ("train", "inference")


def in_dtype(mode: str, models: dict, batch: torch.Tensor, dtype: torch.dtype | None):
    """(models, batch, context) a mode runs with. Training in a low precision is autocast (fp32
    master weights); inference runs the model itself in it, as it is deployed: copies of the
    models, and the batch (unless it is token ids), cast to `dtype`."""
    if dtype is None:
        return models, batch, contextlib.nullcontext()
    if mode == "train":
        return models, batch, torch.autocast(batch.device.type, dtype=dtype)
    cast = {name: copy.deepcopy(m).to(dtype) for name, m in models.items()}
    return cast, batch.to(dtype) if batch.is_floating_point() else batch, contextlib.nullcontext()


class _Pair:
    """Two variants of one model (a baseline first), each with its own optimizer, timed in turns."""

    def __init__(self, case, device, batch, autocast, variants: dict, compile: CompileOptions | None = None):
        self.case, self.device, self.batch, self.autocast = case, device, batch, autocast
        self.variants, self.compile = variants, compile
        self.optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in variants.items()}

    def step(self, name: str, mode: str) -> Callable[[], None]:
        model, opt = self.variants[name], self.optimizers[name]
        case, batch, autocast = self.case, self.batch, self.autocast

        def train_step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = case.loss(model, batch)
            loss.backward()
            opt.step()

        @torch.no_grad()
        def infer():
            with autocast:
                model(batch)

        return train_step if mode == "train" else infer

    def rows(self, mode: str, reps: int) -> list[dict]:
        for m in self.variants.values():
            m.train(mode == "train")
        fns = {name: self.step(name, mode) for name in self.variants}
        warmup = self.compile.warmup if self.compile else 2
        compile_s = {}
        for name, fn in fns.items():  # warm-up: compilation, allocator, autotuning, lazy inits
            start = time.perf_counter()
            with time_box(self.compile.timeout_s if self.compile else None):
                for _ in range(warmup):
                    fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            compile_s[name] = time.perf_counter() - start if self.compile else None
        peaks = {}
        for name, fn in fns.items():  # peak memory of one step each, measured apart
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            peaks[name] = _peak_bytes(self.device)
        timings = {name: quantiles(t) for name, t in alternating_times(fns, self.device, reps).items()}
        baseline = next(iter(fns))
        case = self.case
        return [
            {
                "model": case.name,
                "mode": mode,
                "variant": name,
                "median_ms": t.median_ms,
                "p20_ms": t.p20_ms,
                "p80_ms": t.p80_ms,
                "throughput": case.items_per_batch / (t.median_ms * 1e-3),
                "unit": f"{case.unit}/s",
                "peak_mem_gb": peaks[name] / 1e9 if peaks[name] is not None else None,
                "speedup": timings[baseline].median_ms / t.median_ms,
                "baseline": baseline,
                "compile_s": compile_s[name],
            }
            for name, t in timings.items()
        ]


# --- inference against torch.compile with freezing -------------------------------------------------
# `--models resnet50-eval resnet18-eval`: eager, fuse() and torch.compile with Inductor's freezing
# (folded BN, prepacked oneDNN convs: what a user wanting CPU speed picks), in fp32 and with the
# model in bf16, channels_last, timed in turns. The compiled row's `compile_s` is its first call
# (compilation) plus warm-up, reported beside its steady-state time.

EVAL_DTYPES = (torch.float32, torch.bfloat16)


def _resnet_eval(arch: str, batch: int, size: int) -> ModelCase:
    def build():
        from torchvision import models as tv

        return getattr(tv, arch)()

    return ModelCase(
        f"{arch} eval b{batch} {size}px",
        "images",
        build,
        lambda dev: torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last),
        batch,
        channels_last=True,
    )


def eval_cases(device: torch.device) -> dict[str, ModelCase]:
    batch = 8 if device.type == "cpu" else 256
    return {
        "resnet50-eval": _resnet_eval("resnet50", batch, 224),
        "resnet18-eval": _resnet_eval("resnet18", batch, 224),
    }


def bench_eval(
    case: ModelCase,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    timeout_s: float | None = None,
    notes: list[str] | None = None,
) -> list[dict]:
    """Rows for eager, fused and torch.compile(freezing=True) inference of `case` in `dtype`, each
    with its output's largest distance to a float64 copy of the model (`err_vs_fp64`) and whether
    that is within the tests' rule (2x eager's distance + atol), also written to `notes`."""
    import torch._inductor.config as inductor_config

    from fusedres.testing import max_abs_error, parity_bound, ref_scale

    torch.manual_seed(0)
    original = case.build().to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    fused = fusedres.fuse(copy.deepcopy(original))
    torch._dynamo.reset()
    compiled = torch.compile(original)
    batch = case.make_batch(device).to(dtype)
    fns = {}
    for name, model in (("original", original), ("fused", fused), ("compiled freezing", compiled)):
        fns[name] = torch.no_grad()(lambda model=model: model(batch))
    compile_s = {}
    with inductor_config.patch(freezing=True):
        for name, fn in fns.items():  # warm-up: compilation, prepacking, allocator
            start = time.perf_counter()
            with time_box(timeout_s if name.startswith("compiled") else None):
                for _ in range(2):
                    fn()
            compile_s[name] = time.perf_counter() - start if name.startswith("compiled") else None
    timings = {name: quantiles(t) for name, t in alternating_times(fns, device, reps).items()}
    label = f"{case.name} {str(dtype).removeprefix('torch.')}"
    with torch.no_grad():
        ref = copy.deepcopy(original).double()(batch.double())
        errors = {name: max_abs_error(fn().double(), ref) for name, fn in fns.items()}
    bound = parity_bound(errors["original"], dtype, ref_scale(ref))
    if notes is not None:
        listed = ", ".join(f"{name} {err:.3g}" for name, err in errors.items())
        notes.append(f"{label}: max |out - float64 copy|: {listed}; the rule's bound {bound:.3g}")
    return [
        {
            "model": label,
            "mode": "inference",
            "variant": name,
            "dtype": str(dtype).removeprefix("torch."),
            "median_ms": t.median_ms,
            "p20_ms": t.p20_ms,
            "p80_ms": t.p80_ms,
            "throughput": case.items_per_batch / (t.median_ms * 1e-3),
            "unit": f"{case.unit}/s",
            "peak_mem_gb": None,
            "speedup": timings["original"].median_ms / t.median_ms,
            "baseline": "original",
            "compile_s": compile_s[name],
            "err_vs_fp64": errors[name],
            "within_rule": errors[name] <= bound,
        }
        for name, t in timings.items()
    ]


def _eval_rows(
    case: ModelCase,
    device: torch.device,
    only: torch.dtype | None,
    reps: int,
    timeout_s: float | None,
    notes: list[str],
):
    """The inference rows in `only` (the dtype --dtype names), else in each of EVAL_DTYPES."""
    rows = []
    for dtype in (only,) if only else EVAL_DTYPES:
        try:
            rows += bench_eval(case, device, dtype, reps, timeout_s, notes)
        except CompileTimeout as e:
            torch._dynamo.reset()
            notes.append(f"{case.name} {dtype}: left out: {e}")
    return rows


def format_rows(rows: list[dict]) -> str:
    compiled = any(r.get("compile_s") is not None for r in rows)
    bounded = any("bound" in r for r in rows)
    header = f"{'model':<34} {'mode':<10} {'variant':<14} {'ms':>9} {'throughput':>16} {'peak GB':>8} {'speedup':>8}"
    header += f" {'over':<9} {'compile s':>9}" if compiled else ""
    header += f" {'bound':>7} {'share':>6}" if bounded else ""
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "n/a"
        line = (
            f"{r['model']:<34} {r['mode']:<10} {r['variant']:<14} {r['median_ms']:>9.1f} "
            f"{r['throughput']:>9.1f} {r['unit']:<6} {peak:>8} {r['speedup']:>7.2f}x"
        )
        if compiled:
            compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
            line += f" {r.get('baseline', 'original'):<9} {compile_s:>9}"
        if bounded:
            line += f" {r['bound']:>6.3f}x {100 * r['share']:>5.1f}%" if "bound" in r else f" {'-':>7} {'-':>6}"
        lines.append(line)
    return "\n".join(lines)


DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "none": "none"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.models", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="resnet50, gpt2, llama, qwen3-moe, vit (default: all); resnet50-eval, resnet18-eval: inference in "
        "fp32 and bf16 against torch.compile with freezing",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPE_NAMES),
        help="training under autocast to it, inference with the model in it (default: bf16 on GPU, none on CPU)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant (default: 20 GPU, 5 CPU)")
    p.add_argument("--out", default=None, help="directory for models.json and models.md")
    c = p.add_argument_group("torch.compile")
    c.add_argument("--compile", action="store_true", help="also torch.compile(model) vs torch.compile(fuse(model))")
    c.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    c.add_argument(
        "--compile-timeout",
        type=float,
        default=CompileOptions.timeout_s,
        help="seconds each compiled variant may spend in its warm-up (compiling) per mode; 0: no limit "
        "(default: %(default)s)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = DTYPE_NAMES[args.dtype or ("bf16" if device.type == "cuda" else "none")]
    dtype = None if dtype_name == "none" else getattr(torch, dtype_name)
    reps = args.reps or (20 if device.type == "cuda" else 5)
    compile_options = CompileOptions(args.compile_backend, args.compile_timeout or None) if args.compile else None
    cases = default_cases(device)
    names = args.models or list(cases)
    evals = eval_cases(device)
    unknown = sorted(set(names) - set(cases) - set(evals))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(cases)}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    compiled = f", torch.compile backend {args.compile_backend}" if args.compile else ""
    precision = f"{dtype_name} (train: autocast, inference: model in {dtype_name})" if dtype else "float32"
    print(f"fusedres {fusedres.__version__} end-to-end on {where}, {precision}{compiled}", flush=True)
    rows, notes = [], []
    for name in names:
        if name in evals:
            rows += _eval_rows(
                evals[name], device, dtype if args.dtype else None, reps, args.compile_timeout or None, notes
            )
            print(f"done {evals[name].name}", file=sys.stderr, flush=True)
            continue
        rows += bench_model(cases[name], device, dtype, reps, compile_options, notes)
        print(f"done {cases[name].name}", file=sys.stderr, flush=True)
    table = format_rows(rows)
    print(table)
    for n in notes:
        print(f"note: {n}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = {"device": where, "torch": torch.__version__, "fusedres": fusedres.__version__, "autocast": dtype_name}
        if args.compile:
            env["compile_backend"] = args.compile_backend
        cases_run = [asdict({**cases, **evals}[n])["name"] for n in names]
        with open(os.path.join(args.out, "models.json"), "w") as f:
            json.dump({"environment": env, "rows": rows, "cases": cases_run, "notes": notes}, f)
        with open(os.path.join(args.out, "models.md"), "w") as f:
            f.write(f"# fusedres end-to-end\n\n{env}\n\n```\n{table}\n```\n")
            f.write("".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
