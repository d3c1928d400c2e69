"""add_layer_norm / add_rms_norm: every backend against the float64 reference, forward and grads."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref, device_backends, skip_if_unusable
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres.reference import add_norm_reference, h_dtype_for

# Every test on both eager autograd paths (conftest.py: autograd_path).
pytestmark = pytest.mark.usefixtures("autograd_path")


@dataclass(frozen=True)
class Case:
    shape: tuple
    rms_norm: bool = False
    residual: str | None = "same"  # None, "same" (x's dtype) or "fp32"
    weight: str | None = "same"  # None, "same" or "fp32" (bias follows weight; RMSNorm has none)
    prenorm: bool = False
    residual_in_fp32: bool = False
    layout: str = "contiguous"  # "sliced" rows, "transposed" leading dims, "strided_last" dim

    def __str__(self):
        kind = "rms" if self.rms_norm else "ln"
        flags = [f"res={self.residual}", f"w={self.weight}", self.layout]
        flags += ["prenorm"] if self.prenorm else []
        flags += ["res_fp32"] if self.residual_in_fp32 else []
        return f"{kind}{list(self.shape)}-" + "-".join(flags)


CASES = [
    Case((7,)),  # one row
    Case((3, 1)),  # N = 1: zero variance, y = bias
    Case((5, 127), rms_norm=True),
    Case((2, 3, 1000), residual=None),
    Case((2, 2, 3000), rms_norm=True, prenorm=True),
    Case((2, 1, 2, 5120)),  # 4-D
    Case((4, 127), prenorm=True, residual_in_fp32=True),
    Case((4, 127), rms_norm=True, prenorm=True, residual_in_fp32=True),
    Case((4, 127), residual="fp32"),  # mixed: fp32 residual stream, low-precision x
    Case((3, 7), weight=None),
    Case((3, 1000), weight="fp32"),  # fp32 params with low-precision activations
    Case((6, 127), layout="sliced"),
    Case((4, 5, 33), rms_norm=True, layout="transposed"),
    Case((5, 33), layout="strided_last"),
    Case((3, 127), residual=None, prenorm=True),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as t, laid out as the case asks (values are kept so references agree)."""
    if layout == "sliced":
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype, device=t.device)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided_last":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = case.shape[-1]

    def rand(shape, dt, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dt).to(device)

    # A shifted mean exercises the variance computation's stability.
    x = _layout(rand(case.shape, dtype, 1.0, 0.5), case.layout)
    residual = None
    if case.residual is not None:
        residual = _layout(rand(case.shape, dtype if case.residual == "same" else torch.float32), case.layout)
    weight = bias = None
    if case.weight is not None:
        wdt = dtype if case.weight == "same" else torch.float32
        weight = rand((n,), wdt, 0.5, 1.0)
        bias = None if case.rms_norm else rand((n,), wdt, 0.5)
    return x, residual, weight, bias


def eager_add_norm(x, residual, weight, bias, eps, *, rms_norm, prenorm, residual_in_fp32):
    """What a user writes in plain PyTorch, in the inputs' own dtypes: the low-precision baseline."""
    h_dtype = h_dtype_for(x, residual, residual_in_fp32)
    h = (x + residual if residual is not None else x).to(h_dtype)
    w = weight.to(h_dtype) if weight is not None else None
    n = (x.shape[-1],)
    if rms_norm:
        y = F.rms_norm(h, n, w, eps)
    else:
        y = F.layer_norm(h, n, w, bias.to(h_dtype) if bias is not None else None, eps)
    y = y.to(x.dtype)
    return (y, h) if prenorm else y


