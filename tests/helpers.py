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
