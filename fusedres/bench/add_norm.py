"""Add & Norm benchmark cases (the harness in harness.py runs them; registry.py lists them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedres
from fusedres.bench.byte_model import add_norm_bytes
from fusedres.reference import add_norm_reference
from fusedres.reference.philox import dropout_mask_reference

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
    # What residual blocks put around the add: dropout on x's branch (BERT, GPT-2 training), and
    # LayerScale (colscale, an input with a grad) with drop path (a per-row scale) on it.
    dropout_p: float = 0.0
    scales: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("x", "residual", "weight", "bias") + (("colscale",) if self.scales else ())

    @property
    def seeded(self) -> bool:
        """Its outputs depend on the RNG: parity runs every provider from one seed (harness)."""
        return self.dropout_p > 0.0

    @property
    def op(self) -> str:
        return "add_rms_norm" if self.rms_norm else "add_layer_norm"

    @property
    def variant(self) -> str:
        return (
            ("/prenorm" if self.prenorm else "")
            + ("/fp32res" if self.residual_in_fp32 else "")
            + (f"/dropout{self.dropout_p:g}" if self.dropout_p else "")
            + ("/scales" if self.scales else "")
        )

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
        inputs = [x, residual, weight, None if self.rms_norm else rand(self.n, dtype=stream, scale=0.5)]
        return inputs + ([rand(self.n, dtype=stream, scale=0.2, shift=1.0)] if self.scales else [])

    def _rowscale(self, x):
        """Drop path's per-row scale (a sample's tokens share it): fixed, so every provider sees it."""
        key = (x.shape[0], x.device, x.dtype)
        if key not in _ROWSCALES:
            _ROWSCALES[key] = torch.linspace(0.5, 1.5, x.shape[0], device=x.device).to(x.dtype)
        return _ROWSCALES[key]

    def _eager(self, branch_of):
        def fn(x, residual, weight, bias, colscale=None):
            branch = branch_of(x)
            if self.scales:
                branch = branch * self._rowscale(x)[:, None] * colscale
            h = branch + residual
            n = (self.n,)
            y = F.rms_norm(h, n, weight, self.eps) if self.rms_norm else F.layer_norm(h, n, weight, bias, self.eps)
            y = y.to(x.dtype)  # a no-op unless h is an fp32 residual stream
            return (y, h) if self.prenorm else y

        return fn

    def eager(self):
        """The code fusedres replaces, as a user writes it (F.dropout draws its own mask)."""
        p = self.dropout_p
        return self._eager(lambda x: F.dropout(x, p) if p else x)

    def parity_eager(self):
        """Eager ops on the mask fusedres draws (from the same seed): the error baseline of parity."""
        return self._eager(lambda x: x * self._mask(x) * (1.0 / (1.0 - self.dropout_p)) if self.dropout_p else x)

    def _mask(self, x):
        return dropout_mask_reference(x.shape, self.dropout_p, fusedres.philox_seed_offset(x.device)).to(x.dtype)

    def fused(self):
        kw = dict(prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32, dropout_p=self.dropout_p)
        scales = self._rowscale if self.scales else None
        if self.rms_norm:

            def fn(x, r, w, b, cs=None):
                rs = scales(x) if scales else None
                return fusedres.add_rms_norm(x, r, w, self.eps, rowscale=rs, colscale=cs, **kw)

        else:

            def fn(x, r, w, b, cs=None):
                rs = scales(x) if scales else None
                return fusedres.add_layer_norm(x, r, w, b, self.eps, rowscale=rs, colscale=cs, **kw)

        return fn

    def reference(self):
        kw = dict(rms_norm=self.rms_norm, prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32)

        def fn(x, r, w, b, cs=None):
            mask = self._mask(x) if self.dropout_p else None
            rs = self._rowscale(x).to(x.dtype) if self.scales else None
            features = dict(dropout_p=self.dropout_p, dropout_mask=mask, rowscale=rs, colscale=cs)
            return add_norm_reference(x, r, w, b, self.eps, **kw, **features)

        return fn

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


_ROWSCALES: dict = {}


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
            *feature_cases(device),
        ]
    # The CPU speed target's shape (8192 x 1024 fp32, post-norm); pre-norm at half the rows; bf16
    # at the half-precision target's shape.
    fp32 = [NormCase(8192 if not pre else 4096, 1024, torch.float32, rms, pre) for rms, pre in FORMS]
    return fp32 + _cpu_half_cases(torch.bfloat16) + feature_cases(device)


def _cpu_half_cases(dtype: torch.dtype) -> list[NormCase]:
    """The CPU half-precision speed target's shape (4096 x 768, BERT-base / GPT-2 width), post-norm."""
    return [NormCase(4096, 768, dtype, rms) for rms in (False, True)]


def feature_cases(device: torch.device) -> list[NormCase]:
    """The residual features' speed target: BERT-base width with dropout 0.1 (against F.dropout +
    add + F.layer_norm), and the LayerScale + drop path variant."""
    if device.type == "cuda":
        return [
            NormCase(GPU_TOKENS, 4096, torch.bfloat16, False, dropout_p=0.1),
            NormCase(GPU_TOKENS, 4096, torch.bfloat16, False, True, scales=True),
        ]
    return [
        *(NormCase(4096, 768, dtype, False, dropout_p=0.1) for dtype in (torch.float32, torch.bfloat16)),
        *(NormCase(4096, 768, dtype, False, scales=True) for dtype in (torch.float32, torch.bfloat16)),
    ]


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
