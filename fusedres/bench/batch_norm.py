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
    input_names = ("input", "residual", "weight", "bias")
    output_names = ("out",)

    @property
    def _mode(self) -> str:
        return "train" if self.training else "eval"

    @property
    def _layout(self) -> str:
        return "cl" if self.channels_last else "nchw"

    @property
    def label(self) -> str:
        return f"bn_add_relu/{self._mode} {'x'.join(map(str, self.shape))} {self._layout} {_name(self.dtype)}"

    @property
    def plot_group(self) -> str:
        return f"bn_add_relu/{self._mode} {self._layout} {_name(self.dtype)} N={self.shape[0]}"

    @property
    def plot_x(self) -> str:
        return "x".join(map(str, self.shape[1:]))  # the ResNet stage: C x H x W

    plot_x_label = "ResNet-50 stage (C x H x W)"

    def make_inputs(self, device, small: bool = False, seed: int = 0):
        """input, residual, weight, bias: low-precision activations with fp32 parameters, as under autocast."""
        shape = (self._small_batch(), *self.shape[1:]) if small else self.shape
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

    def _small_batch(self) -> int:
        # About 2^20 elements: beyond that some outputs land within rounding of the ReLU's kink,
        # where eager's own grad error jumps to the size of a grad and the parity rule goes slack.
        return max(1, min(self.shape[0], 2**20 // math.prod(self.shape[1:])))

    def _with_running_stats(self, body):
        """Each provider gets its own running stats, equal at the start: training updates them in
        place, and eval normalizes with them (so they are not the trivial zeros and ones)."""
        state = {}

        def fn(x, residual, weight, bias):
            if not state:  # closed-form values: a Generator here would break torch.compile's graph
                c = torch.arange(x.shape[1], device=x.device, dtype=weight.dtype)
                state["rm"] = 0.1 * torch.sin(c)
                state["rv"] = 1.0 + 0.5 * torch.cos(c)
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


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ResNet-50's block tails: (channels, spatial) per stage, at 224x224 input.
RESNET50_STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))
GPU_BATCH = 256


def _stage(stage) -> tuple[int, int, int]:
    c, s = stage
    return (c, s, s)


def smoke_cases(device: torch.device) -> list[BNCase]:
    """Tiny shapes for CI: training NCHW and eval channels_last."""
    return [BNCase((2, 8, 8, 8), torch.float32, False), BNCase((2, 8, 8, 8), torch.float32, True, training=False)]


def _modes(shape, dtype) -> list[BNCase]:
    return [BNCase(shape, dtype, cl, training) for training in (True, False) for cl in (False, True)]


def quick_cases(device: torch.device) -> list[BNCase]:
    if device.type == "cuda":
        first = (GPU_BATCH, *_stage(RESNET50_STAGES[0]))
        later = [BNCase((GPU_BATCH, *_stage(st)), torch.bfloat16, True) for st in RESNET50_STAGES[1:]]
        return _modes(first, torch.bfloat16) + later
    # Training at the CPU speed target's shape (32 x 64 x 56 x 56, ResNet-50's first block);
    # eval at stage 1's output width; bf16 at the half-precision target's shape.
    train = [BNCase((32, 64, 56, 56), torch.float32, cl, True) for cl in (False, True)]
    evals = [c for c in _modes((4, *_stage(RESNET50_STAGES[0])), torch.float32) if not c.training]
    return train + evals + _cpu_half_cases(torch.bfloat16)


def _cpu_half_cases(dtype: torch.dtype) -> list[BNCase]:
    """The CPU half-precision speed target's shape: 16 x 256 x 28 x 28 channels_last, train and eval."""
    return [BNCase((16, 256, 28, 28), dtype, True, training) for training in (True, False)]


def full_cases(device: torch.device) -> list[BNCase]:
    if device.type != "cuda":
        return (
            quick_cases(device)
            + [BNCase((16, *_stage(st)), torch.float32, True) for st in RESNET50_STAGES]
            + _cpu_half_cases(torch.float16)
        )
    return [c for st in RESNET50_STAGES for c in _modes((GPU_BATCH, *_stage(st)), torch.bfloat16)]
