"""Every fused op inside a CUDA graph, and torch.compile(mode="reduce-overhead") of small fused models.

A graph replays the kernels it recorded on the addresses it recorded: an op that reads a value on
the host (a shape-dependent `.item()`, a launch grid from data), allocates outside the graph's
pool, or launches on another stream than the current one, fails to capture or replays stale
results. So each op is captured forward and backward with its inputs in static tensors, new
inputs are copied in, the graph is replayed, and the results must equal the same backend's eager
call on the new inputs bit for bit (same kernels, same shapes, deterministic reductions).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fusedres

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


@dataclass(frozen=True)
class GraphCase:
    name: str
    make: Callable[[torch.dtype, torch.Generator], dict]  # named tensors: inputs and state
    grads: tuple[str, ...]  # the inputs that get grads
    call: Callable[[dict], tuple]  # outputs from the tensors

    def __str__(self):
        return self.name


def _randn(gen, *shape, dtype, shift=0.0, channels_last=False):
    t = (torch.randn(*shape, generator=gen, device="cuda") + shift).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _add_norm_inputs(dtype, gen, rms: bool):
    n = 1000  # not a power of two: the masked tail of a row
    t = {
        "x": _randn(gen, 3, 17, n, dtype=dtype, shift=0.5),
        "residual": _randn(gen, 3, 17, n, dtype=dtype),
        "weight": _randn(gen, n, dtype=dtype),
    }
    if not rms:
        t["bias"] = _randn(gen, n, dtype=dtype)
    return t


def _bn_inputs(dtype, gen, channels_last=True):
    c = 24
    return {
        "x": _randn(gen, 6, c, 9, 11, dtype=dtype, shift=0.5, channels_last=channels_last),
        "residual": _randn(gen, 6, c, 9, 11, dtype=dtype, channels_last=channels_last),
        "weight": _randn(gen, c, dtype=torch.float32),
        "bias": _randn(gen, c, dtype=torch.float32),
        "running_mean": _randn(gen, c, dtype=torch.float32),
        "running_var": torch.rand(c, generator=gen, device="cuda") + 0.5,
    }


def _bn_call(training):
    def call(t):
        out = fusedres.batch_norm_add_relu(
            t["x"], t["residual"], t["running_mean"], t["running_var"], t["weight"], t["bias"], training
        )
        return (out,)

    return call


CASES = [
    GraphCase(
        "add_layer_norm",
        lambda dtype, gen: _add_norm_inputs(dtype, gen, rms=False),
        ("x", "residual", "weight", "bias"),
        lambda t: (fusedres.add_layer_norm(t["x"], t["residual"], t["weight"], t["bias"]),),
    ),
    GraphCase(
        "add_rms_norm-prenorm",
        lambda dtype, gen: _add_norm_inputs(dtype, gen, rms=True),
        ("x", "residual", "weight"),
        lambda t: fusedres.add_rms_norm(t["x"], t["residual"], t["weight"], prenorm=True),
    ),
    GraphCase("batch_norm_add_relu-train", _bn_inputs, ("x", "residual", "weight", "bias"), _bn_call(True)),
    GraphCase("batch_norm_add_relu-eval", _bn_inputs, ("x", "residual", "weight", "bias"), _bn_call(False)),
    GraphCase(
        "batch_norm_add_relu-train-nchw",
        lambda dtype, gen: _bn_inputs(dtype, gen, channels_last=False),
        ("x", "residual", "weight", "bias"),
        _bn_call(True),
    ),
]


def _step(case: GraphCase, t: dict, grad_outputs: tuple) -> tuple:
    """Forward and backward: the outputs, then the grads of case.grads (running stats are
    updated in place in t)."""
    inputs = {k: v.detach().requires_grad_(k in case.grads) for k, v in t.items()}
    outputs = case.call(inputs)
    grads = torch.autograd.grad(outputs, [inputs[k] for k in case.grads], grad_outputs)
    return tuple(o.detach() for o in outputs) + tuple(grads)


def _assert_identical(names, got, want, what):
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} {name}: {g.dtype}{tuple(g.shape)} vs {w.dtype}"
        diff = (g.double() - w.double()).abs().nan_to_num(float("inf"))
        assert torch.equal(g, w), f"{what} {name}: {int((diff > 0).sum())} elements differ, max {diff.max().item():.3g}"


def _skip_unless_usable(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend not in fusedres.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not usable on cuda here")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_op_replays_like_eager(backend, case, dtype):
    _skip_unless_usable(backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    static = case.make(dtype, gen)
    with fusedres.use_backend(backend):
        outputs = case.call({k: v.detach() for k, v in static.items()})
        static_dout = tuple(torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype) for o in outputs)
        state0 = {k: v.clone() for k, v in static.items()}

        # Warm up on a side stream (Triton compiles and autotunes, allocator pools fill), as
        # torch.cuda.graph's documentation asks; then capture one forward + backward.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                _step(case, static, static_dout)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_results = _step(case, static, static_dout)

        for seed in (1, 2):
            fresh = case.make(dtype, torch.Generator(device="cuda").manual_seed(seed))
            fresh_dout = tuple(torch.randn_like(d, dtype=torch.float32).to(d.dtype) for d in static_dout)
            for k in static:
                static[k].copy_(fresh[k])
            for s, d in zip(static_dout, fresh_dout):
                s.copy_(d)
            graph.replay()
            eager = _step(case, fresh, fresh_dout)  # updates fresh's running stats the same way
            torch.cuda.synchronize()
            n_out = len(static_results) - len(case.grads)
            names = [f"out{i}" for i in range(n_out)] + [f"grad {g}" for g in case.grads]
            _assert_identical(names, static_results, eager, f"{backend} {case} {dtype} replay {seed}:")
            for k in ("running_mean", "running_var"):
                if k in static:
                    _assert_identical([k], [static[k]], [fresh[k]], f"{backend} {case} {dtype} replay {seed}:")
        assert not torch.equal(static["x"], state0["x"]), "the replays did not see new inputs"


class _AddNormModel(torch.nn.Module):
    """Two pre-norm blocks, a Llama-like (RMSNorm) and a GPT-2-like (LayerNorm), then a post-norm."""

    def __init__(self, n=256):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(n, n) for _ in range(3))
        self.norm1 = fusedres.nn.AddRMSNorm(n, prenorm=True)
        self.norm2 = fusedres.nn.AddLayerNorm(n, prenorm=True)
        self.norm3 = fusedres.nn.AddLayerNorm(n)

    def forward(self, x):
        y, h = self.norm1(self.fc1(x), x)
        y, h = self.norm2(self.fc2(y), h)
        return self.norm3(self.fc3(y), h)


def _conv3x3(c):
    return torch.nn.Conv2d(c, c, 3, padding=1, bias=False)


class _BlockModel(torch.nn.Module):
    """A ResNet basic block: conv-BN-ReLU, conv-BN + identity + ReLU."""

    def __init__(self, c=32):
        super().__init__()
        self.a = fusedres.nn.ConvBNReLU2d(_conv3x3(c), torch.nn.BatchNorm2d(c))
        self.b = fusedres.nn.ConvBNAddReLU2d(_conv3x3(c), torch.nn.BatchNorm2d(c))

    def forward(self, x):
        return self.b(self.a(x), x)


@pytest.mark.parametrize("model", ["add_norm", "resnet_block"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_reduce_overhead_matches_eager(backend, model):
    """torch.compile(mode="reduce-overhead") puts the fused ops in CUDA graphs (cudagraph trees):
    three training steps (forward, backward, running stats) must match eager. The Add & Norm
    model's graphs must not be skipped. (Eval forwards are the captured ops above; each compile
    here costs seconds of a GPU slot.)"""
    _skip_unless_usable(backend)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    if model == "add_norm":
        eager, shape, layout = _AddNormModel().cuda(), (4, 64, 256), torch.contiguous_format
    else:
        eager, shape, layout = (
            _BlockModel().cuda().to(memory_format=torch.channels_last),
            (8, 32, 14, 14),
            torch.channels_last,
        )
    compiled_model = copy.deepcopy(eager)
    with fusedres.use_backend(backend):
        compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
        for step in range(3):
            x = torch.randn(shape, device="cuda").contiguous(memory_format=layout)
            results = []
            for m, fn in ((eager, eager), (compiled_model, compiled)):
                m.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_()
                torch.compiler.cudagraph_mark_step_begin()
                out = fn(xi)
                out.float().square().mean().backward()
                got = [out.detach().clone(), xi.grad] + [p.grad for p in m.parameters()]
                got += [b.clone() for b in m.buffers() if b.is_floating_point()]
                results.append(got)
            for i, (c, e) in enumerate(zip(results[1], results[0])):
                # Relative to the tensor's norm: grads of a mean are tiny, so no fixed atol fits.
                rel = ((c.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()
                assert rel < 1e-4, (
                    f"{backend} {model} step {step}, tensor {i} {tuple(e.shape)}: relative error {rel:.3g}"
                )
    if model == "add_norm":
        assert counters["inductor"]["cudagraph_skips"] == 0, "reduce-overhead skipped its CUDA graphs"
