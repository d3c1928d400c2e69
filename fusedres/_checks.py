"""BatchNorm's argument checks and layout rules, shared by every backend.

The public ops (fusedres/ops/batch_norm.py), the Triton operators (fusedres/triton) and the fake
kernels all call these, so every backend raises the same errors: a TypeError or ValueError that
names the argument and says what was expected. The C++ operators keep only the checks memory
safety needs (csrc/batch_norm.cpp). Add & Norm's checks are derived from its spec instead
(fusedres/spec/add_norm.py, fusedres/spec/python.py).

They sit on the hot path of every call, so the common case costs a handful of attribute reads;
the message is only built once a check has failed."""

from __future__ import annotations

import math
import numbers

import torch

from fusedres.spec.python import stats_dtype

FLOAT_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))
_TENSOR = torch.Tensor


def check_float_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, _TENSOR):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def check_positive(name: str, value) -> float:
    if type(value) is float and value > 0 and value != math.inf:  # the usual case, NaN fails `> 0`
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def _check_device(name: str, t, reference_name: str, reference) -> None:
    if t.device != reference.device:
        raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def _check_vector(name: str, t, n: int, what: str, device_of) -> None:
    check_float_tensor(name, t)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) {what}, got {tuple(t.shape)}")
    _check_device(name, t, *device_of)


def _eps_ok(eps) -> bool:
    """eps is a positive finite float (the fast paths; check_positive says what is wrong)."""
    return type(eps) is float and 0 < eps < math.inf


# --- BatchNorm + add + ReLU -------------------------------------------------------------------


def check_batch_norm_args(input, residual, running_mean, running_var, weight, bias, training, eps) -> float:
    """Validates batch_norm_add_relu's arguments and returns eps as a float."""
    try:  # the common case in one expression, written out (each helper call costs ~0.1 us here)
        shape = input.shape
        c = (shape[1],)
        device = input.device
        fast = (
            input.dtype in FLOAT_DTYPES
            and _eps_ok(eps)
            and (
                residual is None
                or (residual.shape == shape and residual.dtype in FLOAT_DTYPES and residual.device == device)
            )
            and (weight is None or (weight.shape == c and weight.dtype in FLOAT_DTYPES and weight.device == device))
            and (bias is None or (bias.shape == c and bias.dtype in FLOAT_DTYPES and bias.device == device))
            and (
                training
                if running_mean is None and running_var is None
                else (
                    running_mean.shape == c
                    and running_var.shape == c
                    and running_mean.dtype in FLOAT_DTYPES
                    and running_var.dtype in FLOAT_DTYPES
                    and running_mean.device == device
                    and running_var.device == device
                    and running_mean.is_contiguous()
                    and running_var.is_contiguous()
                )
            )
            and (not training or input.numel() > c[0])
        )
    except (AttributeError, IndexError, TypeError):
        fast = False
    return (
        eps if fast else _check_batch_norm_args(input, residual, running_mean, running_var, weight, bias, training, eps)
    )


def _check_batch_norm_args(input, residual, running_mean, running_var, weight, bias, training, eps) -> float:
    check_float_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dims (N, C, ...), got shape {tuple(input.shape)}")
    c = input.shape[1]
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        _check_device("residual", residual, "input", input)
    what = f"for input with {c} channels"
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _check_vector(name, t, c, what, ("input", input))
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place), got strides {t.stride()}")
    eps = check_positive("eps", eps)
    if (running_mean is None) != (running_var is None):
        if not training:
            raise ValueError("running_mean and running_var are required when training=False")
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if training and input.numel() <= c:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
    return eps


def check_bias_add_relu_args(input, bias, residual) -> None:
    check_float_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dims (N, C, ...), got shape {tuple(input.shape)}")
    _check_vector("bias", bias, input.shape[1], f"for input with {input.shape[1]} channels", ("input", input))
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        _check_device("residual", residual, "input", input)


def channels_dense(t: torch.Tensor) -> bool:
    """Whether the BatchNorm kernels can read (N, C, *) tensor t in place: dense in NCHW
    (contiguous) or channels_last order (csrc/batch_norm.cpp checks the same)."""
    if t.is_contiguous():
        return True
    shape, strides = t.shape, t.stride()
    step = shape[1]
    for d in range(t.dim() - 1, 1, -1):
        if shape[d] > 1 and strides[d] != step:
            return False
        step *= shape[d]
    return (shape[1] <= 1 or strides[1] == 1) and (shape[0] <= 1 or strides[0] == step)


def as_channels(t: torch.Tensor) -> torch.Tensor:
    """t itself when channels_dense, else a contiguous copy."""
    return t if channels_dense(t) else t.contiguous()


