"""bf16/fp16 <-> fp32 conversions in the C++ CPU kernels (csrc/cpu/vec_convert.h): every value
loads exactly and rounds exactly as torch's own .to() does (once, from fp32, to nearest even),
in full vectors and in the remainders, in the AVX2 build and in the baseline one.

The kernels are reached through ops whose output is one conversion of a chosen fp32 value:
  store   bias_add_relu(zeros, bias, relu=False) = (0 + bias[c]).to(dtype);
  round   add_norm_fwd's h with x = -0 (dtype) and an fp32 residual: h = (x + residual).to(dtype);
  load    the same h with x = every bit pattern of dtype and residual = -0: h = x.
NaN only has to stay NaN: torch's own conversions disagree on its bits (scalar 0x7FC0, vectorized
0xFFFF for bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres._extension import EXTENSION_LOADED
from fusedres.ops.add_norm import FwdArgs
from fusedres.ops.batch_norm import bias_add_relu

pytestmark = pytest.mark.skipif(
    not EXTENSION_LOADED or "cpu" not in fusedres.available_backends("cpu"), reason="needs the C++ CPU kernels"
)

HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# Rows of an odd width: every row ends in a remainder shorter than a vector.
ROW = 1021


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def rounding_cases(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values that test a rounding to `dtype`: every tie between neighbouring values of the
    dtype and the fp32 values either side of it (subnormal ties and the overflow tie included),
    specials, fp32 subnormals, and random fp32 bit patterns."""
    finite = every_pattern(dtype).double()
    finite = finite[torch.isfinite(finite)].unique()  # sorted, -0 and +0 as one
    top = torch.tensor([torch.finfo(dtype).max], dtype=torch.float64)
    # The tie above the largest finite value: the next power-of-two step, which rounds to inf.
    ulp_top = float(top) - float(finite[-2])
    ties = torch.cat([(finite[:-1] + finite[1:]) / 2, top + ulp_top / 2]).float()
    assert torch.equal(ties.double(), torch.cat([(finite[:-1] + finite[1:]) / 2, top + ulp_top / 2]))  # exact
    near = [torch.nextafter(ties, torch.full_like(ties, s)) for s in (float("inf"), float("-inf"))]
    tiny = torch.finfo(torch.float32).tiny
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), tiny, -tiny, tiny / 2**23, tiny * 0.75],
        dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    return torch.cat([ties, *near, specials, random_bits.view(torch.float32)])


def assert_same_values(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit for bit, except that a NaN only has to be a NaN."""
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(ours), nan), f"{what}: NaNs at other places"
    bits = torch.int16
    differ = ours[~nan].view(bits) != expected[~nan].view(bits)
    if differ.any():
        idx = differ.nonzero()[:5].flatten()
        sample = ", ".join(
            f"{expected[~nan].float()[i].item()!r}: ours {ours[~nan][i].view(bits).item() & 0xFFFF:#06x}, "
            f"torch {expected[~nan][i].view(bits).item() & 0xFFFF:#06x}"
            for i in idx
        )
        raise AssertionError(f"{what}: {int(differ.sum())} of {differ.numel()} values differ from torch: {sample}")


def as_rows(flat: torch.Tensor, fill: float) -> torch.Tensor:
    """flat as (rows, ROW), the last row padded with `fill`."""
    rows = -(-flat.numel() // ROW)
    padded = torch.full((rows * ROW,), fill, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded.view(rows, ROW)


def add_norm_h(x: torch.Tensor, residual: torch.Tensor, h_dtype: torch.dtype) -> torch.Tensor:
    _y, h, *_stats_and_mask = torch.ops.fusedres.add_norm_fwd(
        *FwdArgs(x, residual, None, None, 1e-5, False, h_dtype, True)
    )
    return h


@pytest.mark.parametrize("dtype", HALF)
def test_loads_are_exact(dtype):
    x = every_pattern(dtype)
    h = add_norm_h(as_rows(x, 0.0), as_rows(torch.full(x.shape, -0.0), -0.0), dtype)
    assert_same_values(h.flatten()[: x.numel()], x, f"{dtype} -> fp32 -> {dtype}")


@pytest.mark.parametrize("dtype", HALF)
def test_rounding_through_h_matches_torch(dtype):
    values = rounding_cases(dtype)
    x = torch.full((values.numel(),), -0.0, dtype=dtype)
    h = add_norm_h(as_rows(x, 0.0), as_rows(values, 0.0), dtype)
    assert_same_values(h.flatten()[: values.numel()], values.to(dtype), f"add_norm h ({dtype})")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", HALF)
def test_stores_match_torch(dtype, channels_last):
    """NCHW planes of 3 elements are all remainder; channels_last rows are vectors and a remainder."""
    bias = rounding_cases(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    zeros = torch.zeros(2, bias.numel(), 1, 3, dtype=dtype).contiguous(memory_format=fmt)
    out = bias_add_relu(zeros, bias, relu=False)
    expected = (torch.zeros_like(bias) + bias).to(dtype)  # 0 + -0 is +0, as in the kernel
    assert_same_values(out.permute(0, 2, 3, 1).reshape(-1, bias.numel())[0], expected, f"bias_add_relu ({dtype})")
    assert torch.equal(out[1:].view(torch.int16), out[:1].view(torch.int16).expand_as(out[1:]))


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="the AVX2 build is x86-only")
def test_baseline_build_converts_the_same():
    """This file again, with the kernels' baseline build forced (FUSEDRES_CPU_ISA=baseline)."""
    if os.environ.get("FUSEDRES_CPU_ISA") == "baseline":
        pytest.skip("already running the baseline build")
    env = {**os.environ, "FUSEDRES_CPU_ISA": "baseline"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "not baseline"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
