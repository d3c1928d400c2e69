"""batch_norm_add_relu: every backend against float64 eager, outputs, grads and running stats."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref, device_backends, skip_if_unusable

import fusedres
from fusedres.reference import batch_norm_add_relu_reference


@dataclass(frozen=True)
class Case:
    shape: tuple
    channels_last: bool = False
    residual: bool = True
    relu: bool = True
    affine: bool = True
    training: bool = True
    running: bool = True  # running stats given (track_running_stats)
    momentum: float = 0.1

    def __str__(self):
        flags = ["cl" if self.channels_last else "nchw", "train" if self.training else "eval"]
        flags += [] if self.residual else ["nores"]
        flags += [] if self.relu else ["norelu"]
        flags += [] if self.affine else ["noaffine"]
        flags += [] if self.running else ["norunning"]
        return f"{list(self.shape)}-" + "-".join(flags)


CASES = [
    Case((4, 16, 7, 7)),  # a scaled-down ResNet stage
    Case((4, 16, 7, 7), channels_last=True),
    Case((2, 3, 5, 5), channels_last=True),  # C = 3
    Case((5, 8, 1, 1)),  # H x W = 1
    Case((1, 6, 4, 5)),  # N = 1 with H x W > 1
    Case((1, 6, 4, 5), channels_last=True),
    Case((3, 8, 6, 6), residual=False),  # BN + ReLU
    Case((3, 8, 6, 6), channels_last=True, relu=False),  # BN + add
    Case((3, 8, 6, 6), affine=False),
    Case((3, 8, 6, 6), running=False),  # track_running_stats=False: batch stats, no update
    Case((3, 8, 6, 6), training=False),
    Case((3, 8, 6, 6), channels_last=True, training=False),
    Case((6, 10)),  # BatchNorm1d on (N, C)
    Case((4, 6, 9)),  # (N, C, L)
    Case((2, 4, 3, 4, 5)),  # 3-D
    # C over the CPU rows kernels' channel block (512), not a multiple of it or of a vector
    Case((2, 1100, 2, 3), channels_last=True),
    Case((2, 1100, 2, 3), channels_last=True, training=False),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(case: Case, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = case.shape[1]

    def rand(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device=device, dtype=dt)

    x = rand(*case.shape, scale=2.0, shift=0.7)
    residual = rand(*case.shape) if case.residual else None
    if case.channels_last:
        fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        residual = residual.contiguous(memory_format=fmt) if residual is not None else None
    # Autocast's mix: low-precision activations, fp32 parameters and running stats.
    weight = rand(c, scale=0.5, shift=1.0, dt=torch.float32) if case.affine else None
    bias = rand(c, scale=0.5, dt=torch.float32) if case.affine else None
    running_mean = rand(c, scale=0.1, dt=torch.float32) if case.running or not case.training else None
    running_var = (rand(c, dt=torch.float32).abs() + 0.5) if case.running or not case.training else None
    return x, residual, weight, bias, running_mean, running_var


def eager(x, residual, rm, rv, weight, bias, training, momentum, eps, relu):
    """Plain PyTorch in the input dtype (the baseline whose error ours is judged against)."""
    y = F.batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    y = y + residual if residual is not None else y
    return F.relu(y) if relu else y


def clone(t, dtype=None):
    return None if t is None else t.detach().clone().to(dtype or t.dtype)


def run(fn, case, tensors, upstream, steps):
    """`steps` forwards (running stats move), grads of the last; returns out, grads, running."""
    x, residual, weight, bias, rm, rv = tensors
    leaves = [t.requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    for _ in range(steps):
        out = fn(leaves[0], leaves[1], rm, rv, leaves[2], leaves[3], case.training, case.momentum, 1e-5, case.relu)
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((out.double() * upstream).sum(), wrt))
    return out, [next(grads) if t is not None else None for t in leaves], (rm, rv)


def reference(x, residual, rm, rv, weight, bias, training, momentum, eps, relu):
    return batch_norm_add_relu_reference(x, residual, rm, rv, weight, bias, training, momentum, eps, relu=relu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
def test_matches_fp64_reference(device, backend, case, dtype, autograd_path):
    skip_if_unusable(device, backend)
    if backend == "triton" and device == "cpu" and case.shape[1] > 512:
        pytest.skip("the wide-C cases are for the CPU kernels' channel blocks; minutes under the Triton interpreter")
    base = make_inputs(case, dtype, device)
    upstream = torch.randn(case.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    upstream = upstream.to(dtype).double()
    steps = 3 if case.training else 1

    def ours(x, r, rm, rv, w, b, training, momentum, eps, relu):
        with fusedres.use_backend(backend):
            return fusedres.batch_norm_add_relu(x, r, rm, rv, w, b, training, momentum, eps, relu=relu)

    out, grads, running = run(ours, case, [clone(t) for t in base], upstream, steps)
    # Plain PyTorch wants every tensor in the input's dtype.
    e_out, e_grads, e_running = run(eager, case, [clone(t, dtype) for t in base], upstream, steps)
    r_out, r_grads, r_running = run(reference, case, [clone(t, torch.float64) for t in base], upstream, steps)

    assert out.dtype == dtype and out.shape == base[0].shape
    if case.channels_last:
        fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
        assert out.is_contiguous(memory_format=fmt), "output lost the input's channels_last layout"
    assert_close_to_ref("out", out, e_out, r_out, dtype)
    for name, inp, o, e, r in zip(("dinput", "dresidual", "dweight", "dbias"), base, grads, e_grads, r_grads):
        if inp is None:
            continue
        assert o.dtype == inp.dtype, f"{name} dtype {o.dtype} != {inp.dtype}"
        assert_close_to_ref(name, o, e, r, dtype)
    for name, o, e, r in zip(("running_mean", "running_var"), running, e_running, r_running):
        if r is not None:
            assert_close_to_ref(name, o, e, r, torch.float32)


# Activations over 4 MiB take the CPU kernels' huge-page path (csrc/cpu/huge_pages.h).
@pytest.mark.parametrize("case", [Case((8, 64, 48, 48)), Case((8, 64, 48, 48), channels_last=True)], ids=str)
def test_large_cpu_activations_match_fp64_reference(case, autograd_path):
    test_matches_fp64_reference("cpu", "cpu", case, torch.float32, autograd_path)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("device,backend", device_backends())
def test_statistics_stable_for_large_means(device, backend, channels_last, autograd_path):
    """fp32 data with mean 1e4 and std 1: a naive E[x^2] - E[x]^2 loses the variance entirely."""
    skip_if_unusable(device, backend)
    x = torch.randn(8, 4, 16, 16, dtype=torch.float64) + 1e4
    x32 = x.float().to(device)
    if channels_last:
        x32 = x32.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with fusedres.use_backend(backend):
        out = fusedres.batch_norm_add_relu(x32, None, rm, rv, None, None, True, 1.0, 1e-5, relu=False)
    exact_var = x.float().double().var(dim=(0, 2, 3))  # unbiased, as running_var holds it
    torch.testing.assert_close(rv.double().cpu(), exact_var, rtol=1e-4, atol=0)
    assert out.float().std().item() == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("device,backend", device_backends(include_reference=False))
def test_backward_is_deterministic(device, backend, channels_last, autograd_path):
    skip_if_unusable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(6, 8, 12, 12, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    residual = torch.randn_like(x).requires_grad_()
    weight = torch.randn(8, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    runs = []
    with fusedres.use_backend(backend):
        for _ in range(2):
            out = fusedres.batch_norm_add_relu(x, residual, None, None, weight, bias, True)
            runs.append(torch.autograd.grad(out, [x, residual, weight, bias], grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("device,backend", device_backends())
def test_gradcheck_float64(device, backend, channels_last, training, autograd_path):
    skip_if_unusable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    residual = torch.randn_like(x).requires_grad_()
    weight = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64, device=device), torch.rand(4, dtype=torch.float64, device=device) + 1

    def fn(x, residual, weight, bias):
        # Fresh running stats each call: gradcheck calls fn many times.
        return fusedres.batch_norm_add_relu(x, residual, rm.clone(), rv.clone(), weight, bias, training)

    with fusedres.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, residual, weight, bias), eps=1e-6, atol=1e-6)


BAD = [
    ("weight", lambda: torch.randn(5), ValueError, r"weight must have shape \(4,\)"),
    ("bias", lambda: torch.randn(3), ValueError, r"bias must have shape \(4,\)"),
    ("running_mean", lambda: torch.zeros(5), ValueError, r"running_mean must have shape \(4,\)"),
    ("running_var", lambda: torch.ones(2), ValueError, r"running_var must have shape \(4,\)"),
    ("running_mean", lambda: torch.zeros(8)[::2], ValueError, "running_mean must be contiguous"),
    ("residual", lambda: torch.randn(2, 4, 3, 4), ValueError, "residual must have input's shape"),
    ("input", lambda: torch.randn(4), ValueError, "input must have at least 2 dims"),
    ("input", lambda: torch.ones(2, 4, 3, 3, dtype=torch.int64), TypeError, "input must be float32"),
    ("eps", lambda: 0.0, ValueError, "eps must be a positive finite number"),
    ("eps", lambda: -1.0, ValueError, "eps must be a positive finite number"),
]


@pytest.mark.parametrize("arg,make,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_is_named(arg, make, exc, match):
    """Checked before a backend is chosen (fusedres/_checks.py): one backend shows them for all."""
    device, backend = "cpu", "reference"
    args = dict(
        input=torch.randn(2, 4, 3, 3),
        residual=torch.randn(2, 4, 3, 3),
        running_mean=torch.zeros(4),
        running_var=torch.ones(4),
        weight=torch.ones(4),
        bias=torch.zeros(4),
        training=True,
        eps=1e-5,
    )
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    bad = make()
    args[arg] = bad.to(device) if isinstance(bad, torch.Tensor) else bad
    if arg == "input" and isinstance(bad, torch.Tensor) and bad.dim() < 2:
        args["residual"] = None
    with fusedres.use_backend(backend), pytest.raises(exc, match=match):
        fusedres.batch_norm_add_relu(**args)


def test_eval_without_running_stats_is_an_error():
    with pytest.raises(ValueError, match="running_mean and running_var are required when training=False"):
        fusedres.batch_norm_add_relu(torch.randn(2, 4, 3, 3), None, None, None, training=False)


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1)])
def test_one_value_per_channel_in_training_is_an_error(shape):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fusedres.batch_norm_add_relu(torch.randn(shape), None, None, None, training=True)


def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="running_var is on meta but input is on cpu"):
        fusedres.batch_norm_add_relu(torch.randn(2, 4, 3, 3), None, torch.zeros(4), torch.ones(4, device="meta"))


def test_cpp_ops_reject_bad_layouts_directly():
    if not fusedres.EXTENSION_LOADED:
        pytest.skip("fusedres._C not loaded")
    x = torch.randn(2, 4, 9)
    mean, var = torch.zeros(4), torch.ones(4)
    fwd = torch.ops.fusedres.batch_norm_add_relu_fwd
    with pytest.raises(RuntimeError, match="dense in NCHW or channels_last"):
        fwd(x.transpose(0, 2), None, None, None, mean, var, 1e-5, True, True, 18)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        fwd(x, None, None, None, torch.zeros(3), var, 1e-5, True, True, 18)
    with pytest.raises(RuntimeError, match="residual must have input's shape"):
        fwd(x, torch.randn(2, 4, 8), None, None, mean, var, 1e-5, True, True, 18)


@pytest.mark.parametrize("device,backend", device_backends())
def test_nan_propagates_like_eager(device, backend, autograd_path):
    """A NaN input makes its channel's statistics NaN; the ReLU's grad passes NaN outputs' grads on
    (threshold_backward blocks only out <= 0)."""
    skip_if_unusable(device, backend)
    x = torch.randn(3, 4, 5, 5, device=device)
    x[1, 2, 3, 3] = float("nan")
    residual = torch.randn_like(x)
    grad = torch.randn_like(x)
    a = [x.clone().requires_grad_(), residual.clone().requires_grad_()]
    b = [x.clone().requires_grad_(), residual.clone().requires_grad_()]
    with fusedres.use_backend(backend):
        out = fusedres.batch_norm_add_relu(a[0], a[1], None, None, None, None, True)
    expected = F.relu(F.batch_norm(b[0], None, None, None, None, True) + b[1])
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    torch.testing.assert_close(out[~torch.isnan(out)], expected[~torch.isnan(expected)])
    got = torch.autograd.grad(out, a[1], grad)[0]
    want = torch.autograd.grad(expected, b[1], grad)[0]
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got, want, equal_nan=True)
