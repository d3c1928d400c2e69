"""The BatchNorm + add + ReLU operators as torch.library ops: opcheck, fake tensors, torch.compile."""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres._extension import EXTENSION_LOADED
from fusedres.ops.batch_norm import OP_NAMES, batch_norm_update_running_stats

needs_extension = pytest.mark.skipif(not EXTENSION_LOADED, reason=f"fusedres._C not loaded: {fusedres.EXTENSION_ERROR}")


def samples(device, ops):
    """(op, args) for every BatchNorm op over NCHW and channels_last views, fp32 and bf16."""
    out = []
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            x4 = torch.randn(3, 5, 4, 3, device=device, dtype=dtype)
            if cl:
                x4 = x4.contiguous(memory_format=torch.channels_last)
            x = x4.reshape(3, 5, 12)
            r = torch.randn_like(x4).reshape(3, 5, 12)
            w, b = torch.randn(5, device=device), torch.randn(5, device=device)
            mean, var = ops["batch_norm_stats"](x)
            invstd = torch.rsqrt(var + 1e-5)
            out.append((ops["batch_norm_stats"], (x,)))
            for training in (True, False):
                args = (x, r, w, b, mean, invstd, True, training, 36)
                out.append(
                    (
                        ops["batch_norm_add_relu_fwd"],
                        tuple(
                            t.detach().requires_grad_() if i < 4 and isinstance(t, torch.Tensor) else t
                            for i, t in enumerate(args)
                        ),
                    )
                )
            out.append((ops["batch_norm_add_relu_fwd"], (x, None, None, None, mean, invstd, False, True, 36)))
            y = ops["batch_norm_add_relu_fwd"](x, r, w, b, mean, invstd, True, True, 36)
            dy = torch.randn_like(y)
            out.append((ops["batch_norm_add_relu_bwd_reduce"], (dy, y, x, mean, invstd, True, True)))
            out.append((ops["batch_norm_add_relu_bwd_reduce"], (dy, y, x, mean, invstd, False, False)))
            sdy, sdx, g = ops["batch_norm_add_relu_bwd_reduce"](dy, y, x, mean, invstd, True, True)
            out.append((ops["batch_norm_add_relu_bwd_input"], (g, None, x, mean, invstd, w, sdy, sdx, 36, True, True)))
            out.append(
                (ops["batch_norm_add_relu_bwd_input"], (dy, y, x, mean, invstd, None, sdy, sdx, 36, False, True))
            )
    return out


@needs_extension
def test_opcheck_cpp_ops_cpu():
    ops = {name: getattr(torch.ops.fusedres, name) for name in OP_NAMES}
    for op, args in samples("cpu", ops):
        torch.library.opcheck(op, args)


def test_opcheck_running_stats_op():
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    mean, var = torch.randn(6), torch.rand(6)
    torch.library.opcheck(batch_norm_update_running_stats, (rm, rv, mean, var, 0.1, 20))
    expected_rm = 0.9 * rm + 0.1 * mean
    expected_rv = 0.9 * rv + 0.1 * var * 20 / 19
    batch_norm_update_running_stats(rm, rv, mean, var, 0.1, 20)
    torch.testing.assert_close(rm, expected_rm)
    torch.testing.assert_close(rv, expected_rv)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck_gpu(backend):
    if backend not in fusedres.available_backends("cuda"):
        pytest.skip(f"{backend} backend not usable on cuda here")
    from fusedres.ops.batch_norm import _OPS

    for op, args in samples("cuda", _OPS[backend]):
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
