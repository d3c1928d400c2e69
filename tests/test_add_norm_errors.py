"""Bad input to add_layer_norm / add_rms_norm: a clear error naming the argument, on every backend."""

from __future__ import annotations

import pytest
import torch

import fusedres

# Every test on both eager paths (conftest.py: autograd_path).
pytestmark = pytest.mark.usefixtures("autograd_path")


def good(device):
    x = torch.randn(4, 16, device=device)
    return dict(
        x=x,
        residual=torch.randn(4, 16, device=device),
        weight=torch.randn(16, device=device),
        bias=torch.randn(16, device=device),
        eps=1e-5,
    )


BAD = [
    ("residual", lambda a: torch.randn(4, 15), ValueError, "residual must have x's shape"),
    ("residual", lambda a: torch.randn(5, 16), ValueError, "residual must have x's shape"),
    ("weight", lambda a: torch.randn(15), ValueError, r"weight must have shape \(16,\)"),
    ("weight", lambda a: torch.randn(4, 16), ValueError, r"weight must have shape \(16,\)"),
    ("bias", lambda a: torch.randn(17), ValueError, r"bias must have shape \(16,\)"),
    ("x", lambda a: torch.randint(0, 5, (4, 16)), TypeError, "x must be float32, float64, float16 or bfloat16"),
    ("residual", lambda a: torch.ones(4, 16, dtype=torch.int32), TypeError, "residual must be float32"),
    ("weight", lambda a: [1.0] * 16, TypeError, "weight must be a torch.Tensor"),
    ("eps", lambda a: 0.0, ValueError, "eps must be a positive finite number"),
    ("eps", lambda a: -1e-5, ValueError, "eps must be a positive finite number"),
    ("eps", lambda a: float("nan"), ValueError, "eps must be a positive finite number"),
    ("x", lambda a: torch.randn(4, 0), ValueError, "normalized \\(last\\) dimension of x must not be empty"),
    ("x", lambda a: torch.tensor(1.0), ValueError, "x must have at least one dimension"),
]


CPU_BACKENDS = [b for b in ("cpu", "triton", "reference") if b in fusedres.available_backends("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arg,make,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_is_named(arg, make, exc, match, backend):
    """Every backend raises the same error: the C++ operators' own checks reject the call and
    the spec's checks name the argument; the others are checked before the call."""
    args = good("cpu")
    bad = make(args)
    args[arg] = bad
    if arg == "x" and isinstance(bad, torch.Tensor) and bad.dim() == 2 and bad.is_floating_point():
        args.update(residual=None, weight=None, bias=None)
    with fusedres.use_backend(backend), pytest.raises(exc, match=match) as raised:
        fusedres.add_layer_norm(**args)
    assert raised.value.__context__ is None  # not "during handling of ... another exception occurred"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_bad_input_is_named(backend):
    norm = fusedres.nn.AddLayerNorm(16)
    with fusedres.use_backend(backend):
        with pytest.raises(ValueError, match="residual must have x's shape"):
            norm(torch.randn(4, 16), torch.randn(3, 16))
        with pytest.raises(TypeError, match="x must be float32"):
            norm(torch.ones(4, 16, dtype=torch.int64))


def test_kernel_failure_that_is_not_an_argument_error_propagates(monkeypatch, autograd_path):
    """Valid arguments and a failing kernel (out of memory, say): the kernel's own error, as is,
    from either eager path (the C++ fast path, replaced here by one that fails, or the kernels the
    Python Function calls)."""
    if "cpu" not in fusedres.available_backends("cpu"):
        pytest.skip("fusedres._C not loaded")
    from fusedres.ops import add_norm

    def failing(*args):
        raise torch.OutOfMemoryError("out of memory (test)")

    if autograd_path == "fastpath":
        monkeypatch.setattr(add_norm, "_fastpath", failing)
    else:
        monkeypatch.setitem(add_norm._KERNELS, "cpu", add_norm._KERNELS["cpu"]._replace(fwd=failing))
    with fusedres.use_backend("cpu"), pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        fusedres.add_layer_norm(**good("cpu"))


@pytest.mark.gpu
def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    args = good("cpu")
    args["residual"] = args["residual"].cuda()
    with pytest.raises(ValueError, match="residual is on cuda:0 but x is on cpu"):
        fusedres.add_layer_norm(**args)


def test_device_mismatch_is_named_meta():
    # A meta tensor stands in for a second device on GPU-less machines.
    args = good("cpu")
    args["weight"] = args["weight"].to("meta")
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        fusedres.add_layer_norm(**args)


def test_rms_norm_errors_use_same_names():
    """add_rms_norm names the argument as add_layer_norm does."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fusedres.add_rms_norm(x, None, torch.randn(7))


def test_cpp_op_rejects_out_of_bounds_shapes_directly():
    """Calling the raw operator bypasses the Python checks; its own checks (generated from the
    spec, fusedres/spec/add_norm.py) must still stop anything that would index out of bounds."""
    if not fusedres.EXTENSION_LOADED:
        pytest.skip("fusedres._C not loaded")
    from fusedres.ops.add_norm import BwdArgs, FwdArgs

    fwd, bwd = torch.ops.fusedres.add_norm_fwd, torch.ops.fusedres.add_norm_bwd
    x = torch.randn(4, 16)
    common = dict(eps=1e-5, rms_norm=False, h_dtype=torch.float32, store_h=False)
    cases = [
        (dict(residual=torch.randn(3, 16)), "residual must have shape"),
        (dict(weight=torch.randn(8)), "weight must have 16 contiguous elements"),
        (dict(x=x.t()), "unit stride"),
        (dict(rowscale=torch.randn(3)), "rowscale must have 4 contiguous elements"),
        (dict(colscale=torch.randn(4, 4)[:, 0]), "colscale must have 16 contiguous elements"),
        (dict(dropout_p=0.5), "dropout_p > 0 needs seed_offset"),
        (dict(dropout_p=0.5, seed_offset=torch.zeros(3, dtype=torch.int64)), "seed_offset must be a contiguous"),
        (dict(weight_offset=1.0), "weight_offset needs a weight"),
    ]
    for change, match in cases:
        args = dict(x=x, residual=None, weight=None, bias=None, **common)
        args.update(change)
        with pytest.raises(RuntimeError, match=match):
            fwd(*FwdArgs(**args))
    y, _h, mean, rstd, _mask = fwd(*FwdArgs(x=x, residual=None, weight=None, bias=None, **common))
    backward = dict(dy=y, dh=None, h=None, x=x, residual=None, h_dtype=torch.float32, weight=None, bias=None)
    backward.update(mean=mean, rstd=rstd, rms_norm=False, dresidual_dtype=None)
    for change, match in [
        (dict(rstd=rstd[:2]), "rstd must have 4 contiguous elements"),
        (dict(residual=x[:2]), "residual must have shape"),
        (dict(x=None), "add_norm_bwd needs h or x"),
        (dict(mean=None), "LayerNorm's backward needs mean"),
        (dict(colscale_grad=True), "colscale_grad needs x and colscale"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            bwd(*BwdArgs(**{**backward, **change}))
