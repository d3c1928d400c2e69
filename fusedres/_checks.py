"""Argument checks and layout rules, one of each per op family, shared by every backend.

The public ops (fusedres/ops), the Triton operators (fusedres/triton) and the fake kernels all
call these, so every backend raises the same errors: a TypeError or ValueError that names the
argument and says what was expected. The C++ operators keep only the checks memory safety needs
(csrc/add_norm.cpp, csrc/batch_norm.cpp).

They sit on the hot path of every call, so the common case costs a handful of attribute reads;
the message is only built once a check has failed.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))
_TENSOR = torch.Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The statistics / accumulation dtype: float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# --- Add & Norm ------------------------------------------------------------------------------


def check_add_norm_args(x, residual, weight, bias, eps, *, param_shape: tuple | None = None) -> float:
    """Validates add_norm's arguments and returns eps as a float. weight and bias must have shape
    (N,), N = x.shape[-1]; a module normalizing several trailing dims passes their shape as
    param_shape (its parameters keep it; the kernels read them as N contiguous elements)."""
    check_float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the normalized one)")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"the normalized (last) dimension of x must not be empty, got x of shape {tuple(x.shape)}")
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _check_device("residual", residual, "x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if param_shape is None:
            _check_vector(name, t, n, "to match x's last dimension", ("x", x))
        else:
            check_float_tensor(name, t)
            if t.shape != param_shape or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous tensor of shape {param_shape}, got {tuple(t.shape)}")
            _check_device(name, t, "x", x)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    return check_positive("eps", eps)


def _rows_readable(t: torch.Tensor) -> bool:
    """Whether the kernels can read (..., N) tensor t in place: unit stride along N and leading
    dims that collapse into rows of one stride (csrc/add_norm.cpp checks the same)."""
    if t.dim() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    expected = None
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size <= 1:
            continue
        if stride < 0 or (expected is not None and stride != expected):
            return False
        expected = stride * size
    return True


def as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as the Add & Norm kernels read it: itself when contiguous or row-strided, else a
    contiguous copy (incoming grads may be expanded or transposed views)."""
    if t is None or t.is_contiguous() or _rows_readable(t):
        return t
    return t.contiguous()


# --- BatchNorm + add + ReLU -------------------------------------------------------------------


def check_batch_norm_args(input, residual, running_mean, running_var, weight, bias, training, eps) -> float:
    """Validates batch_norm_add_relu's arguments and returns eps as a float."""
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
