"""Add & Norm benchmark cases (the harness in harness.py runs them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedres
from fusedres.bench.byte_model import add_norm_bytes
from fusedres.reference import add_norm_reference


@dataclass(frozen=True)
class NormCase:
    m: int
    n: int
    dtype: torch.dtype
    rms_norm: bool
    prenorm: bool = False

    @property
    def op(self) -> str:
        return "add_rms_norm" if self.rms_norm else "add_layer_norm"

    @property
    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.op}{'/prenorm' if self.prenorm else ''} {self.m}x{self.n} {dt}"

    @property
    def eps(self) -> float:
        return 1e-6 if self.rms_norm else 1e-5

    def make_inputs(self, device, small: bool = False, seed: int = 0):
        """x, residual, weight, bias (None for RMSNorm); `small` keeps parity checks cheap."""
        m = min(self.m, 512) if small else self.m
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=self.dtype)

        x, residual = rand(m, self.n, shift=0.5), rand(m, self.n)
        weight = rand(self.n, scale=0.5, shift=1.0)
        return [x, residual, weight, None if self.rms_norm else rand(self.n, scale=0.5)]

    def eager(self):
        """The code fusedres replaces, as a user writes it."""

        def fn(x, residual, weight, bias):
            h = x + residual
            n = (self.n,)
            y = F.rms_norm(h, n, weight, self.eps) if self.rms_norm else F.layer_norm(h, n, weight, bias, self.eps)
            return (y, h) if self.prenorm else y

        return fn

    def fused(self):
        return lambda x, r, w, b: fusedres.add_norm(x, r, w, b, self.eps, rms_norm=self.rms_norm, prenorm=self.prenorm)

    def reference(self):
        return lambda x, r, w, b: add_norm_reference(x, r, w, b, self.eps, rms_norm=self.rms_norm, prenorm=self.prenorm)

    def bytes_moved(self, direction: str) -> int:
        d = self.dtype
        return add_norm_bytes(
            self.m,
            self.n,
            x_dtype=d,
            residual_dtype=d,
            h_dtype=d,
            weight_dtype=d,
            has_bias=not self.rms_norm,
            rms_norm=self.rms_norm,
            prenorm=self.prenorm,
            store_h=True,
            direction=direction,
        )


def quick_cases(device: torch.device) -> list[NormCase]:
    if device.type == "cuda":
        return [NormCase(16384, n, torch.bfloat16, rms) for rms in (False, True) for n in (1024, 4096, 8192)]
    return [NormCase(8192, 1024, torch.float32, rms) for rms in (False, True)]


def full_cases(device: torch.device) -> list[NormCase]:
    if device.type != "cuda":
        return quick_cases(device) + [NormCase(2048, 4096, torch.float32, rms, True) for rms in (False, True)]
    # Hidden sizes of BERT-base/large, GPT-2, Llama-7B/70B at 16k tokens, pre- and post-norm.
    ns = (768, 1024, 2048, 4096, 8192, 16384)
    return [NormCase(16384, n, torch.bfloat16, rms, pre) for rms in (False, True) for pre in (False, True) for n in ns]