def like_input(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """t (input's shape) with input's dtype and strides, the way the kernels read both with one
    indexing: t itself when it has them already, else one copy."""
    if t.dtype == input.dtype and (t.stride() == input.stride() or t.numel() <= 1):
        return t
    return torch.empty_like(input).copy_(t)


# --- the operators' own arguments --------------------------------------------------------------
# The registered operators can be called directly (internal arguments included: statistics,
# dtypes), so the Triton operators and the fake kernels check what the kernels index with, as
# the C++ operators do (csrc/add_norm.cpp, csrc/batch_norm.cpp).


def _check_elements(name: str, t, n: int, device) -> None:
    """t is None or n contiguous floating elements (any shape) on `device`."""
    if t is None:
        return
    check_float_tensor(name, t)
    if t.numel() != n or not t.is_contiguous():
        raise ValueError(f"{name} must have {n} contiguous elements, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_activation(name: str, t, input=None) -> None:
    """t is an (N, C, *) activation the kernels can read (channels_dense); with input: of its
    shape, dtype, device and layout."""
    check_float_tensor(name, t)
    if t.dim() < 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must be (N, C, ...) with C > 0, got shape {tuple(t.shape)}")
    if not channels_dense(t):
        raise ValueError(f"{name} must be dense in NCHW or channels_last order (make it contiguous)")
    if input is not None and (t.shape, t.dtype, t.device) != (input.shape, input.dtype, input.device):
        raise ValueError(
            f"{name} must have input's shape, dtype and device, got {t.dtype}{tuple(t.shape)} on {t.device}"
        )
    if input is not None and t.is_contiguous() != input.is_contiguous() and input.shape[1] > 1:
        raise ValueError(f"{name} must have input's memory format")


def _check_bn(input, eps=None, activations=(), vectors=(), stats_vectors=(), pair=()) -> None:
    """The registered ops' checks: input; (name, t) activations like input (None skipped);
    channel vectors, of the statistics dtype for stats_vectors; a pair given together."""
    _check_activation("input", input)
    for name, t in activations:
        if t is not None:
            _check_activation(name, t, input)
    if pair and (pair[0][1] is None) != (pair[1][1] is None):
        raise ValueError(f"{pair[0][0]} and {pair[1][0]} must be given together")
    for name, t in (*vectors, *stats_vectors):
        _check_elements(name, t, input.shape[1], input.device)
    for name, t in stats_vectors:
        if t is not None and t.dtype != stats_dtype(input.dtype):
            raise TypeError(f"{name} must be {stats_dtype(input.dtype)} (the statistics dtype), got {t.dtype}")
    if eps is not None:
        check_positive("eps", eps)


def check_bn_stats_op(input, running_mean, running_var, momentum) -> None:
    running = (("running_mean", running_mean), ("running_var", running_var))
    _check_bn(input, vectors=running, pair=running)


def check_bn_combine_op(stats, running_mean, running_var, momentum) -> None:
    check_float_tensor("stats", stats)
    if stats.dim() != 2 or stats.shape[0] == 0 or stats.shape[1] < 3 or stats.shape[1] % 2 != 1:
        raise ValueError(f"stats must be (W, 2C + 1) with W >= 1, got shape {tuple(stats.shape)}")
    if not stats.is_contiguous() or stats.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"stats must be a contiguous float32 or float64 tensor, got {stats.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_elements(name, t, (stats.shape[1] - 1) // 2, stats.device)


def check_bn_fwd_op(input, residual, weight, bias, mean, var, eps, relu, training, count) -> None:
    stats = (("mean", mean), ("var", var))
    _check_bn(input, eps, [("residual", residual)], (("weight", weight), ("bias", bias), *stats), pair=stats)


def check_bn_bwd_reduce_op(grad_out, out, input, mean, var, eps, relu, write_grad_residual) -> None:
    stats = (("mean", mean), ("var", var))
    _check_bn(input, eps, [("grad_out", grad_out), ("out", out)], stats, pair=stats)


def check_bn_bwd_input_op(grad, out, input, mean, var, eps, weight, sum_dy, sum_dy_xhat, count, training, relu) -> None:
    stats, sums = (("mean", mean), ("var", var)), (("sum_dy", sum_dy), ("sum_dy_xhat", sum_dy_xhat))
    _check_bn(input, eps, [("grad", grad), ("out", out)], (("weight", weight), *stats), sums, pair=stats)
    if training and (sum_dy is None or sum_dy_xhat is None or count <= 0):
        raise ValueError("training needs sum_dy, sum_dy_xhat and a positive count")