def run_with_grads(fn, inputs, upstream):
    """Forward, then grads of every tensor input w.r.t. sum(out * upstream)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    it = iter(grads)
    return outs, [next(it) if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
def test_matches_fp64_reference(device, backend, case, dtype):
    skip_if_unusable(device, backend)
    eps = 1e-5
    inputs = make_inputs(case, dtype, device)
    kwargs = dict(rms_norm=case.rms_norm, prenorm=case.prenorm, residual_in_fp32=case.residual_in_fp32)
    h_dtype = h_dtype_for(inputs[0], inputs[1], case.residual_in_fp32)
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(case.shape, generator=gen, dtype=torch.float64).to(device)]
    if case.prenorm:
        upstream.append(torch.randn(case.shape, generator=gen, dtype=torch.float64).to(device))
    # Round the upstream grads to what autograd would hand each output in its dtype.
    upstream = [u.to(dt).double() for u, dt in zip(upstream, (dtype, h_dtype))]

    with fusedres.use_backend(backend):
        ours, ours_grads = run_with_grads(lambda *t: fusedres.add_norm(*t, eps, **kwargs), inputs, upstream)
    eager, eager_grads = run_with_grads(lambda *t: eager_add_norm(*t, eps, **kwargs), inputs, upstream)
    inputs64 = [t.double() if t is not None else None for t in inputs]
    ref, ref_grads = run_with_grads(lambda *t: add_norm_reference(*t, eps, **kwargs), inputs64, upstream)

    assert ours[0].dtype == dtype and ours[0].shape == inputs[0].shape
    if case.prenorm:
        assert ours[1].dtype == h_dtype
    for name, o, e, r in zip(("y", "h"), ours, eager, ref):
        assert_close_to_ref(name, o, e, r, dtype)
    for name, inp, o, e, r in zip(("dx", "dresidual", "dweight", "dbias"), inputs, ours_grads, eager_grads, ref_grads):
        if inp is None:
            continue
        assert o.dtype == inp.dtype and o.shape == inp.shape, f"{name}: {o.dtype}{tuple(o.shape)}"
        assert_close_to_ref(name, o, e, r, dtype)


# Outputs over 4 MiB take the CPU kernels' huge-page path (csrc/cpu/huge_pages.h); too big for the
# Triton interpreter, so CPU only.
LARGE_CASES = [Case((1100, 1024), prenorm=True), Case((1100, 1024), rms_norm=True, residual="fp32")]


@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
def test_large_cpu_outputs_match_fp64_reference(case):
    test_matches_fp64_reference("cpu", "cpu", case, torch.float32)


@pytest.mark.parametrize("rms_norm", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("device,backend", device_backends())
def test_nan_and_inf_propagate_like_eager(device, backend, rms_norm):
    skip_if_unusable(device, backend)
    x = torch.randn(4, 33, device=device)
    residual = torch.randn(4, 33, device=device)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    weight = torch.randn(33, device=device)
    with fusedres.use_backend(backend):
        y = fusedres.add_norm(x, residual, weight, None, 1e-5, rms_norm=rms_norm)
    expected = eager_add_norm(x, residual, weight, None, 1e-5, rms_norm=rms_norm, prenorm=False, residual_in_fp32=False)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(torch.isinf(y), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(y[finite], expected[finite])


@pytest.mark.parametrize("device,backend", device_backends())
def test_empty_batch(device, backend):
    skip_if_unusable(device, backend)
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    with fusedres.use_backend(backend):
        y, h = fusedres.add_layer_norm(x, x * 2, weight, bias, prenorm=True)
        assert y.shape == h.shape == x.shape
        (y.sum() + h.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("rms_norm", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("device,backend", device_backends(include_reference=False))
def test_backward_is_deterministic(device, backend, rms_norm):
    skip_if_unusable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(64, 200, device=device, requires_grad=True)
    residual = torch.randn(64, 200, device=device)
    weight = torch.randn(200, device=device, requires_grad=True)
    bias = None if rms_norm else torch.randn(200, device=device, requires_grad=True)
    grad = torch.randn(64, 200, device=device)
    with fusedres.use_backend(backend):
        runs = []
        for _ in range(2):
            y = fusedres.add_norm(x, residual, weight, bias, 1e-5, rms_norm=rms_norm)
            runs.append(torch.autograd.grad(y, [t for t in (x, weight, bias) if t is not None], grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rms_norm", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
@pytest.mark.parametrize("device,backend", device_backends())
def test_gradcheck_float64(device, backend, rms_norm, prenorm):
    skip_if_unusable(device, backend)
    torch.manual_seed(0)
    shape = (3, 2, 9)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    residual = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(9, dtype=torch.float64, device=device, requires_grad=True)
    bias = None if rms_norm else torch.randn(9, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, residual, weight, *bias):
        return fusedres.add_norm(
            x, residual, weight, bias[0] if bias else None, 1e-5, rms_norm=rms_norm, prenorm=prenorm
        )

    inputs = (x, residual, weight) + ((bias,) if bias is not None else ())
    with fusedres.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", device_backends(include_reference=False))
def test_h_is_written_only_when_read(device, backend):
    """h = x + residual is stored only when someone reads it: prenorm returns it, and a GPU
    backward reads it (the CPU backward re-adds the residual instead). Without grad and without
    prenorm it is never written. y is the same either way."""
    skip_if_unusable(device, backend)
    store_h_flags = []

    class StoreHSpy(TorchDispatchMode):  # sees the forward operator on every path
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._opname.startswith("add_norm_fwd"):
                store_h_flags.append(args[7])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, residual = torch.randn(2, 8, 64, device=device), torch.randn(2, 8, 64, device=device)
    weight, bias = torch.randn(64, device=device), torch.randn(64, device=device)
    with fusedres.use_backend(backend), StoreHSpy():
        with torch.no_grad():
            y_inference = fusedres.add_layer_norm(x, residual, weight, bias)
            _, h = fusedres.add_layer_norm(x, residual, weight, bias, prenorm=True)
        y_train = fusedres.add_layer_norm(x, residual, weight.requires_grad_(), bias)
    assert store_h_flags == [False, True, backend != "cpu"]
    torch.testing.assert_close(y_inference, y_train.detach(), rtol=0, atol=0)
    torch.testing.assert_close(h, x + residual, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", device_backends(include_reference=False))
def test_backward_with_recomputed_h_matches_stored_h(device, backend, dtype):
    """The backward op given x + residual (h recomputed) equals the one given the stored h."""
    skip_if_unusable(device, backend)
    from fusedres.ops.add_norm import _KERNELS, BwdArgs, FwdArgs

    torch.manual_seed(0)
    x = torch.randn(6, 77, device=device, dtype=dtype)
    residual = torch.randn(6, 77, device=device, dtype=torch.float32)
    weight, bias = torch.randn(77, device=device), torch.randn(77, device=device)
    fwd, bwd = _KERNELS[backend].fwd_op, _KERNELS[backend].bwd_op
    for h_dtype in (torch.float32, dtype):
        args = FwdArgs(x, residual, weight, bias, 1e-5, False, h_dtype, True)
        y, h, mean, rstd, _mask = fwd(*args)
        dy = torch.randn_like(y)
        given = dict(dy=dy, dh=None, h_dtype=h_dtype, weight=weight, bias=bias, mean=mean, rstd=rstd)
        given.update(rms_norm=False, dresidual_dtype=torch.float32)
        stored = bwd(*BwdArgs(h=h, x=None, residual=None, **given))
        recomputed = bwd(*BwdArgs(h=None, x=x, residual=residual, **given))
        for a, b in zip(stored, recomputed):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backends())
def test_strided_parameters_are_read_correctly(device, backend):
    """A weight / bias that is a strided view (w[::2]) gives the same result as its copy."""
    skip_if_unusable(device, backend)
    torch.manual_seed(0)
    x, residual = torch.randn(3, 17, device=device), torch.randn(3, 17, device=device)
    wide_w, wide_b = torch.randn(34, device=device), torch.randn(34, device=device)
    w, b = wide_w[::2], wide_b[::2]
    with fusedres.use_backend(backend):
        ours = fusedres.add_layer_norm(x, residual, w, b)
    torch.testing.assert_close(ours, F.layer_norm(x + residual, (17,), w.contiguous(), b.contiguous()))


@pytest.mark.parametrize("h_dtype,tail", [(torch.float16, 2**-11), (torch.bfloat16, 2**-8)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("device,backend", device_backends())
def test_fp64_to_16_bit_rounds_through_fp32(device, backend, h_dtype, tail):
    """h = x + residual from fp64 x and a 16-bit residual is rounded to the residual's dtype as
    eager's .to() does: through fp32. 1 + tail + 2**-40 is just above halfway between two 16-bit
    values, so a direct rounding goes up; fp32 first drops the 2**-40 and ties go to even (1.0)."""
    skip_if_unusable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(3, 40, dtype=torch.float64, device=device)
    residual = torch.randn(3, 40, device=device).to(h_dtype)
    x[1, 7] = 1 + tail + 2**-40 - 0.5
    residual[1, 7] = 0.5
    with fusedres.use_backend(backend):
        _, h = fusedres.add_layer_norm(x, residual, prenorm=True)
    expected = (x + residual.double()).to(h_dtype)
    assert h.dtype == h_dtype
    assert h[1, 7].item() == 1.0
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


def test_saved_tensors_go_through_hooks_and_in_place_changes_are_caught():
    """What autograd promises of saved tensors holds on both paths: saved-tensor hooks (activation
    offloading, checkpointing) see every saved tensor, and a saved input changed in place before
    the backward is an error, not a wrong grad."""
    if "cpu" not in fusedres.available_backends("cpu"):
        pytest.skip("fusedres._C not loaded")
    torch.manual_seed(0)
    x, r, w, b = (
        t.requires_grad_() for t in (torch.randn(8, 32), torch.randn(8, 32), torch.randn(32), torch.randn(32))
    )
    packed = []
    with fusedres.use_backend("cpu"):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
            y = fusedres.add_layer_norm(x, r, w, b)
        grads = torch.autograd.grad(y, (x, r, w, b), torch.ones_like(y))
        assert any(p is x for p in packed) and any(p is w for p in packed), [p.shape for p in packed]
        expected = torch.autograd.grad(F.layer_norm(x + r, (32,), w, b), (x, r, w, b), torch.ones_like(y))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        y = fusedres.add_layer_norm(x, r, w, b)
        with torch.no_grad():
            w.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y, (x,), torch.ones_like(y))
