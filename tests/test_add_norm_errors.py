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
    fusedres/_checks.py names the argument; the others are checked before the call."""
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
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fusedres.add_rms_norm(x, None, torch.randn(7))


def test_cpp_op_rejects_out_of_bounds_shapes_directly():
    """Calling the raw operator bypasses the Python checks; its own checks must still stop
    anything that would index out of bounds."""
    if not fusedres.EXTENSION_LOADED:
        pytest.skip("fusedres._C not loaded")
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        torch.ops.fusedres.add_norm_fwd(x, torch.randn(3, 16), None, None, 1e-5, False, torch.float32, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.fusedres.add_norm_fwd(x, None, torch.randn(8), None, 1e-5, False, torch.float32, False)
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.fusedres.add_norm_fwd(x.t(), None, None, None, 1e-5, False, torch.float32, False)
    y, h, mean, rstd = torch.ops.fusedres.add_norm_fwd(x, None, None, None, 1e-5, False, torch.float32, False)
    with pytest.raises(RuntimeError, match="rstd must be"):
        torch.ops.fusedres.add_norm_bwd(y, None, x, None, torch.float32, None, None, mean, rstd[:2], False, None)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        torch.ops.fusedres.add_norm_bwd(y, None, x, x[:2], torch.float32, None, None, mean, rstd, False, None)
