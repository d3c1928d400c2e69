"""The BatchNorm + add + ReLU operators as torch.library ops: opcheck, fake tensors, torch.compile."""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres._extension import EXTENSION_LOADED

needs_extension = pytest.mark.skipif(not EXTENSION_LOADED, reason=f"fusedres._C not loaded: {fusedres.EXTENSION_ERROR}")


def samples(device, ops):
    """(op, args) for every BatchNorm op over NCHW, channels_last and 3-D views, fp32 and bf16,
    with and without statistics and running stats. ops: the five registered operators."""
    out = []
    torch.manual_seed(0)
    stats_op, combine_op, fwd_op, reduce_op, input_op = ops
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("nchw", "channels_last", "3d"):
            x = torch.randn(3, 5, 4, 3, device=device, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "3d":
                x = x.reshape(3, 5, 12)
            r = torch.randn_like(x)
            w, b = torch.randn(5, device=device), torch.randn(5, device=device)
            rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
            # a drop path's rowscale (a dropped sample, kept ones rescaled), fp64 to show any dtype goes
            rs = torch.tensor([0.0, 1.25, 0.8], device=device, dtype=torch.float64)
            out.append((stats_op, (x, rm.clone(), rv.clone(), 0.1)))
            out.append((stats_op, (x, None, None, 0.0)))
            mean, var = stats_op(x, None, None, 0.0)
            gathered = torch.stack([torch.cat([mean, var, mean.new_full((1,), n)]) for n in (36.0, 12.0)])
            out.append((combine_op, (gathered, rm.clone(), rv.clone(), 0.1)))
            out.append((combine_op, (gathered, None, None, 0.0)))
            for training in (True, False):
                m, v = (mean, var) if training else (rm, rv)
                for s in (None, rs):
                    args = (x, r, s, w, b, m, v, 1e-5, True, training, 36)
                    grads = (0, 1, 3, 4)  # input, residual, weight, bias (rowscale gets none)
                    out.append(
                        (fwd_op, tuple(t.detach().requires_grad_() if i in grads else t for i, t in enumerate(args)))
                    )
            out.append((fwd_op, (x, None, None, None, None, mean, var, 1e-5, False, True, 36)))
            out.append((fwd_op, (x, r, None, None, b, None, None, 1e-5, True, False, 36)))  # folded-conv tail
            for s in (None, rs):
                y = fwd_op(x, r, s, w, b, mean, var, 1e-5, True, True, 36)
                dy = torch.randn_like(y)
                out.append((reduce_op, (dy, y, x, s, mean, var, 1e-5, True, True)))
                out.append((reduce_op, (dy, y, x, s, mean, var, 1e-5, False, False)))
                out.append((reduce_op, (dy, y, x, s, None, None, 1e-5, True, False)))
                sdy, sdx, g = reduce_op(dy, y, x, s, mean, var, 1e-5, True, True)
                out.append((input_op, (g, None, x, s, mean, var, 1e-5, w, sdy, sdx, 36, True, True)))
                out.append((input_op, (dy, y, x, s, mean, var, 1e-5, None, sdy, sdx, 36, False, True)))
                out.append((input_op, (dy, y, x, s, rm, rv, 1e-5, w, None, None, 36, False, True)))
    return out


def _registered(backend):
    from fusedres.ops.batch_norm import _KERNELS

    return _KERNELS[backend][1]


@needs_extension
def test_opcheck_cpp_ops_cpu():
    for op, args in samples("cpu", _registered("cpu")):
        torch.library.opcheck(op, args)


@needs_extension
def test_stats_op_updates_running_stats_like_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 2
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    mean, var = torch.ops.fusedres.batch_norm_stats(x, rm, rv, 0.3)
    torch.nn.functional.batch_norm(x, rm_ref, rv_ref, None, None, True, 0.3)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)


@needs_extension
def test_combine_op_matches_whole_batch_stats():
    torch.manual_seed(0)
    parts = [torch.randn(n, 3, 4, dtype=torch.float64) * 2 + 1 for n in (3, 5, 1)]
    rows = []
    for p in parts:
        mean, var = torch.ops.fusedres.batch_norm_stats(p, None, None, 0.0)
        rows.append(torch.cat([mean, var, mean.new_full((1,), p.numel() // 3)]))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    mean, var = torch.ops.fusedres.batch_norm_combine_stats(torch.stack(rows), rm, rv, 0.1)
    whole = torch.cat(parts)
    torch.testing.assert_close(mean, whole.mean((0, 2)))
    torch.testing.assert_close(var, whole.var((0, 2), unbiased=False))
    torch.testing.assert_close(rm, 0.1 * whole.mean((0, 2)))
    torch.testing.assert_close(rv, 0.9 + 0.1 * whole.var((0, 2), unbiased=True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck_gpu(backend):
    if backend not in fusedres.available_backends("cuda"):
        pytest.skip(f"{backend} backend not usable on cuda here")
    for op, args in samples("cuda", _registered(backend)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "device,backend",
    [
        pytest.param("cpu", "cpu", marks=needs_extension),
        pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
        pytest.param("cuda", "triton", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(device, backend, training):
    if backend not in fusedres.available_backends(device):
        pytest.skip(f"{backend} not usable on {device}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    residual = torch.randn(4, 6, 5, 5, device=device, requires_grad=True)
    weight = torch.randn(6, device=device, requires_grad=True)
    bias = torch.randn(6, device=device, requires_grad=True)
    rm_c, rv_c = torch.zeros(6, device=device), torch.ones(6, device=device)
    rm_e, rv_e = rm_c.clone(), rv_c.clone()

    def step(x, residual, weight, bias, rm, rv):
        return fusedres.batch_norm_add_relu(x, residual, rm, rv, weight, bias, training).square().sum()

    params = [x, residual, weight, bias]
    with fusedres.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True)
        loss = compiled(*params, rm_c, rv_c)
        grads = torch.autograd.grad(loss, params)
        expected = step(*params, rm_e, rv_e)
        expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(rm_c, rm_e)  # the running-stat mutation survives compilation
    torch.testing.assert_close(rv_c, rv_e)
