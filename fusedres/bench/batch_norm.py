"""BatchNorm + add + ReLU benchmark cases (the harness in harness.py runs them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedres
from fusedres.bench.byte_model import batch_norm_add_relu_bytes
from fusedres.reference import batch_norm_add_relu_reference


@dataclass(frozen=True)
class BNCase:
    shape: tuple  # (N, C, H, W)
    dtype: torch.dtype
    channels_last: bool
    training: bool = True

    op = "batch_norm_add_relu"

    @property
    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        layout = "cl" if self.channels_last else "nchw"
        mode = "train" if self.training else "eval"
        return f"bn_add_relu/{mode} {'x'.join(map(str, self.shape))} {layout} {dt}"

    def make_inputs(self, device, small: bool = False, seed: int = 0):
        """input, residual, weight, bias: low-precision activations with fp32 parameters, as under autocast."""
        shape = (min(self.shape[0], 4), *self.shape[1:]) if small else self.shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        act = self.dtype

        def rand(*s, dtype, scale=1.0, shift=0.0):
            return (torch.randn(*s, generator=gen) * scale + shift).to(device=device, dtype=dtype)

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = rand(*shape, dtype=act, scale=2.0, shift=0.5).contiguous(memory_format=fmt)
        residual = rand(*shape, dtype=act).contiguous(memory_format=fmt)
        param = torch.float64 if act == torch.float64 else torch.float32
        c = shape[1]
        return [x, residual, rand(c, dtype=param, scale=0.5, shift=1.0), rand(c, dtype=param, scale=0.5)]

    def _with_running_stats(self, body):
        state = {}

        def fn(x, residual, weight, bias):
            if not state:
                state["rm"] = torch.zeros(x.shape[1], device=x.device, dtype=weight.dtype)
                state["rv"] = torch.ones(x.shape[1], device=x.device, dtype=weight.dtype)
            return body(x, residual, state["rm"], state["rv"], weight, bias)

        return fn

    def eager(self):
        """The ResNet block tail as torchvision writes it."""
        return self._with_running_stats(
            lambda x, r, rm, rv, w, b: F.relu(F.batch_norm(x, rm, rv, w, b, self.training) + r)
        )

    def fused(self):
        return self._with_running_stats(
            lambda x, r, rm, rv, w, b: fusedres.batch_norm_add_relu(x, r, rm, rv, w, b, self.training)
        )

    def reference(self):
        return self._with_running_stats(
            lambda x, r, rm, rv, w, b: batch_norm_add_relu_reference(x, r, rm, rv, w, b, self.training)
        )

    def bytes_moved(self, direction: str) -> int:
        return batch_norm_add_relu_bytes(
            math.prod(self.shape),
            self.shape[1],
            dtype=self.dtype,
            residual=True,
            training=self.training,
            direction=direction,
        )


# ResNet-50's block tails: (channels, spatial) per stage.
RESNET50_STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))


def quick_cases(device: torch.device) -> list[BNCase]:
    if device.type == "cuda":
        return [BNCase((256, c, s, s), torch.bfloat16, True) for c, s in RESNET50_STAGES]
    return [BNCase((32, 64, 56, 56), torch.float32, cl) for cl in (False, True)]


def full_cases(device: torch.device) -> list[BNCase]:
    if device.type != "cuda":
        return quick_cases(device) + [BNCase((32, 64, 56, 56), torch.float32, True, training=False)]
    return [
        BNCase((256, c, s, s), torch.bfloat16, cl, training)
        for c, s in RESNET50_STAGES
        for cl in (True, False)
        for training in (True, False)
    ]
