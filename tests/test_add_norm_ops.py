"""The Add & Norm operators as torch.library ops: opcheck, fake tensors, torch.compile."""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres._extension import EXTENSION_LOADED
from fusedres.ops.add_norm import BwdArgs, FwdArgs

needs_extension = pytest.mark.skipif(not EXTENSION_LOADED, reason=f"fusedres._C not loaded: {fusedres.EXTENSION_ERROR}")


def fwd_samples(device):
    """(args) for add_norm_fwd covering residual/weight/bias None, prenorm h, mixed dtypes, strided rows."""
    torch.manual_seed(0)
    wide = torch.randn(6, 40, device=device)
    x, r = torch.randn(6, 33, device=device), torch.randn(6, 33, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    bf = x.bfloat16()
    return [
        FwdArgs(x, r, w, b, 1e-5, False, torch.float32, True),
        FwdArgs(x, None, w, None, 1e-6, True, torch.float32, False),
        FwdArgs(x, r, None, None, 1e-5, False, torch.float32, False),
        FwdArgs(bf, r, w, b, 1e-5, False, torch.float32, True),  # bf16 x, fp32 residual stream
        FwdArgs(wide[:, :33], r, w, b, 1e-5, True, torch.float32, True),  # row stride 40
        FwdArgs(x.double(), r.double(), w.double(), b.double(), 1e-5, False, torch.float64, True),
    ]


def bwd_samples(fwd, device):
    out = []
    for a in fwd_samples(device):
        y, h, mean, rstd, _mask = fwd(*a._replace(store_h=True))
        mean = None if a.rms_norm else mean
        dy = torch.randn_like(y)
        r = a.residual
        dres_dtype = r.dtype if r is not None and r.dtype != a.x.dtype else None
        common = dict(h_dtype=a.h_dtype, weight=a.weight, mean=mean, rstd=rstd, rms_norm=a.rms_norm)
        out.append(BwdArgs(dy, torch.randn_like(h), h, None, None, bias=a.bias, dresidual_dtype=dres_dtype, **common))
        out.append(BwdArgs(dy, None, h, None, None, bias=None, dresidual_dtype=None, **common))
        if r is not None:  # h recomputed from x + residual
            out.append(BwdArgs(dy, None, None, a.x, r, bias=a.bias, dresidual_dtype=dres_dtype, **common))
    return out


def with_grads(args):
    return tuple(
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


@needs_extension
def test_opcheck_cpp_ops_cpu():
    fwd = torch.ops.fusedres.add_norm_fwd
    for args in fwd_samples("cpu"):
        torch.library.opcheck(fwd, with_grads(args) if args.store_h else args)
    for args in bwd_samples(fwd, "cpu"):
        torch.library.opcheck(torch.ops.fusedres.add_norm_bwd, args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck_gpu(backend):
    if backend not in fusedres.available_backends("cuda"):
        pytest.skip(f"{backend} backend not usable on cuda here")
    if backend == "cuda":
        fwd, bwd = torch.ops.fusedres.add_norm_fwd, torch.ops.fusedres.add_norm_bwd
    else:
        fwd, bwd = torch.ops.fusedres.add_norm_fwd_triton, torch.ops.fusedres.add_norm_bwd_triton
    for args in fwd_samples("cuda"):
        torch.library.opcheck(fwd, with_grads(args) if args.store_h else args)
    for args in bwd_samples(fwd, "cuda"):
        torch.library.opcheck(bwd, args)


def _compiled_step(fn):
    def step(x, residual, weight, bias):
        y, h = fn(x, residual, weight, bias)
        return (y.float() * 1.5).sum() + h.float().square().sum()

    return torch.compile(step, fullgraph=True)


@pytest.mark.parametrize(
    "device,backend",
    [
        pytest.param("cpu", "cpu", marks=needs_extension),
        pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
        pytest.param("cuda", "triton", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["ln", "rms"])
def test_torch_compile_fullgraph(device, backend, rms_norm):
    if backend not in fusedres.available_backends(device):
        pytest.skip(f"{backend} not usable on {device}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(4, 6, 48, device=device, requires_grad=True)
    residual = torch.randn(4, 6, 48, device=device, requires_grad=True)
    weight = torch.randn(48, device=device, requires_grad=True)
    bias = None if rms_norm else torch.randn(48, device=device, requires_grad=True)

    def fn(x, residual, weight, bias):
        return fusedres.add_norm(x, residual, weight, bias, 1e-5, rms_norm=rms_norm, prenorm=True)

    params = [t for t in (x, residual, weight, bias) if t is not None]
    with fusedres.use_backend(backend):
        compiled = _compiled_step(fn)
        loss = compiled(x, residual, weight, bias)
        grads = torch.autograd.grad(loss, params)
        y, h = fn(x, residual, weight, bias)
        expected = (y.float() * 1.5).sum() + h.float().square().sum()
        expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
