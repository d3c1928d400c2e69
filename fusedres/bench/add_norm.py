"""Add & Norm benchmark cases (the harness in harness.py runs them; registry.py lists them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedres
from fusedres.bench.byte_model import add_norm_bytes
from fusedres.reference import add_norm_reference

# Hidden sizes of the models whose residual Add & Norm fusedres replaces.
MODEL_HIDDEN_SIZES = {
    768: "BERT-base, GPT-2",
    1024: "BERT-large, GPT-2 medium",
    1280: "GPT-2 large",
    1600: "GPT-2 XL",
    4096: "Llama-7B",
    8192: "Llama-70B",
}
# Tokens per step on a GPU: a training micro-batch such as 8 sequences of 2048.
GPU_TOKENS = 16384


@dataclass(frozen=True)
class NormCase:
    m: int  # tokens (rows)
    n: int  # hidden size (the normalized dimension)
    dtype: torch.dtype
    rms_norm: bool
    prenorm: bool = False
    # The fp32 residual stream of flash-attn / Mamba training: residual and h in fp32 (and the
    # weights with them, as fp32 master parameters), x and y in `dtype`.
    residual_in_fp32: bool = False

    input_names = ("x", "residual", "weight", "bias")

    @property
    def op(self) -> str:
        return "add_rms_norm" if self.rms_norm else "add_layer_norm"

    @property
    def variant(self) -> str:
        return ("/prenorm" if self.prenorm else "") + ("/fp32res" if self.residual_in_fp32 else "")

    @property
    def label(self) -> str:
        return f"{self.op}{self.variant} {self.m}x{self.n} {_name(self.dtype)}"

    @property
    def plot_group(self) -> str:
        return f"{self.op}{self.variant} {_name(self.dtype)} M={self.m}"

    @property
    def plot_x(self) -> int:
        return self.n

    plot_x_label = "hidden size"

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("y", "h") if self.prenorm else ("y",)

    @property
    def eps(self) -> float:
        return 1e-6 if self.rms_norm else 1e-5

    @property
    def _stream_dtype(self) -> torch.dtype:
        return torch.float32 if self.residual_in_fp32 else self.dtype

    def make_inputs(self, device, small: bool = False, seed: int = 0):
        """x, residual, weight, bias (None for RMSNorm); `small` keeps parity checks cheap."""
        m = min(self.m, 512) if small else self.m
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape, dtype=self.dtype, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

        stream = self._stream_dtype
        x, residual = rand(m, self.n, shift=0.5), rand(m, self.n, dtype=stream)
        weight = rand(self.n, dtype=stream, scale=0.5, shift=1.0)
        return [x, residual, weight, None if self.rms_norm else rand(self.n, dtype=stream, scale=0.5)]

    def eager(self):
        """The code fusedres replaces, as a user writes it."""

        def fn(x, residual, weight, bias):
            h = x + residual
            n = (self.n,)
            y = F.rms_norm(h, n, weight, self.eps) if self.rms_norm else F.layer_norm(h, n, weight, bias, self.eps)
            y = y.to(x.dtype)  # a no-op unless h is an fp32 residual stream
            return (y, h) if self.prenorm else y

        return fn

    def fused(self):
        kw = dict(prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32)
        if self.rms_norm:
            return lambda x, r, w, b: fusedres.add_rms_norm(x, r, w, self.eps, **kw)
        return lambda x, r, w, b: fusedres.add_layer_norm(x, r, w, b, self.eps, **kw)

    def reference(self):
        kw = dict(rms_norm=self.rms_norm, prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32)
        return lambda x, r, w, b: add_norm_reference(x, r, w, b, self.eps, **kw)

    def bytes_moved(self, direction: str) -> int:
        stream = self._stream_dtype
        return add_norm_bytes(
            self.m,
            self.n,
            x_dtype=self.dtype,
            residual_dtype=stream,
            h_dtype=stream,
            weight_dtype=stream,
            has_bias=not self.rms_norm,
            rms_norm=self.rms_norm,
            prenorm=self.prenorm,
            store_h=True,
            direction=direction,
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# The four forms: (rms_norm, prenorm). BERT is post-norm LayerNorm, GPT-2 pre-norm LayerNorm,
# Llama pre-norm RMSNorm; post-norm RMSNorm completes the square.
FORMS = ((False, False), (False, True), (True, False), (True, True))


def smoke_cases(device: torch.device) -> list[NormCase]:
    """Tiny shapes for CI: every form runs in well under a second."""
    return [NormCase(64, 256, torch.float32, rms, pre) for rms, pre in ((False, False), (True, True))]


def quick_cases(device: torch.device) -> list[NormCase]:
    if device.type == "cuda":
        ns = (1024, 4096, 8192)
        return [
            *(NormCase(GPU_TOKENS, n, torch.bfloat16, False) for n in ns),  # BERT-style
            *(NormCase(GPU_TOKENS, n, torch.bfloat16, True, True) for n in ns),  # Llama-style
            NormCase(GPU_TOKENS, 4096, torch.bfloat16, False, True),
            NormCase(GPU_TOKENS, 4096, torch.bfloat16, True, False),
        ]
    # The CPU speed target's shape (8192 x 1024 fp32, post-norm); pre-norm at half the rows; bf16
    # at the half-precision target's shape.
    fp32 = [NormCase(8192 if not pre else 4096, 1024, torch.float32, rms, pre) for rms, pre in FORMS]
    return fp32 + _cpu_half_cases(torch.bfloat16)


def _cpu_half_cases(dtype: torch.dtype) -> list[NormCase]:
    """The CPU half-precision speed target's shape (4096 x 768, BERT-base / GPT-2 width), post-norm."""
    return [NormCase(4096, 768, dtype, rms) for rms in (False, True)]


def full_cases(device: torch.device) -> list[NormCase]:
    if device.type != "cuda":
        return (
            quick_cases(device)
            + [NormCase(8192, n, torch.float32, rms, pre) for rms, pre in FORMS for n in (768, 4096)]
            + _cpu_half_cases(torch.float16)
        )
    return [
        *(NormCase(GPU_TOKENS, n, torch.bfloat16, rms, pre) for rms, pre in FORMS for n in MODEL_HIDDEN_SIZES),
        *(NormCase(GPU_TOKENS, n, torch.bfloat16, True, True, residual_in_fp32=True) for n in (4096, 8192)),
    ]
