"""BatchNorm (+ residual) (+ ReLU): the ResNet block tail relu(bn(conv(x)) + identity).

The operators are declared once in csrc/ops.cpp (C++ kernels: CPU and CUDA) and defined with the
same signatures in fusedres/triton/batch_norm.py (Triton). This module adds what every backend
shares: argument checks, layout handling, backend dispatch, fake kernels and the autograd
formula. fusedres/reference/batch_norm.py is the spec.
"""

from __future__ import annotations

import math

import torch

from fusedres._extension import EXTENSION_LOADED
from fusedres.backends import resolve_backend
from fusedres.ops._checks import check_float_tensor, check_positive, check_same_device
from fusedres.reference.batch_norm import batch_norm_add_relu_reference

# --- operators per backend --------------------------------------------------------------------

OP_NAMES = (
    "batch_norm_stats",
    "batch_norm_add_relu_fwd",
    "batch_norm_add_relu_bwd_reduce",
    "batch_norm_add_relu_bwd_input",
)
_OPS: dict[str, dict[str, object]] = {}

if EXTENSION_LOADED:
    _OPS["cpu"] = _OPS["cuda"] = {name: getattr(torch.ops.fusedres, name).default for name in OP_NAMES}

try:
    from fusedres.triton import batch_norm as _triton_batch_norm
except ImportError:  # no triton on this platform
    _triton_batch_norm = None
else:
    _OPS["triton"] = {name: getattr(_triton_batch_norm, f"{name}_triton") for name in OP_NAMES}


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if EXTENSION_LOADED:

    @torch.library.register_fake("fusedres::batch_norm_stats")
    def _stats_fake(input):
        c, stats = input.shape[1], _stats_dtype(input.dtype)
        return input.new_empty((c,), dtype=stats), input.new_empty((c,), dtype=stats)

    @torch.library.register_fake("fusedres::batch_norm_add_relu_fwd")
    def _fwd_fake(input, residual, weight, bias, mean, invstd, relu, training, count):
        return torch.empty_like(input)

    @torch.library.register_fake("fusedres::batch_norm_add_relu_bwd_reduce")
    def _bwd_reduce_fake(grad_out, out, input, mean, invstd, relu, write_grad_residual):
        c, stats = input.shape[1], _stats_dtype(input.dtype)
        g = torch.empty_like(input) if write_grad_residual else input.new_empty((0,))
        return input.new_empty((c,), dtype=stats), input.new_empty((c,), dtype=stats), g

    @torch.library.register_fake("fusedres::batch_norm_add_relu_bwd_input")
    def _bwd_input_fake(grad, out, input, mean, invstd, weight, sum_dy, sum_dy_xhat, count, training, relu):
        return torch.empty_like(input)


def update_running_stats(running_mean, running_var, mean, var, momentum: float, count: int) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance
    var * count / (count - 1), exactly as F.batch_norm updates them. O(C) work: torch ops serve
    every device."""
    unbiased = var * (count / (count - 1)) if count > 1 else var
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


@torch.library.custom_op("fusedres::batch_norm_update_running_stats", mutates_args=("running_mean", "running_var"))
def batch_norm_update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    count: int,
) -> None:
    """update_running_stats as an operator that declares its mutation, for torch.compile. Eager
    calls the function directly: a Python custom op costs ~100 us a call, more than a small
    layer's whole kernel time."""
    update_running_stats(running_mean, running_var, mean, var, momentum, count)


@batch_norm_update_running_stats.register_fake
def _update_running_stats_fake(running_mean, running_var, mean, var, momentum, count):
    return None


# --- autograd, shared by every backend's operator ---------------------------------------------


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with like's strides (a copy only when they differ): kernels read both with one indexing."""
    if t.stride() == like.stride() or t.numel() <= 1:
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _residual_view(residual, x, dtype):
    """The residual as the kernels read it: x's (N, C, S) shape, strides and dtype."""
    return match_layout(residual.reshape(x.shape), x).to(dtype) if residual is not None else None


def _setup_context(ctx, inputs, output):
    input, _residual, weight, bias, mean, invstd, relu, training, count = inputs
    ctx.relu, ctx.training, ctx.count = relu, training, count
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(input, output, weight, mean, invstd)


def _make_backward(ops: dict):
    reduce_op, input_op = ops["batch_norm_add_relu_bwd_reduce"], ops["batch_norm_add_relu_bwd_input"]

    def backward(ctx, grad_out):
        input, out, weight, mean, invstd = ctx.saved_tensors
        needs_input, needs_residual, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        grad_out = match_layout(grad_out.to(input.dtype), input)
        # With a ReLU, the residual's grad is the masked grad: written once by the reduce pass
        # and read back (instead of grad_out and out) by the input pass.
        write_g = needs_residual and ctx.relu
        sum_dy, sum_dy_xhat, g = reduce_op(grad_out, out, input, mean, invstd, ctx.relu, write_g)
        grad_input = None
        if needs_input:
            grad, mask_from = (g, None) if write_g else (grad_out, out)
            grad_input = input_op(
                grad, mask_from, input, mean, invstd, weight, sum_dy, sum_dy_xhat, ctx.count, ctx.training, ctx.relu
            )
        grad_residual = (g if write_g else grad_out) if needs_residual else None
        grad_weight = sum_dy_xhat.to(weight.dtype) if needs_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if needs_bias else None
        return grad_input, grad_residual, grad_weight, grad_bias, None, None, None, None, None

    return backward


_registered = set()
for _ops in _OPS.values():
    _fwd = _ops["batch_norm_add_relu_fwd"]
    if _fwd not in _registered:
        torch.library.register_autograd(_fwd, _make_backward(_ops), setup_context=_setup_context)
        _registered.add(_fwd)


# --- public API --------------------------------------------------------------------------------


def _check_args(input, residual, running_mean, running_var, weight, bias, training, eps) -> float:
    check_float_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dims (N, C, ...), got shape {tuple(input.shape)}")
    c = input.shape[1]
    check_float_tensor("residual", residual, optional=True)
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_float_tensor(name, t, optional=True)
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},) for input with {c} channels, got {tuple(t.shape)}")
    check_same_device(
        "input", input, residual=residual, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    eps = check_positive("eps", eps)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if training and input.numel() // c <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
    return eps


def as_channels_view(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (N, C, S), a view when t is NCHW- or channels_last-dense, else a copy."""
    n, c = t.shape[:2]
    s = math.prod(t.shape[2:])
    v = t.reshape(n, c, s)
    dense_nchw = (s <= 1 or v.stride(2) == 1) and (c <= 1 or v.stride(1) == s) and (n <= 1 or v.stride(0) == c * s)
    dense_nhwc = (c <= 1 or v.stride(1) == 1) and (s <= 1 or v.stride(2) == c) and (n <= 1 or v.stride(0) == c * s)
    return v if dense_nchw or dense_nhwc else v.contiguous()


def batch_norm_add_relu(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    relu: bool = True,
) -> torch.Tensor:
    """``F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    + residual)`` in one pass over memory (two in training: statistics, then the fused rest).

    residual may be None (BN + ReLU); relu=False gives BN (+ add). Running stats are updated in
    place as F.batch_norm does. Input (N, C, *), NCHW or channels_last: the output keeps the
    input's memory format. fp16/bf16 input with fp32 weight, bias and running stats (autocast) is
    computed in fp32 and returned in the input's dtype.
    """
    eps = _check_args(input, residual, running_mean, running_var, weight, bias, training, eps)
    backend = resolve_backend(input.device)
    if backend == "reference":
        return batch_norm_add_relu_reference(
            input, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu=relu
        )
    x = as_channels_view(input)
    count = x.shape[0] * x.shape[2]
    stats = _stats_dtype(input.dtype)
    if training:
        mean, var = _OPS[backend]["batch_norm_stats"](x.detach())
        if running_mean is not None:
            update = batch_norm_update_running_stats if torch.compiler.is_compiling() else update_running_stats
            update(running_mean, running_var, mean, var, float(momentum), count)
    else:
        mean, var = running_mean.detach().to(stats), running_var.detach().to(stats)
    invstd = torch.rsqrt(var + eps)
    return _apply(backend, input, x, residual, weight, bias, mean, invstd, relu, training, count)


def _apply(backend, input, x, residual, weight, bias, mean, invstd, relu, training, count):
    r = _residual_view(residual, x, input.dtype)
    out = _OPS[backend]["batch_norm_add_relu_fwd"](x, r, weight, bias, mean, invstd, relu, training, count)
    return out.view(input.shape)


def bias_add_relu(input: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None, *, relu: bool = True):
    """relu(input + bias[c] + residual) in one pass: the tail of a conv whose BatchNorm was folded
    into its weight and bias (eval mode). Same layouts and dtypes as batch_norm_add_relu."""
    check_float_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dims (N, C, ...), got shape {tuple(input.shape)}")
    check_float_tensor("bias", bias)
    if tuple(bias.shape) != (input.shape[1],):
        raise ValueError(f"bias must have shape ({input.shape[1]},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    backend = resolve_backend(input.device)
    if backend == "reference":
        out = input + bias.reshape(1, -1, *([1] * (input.dim() - 2))).to(input.dtype)
        out = out + residual if residual is not None else out
        return torch.relu(out) if relu else out
    x = as_channels_view(input)
    c, stats = x.shape[1], _stats_dtype(input.dtype)
    zeros, ones = x.new_zeros((c,), dtype=stats), x.new_ones((c,), dtype=stats)
    return _apply(backend, input, x, residual, None, bias, zeros, ones, relu, False, x.shape[0] * x.shape[2])


# --- synchronized (multi-process) BatchNorm ------------------------------------------------------


class _SyncBatchNormAddReLU(torch.autograd.Function):
    """batch_norm_add_relu in training with statistics over every process of `group`, matching
    nn.SyncBatchNorm: all-gather (mean, var, count) before normalizing, all-reduce
    (sum_dy, sum_dy_xhat) before the input grad; dweight/dbias stay local (DDP reduces them)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, momentum, eps, relu, group, backend):
        import torch.distributed as dist

        ops = _OPS[backend]
        mean, var = ops["batch_norm_stats"](x)
        local = torch.cat([mean, var, mean.new_full((1,), x.shape[0] * x.shape[2])])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        c = mean.numel()
        stacked = torch.stack(gathered).double()
        means, variances, counts = stacked[:, :c], stacked[:, c : 2 * c], stacked[:, 2 * c :]
        count = counts.sum()
        global_mean = (means * counts).sum(0) / count
        global_var = ((variances + (means - global_mean).square()) * counts).sum(0) / count
        mean, var, count = global_mean.to(mean.dtype), global_var.to(var.dtype), int(count.item())
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, momentum, count)
        invstd = torch.rsqrt(var + eps)
        out = ops["batch_norm_add_relu_fwd"](x, residual, weight, bias, mean, invstd, relu, True, count)
        ctx.save_for_backward(x, out, weight, mean, invstd)
        ctx.relu, ctx.count, ctx.group, ctx.ops = relu, count, group, ops
        ctx.has_residual, ctx.bias_dtype = residual is not None, bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        import torch.distributed as dist

        x, out, weight, mean, invstd = ctx.saved_tensors
        ops = ctx.ops
        grad_out = match_layout(grad_out, x)
        write_g = ctx.has_residual and ctx.relu
        sum_dy, sum_dy_xhat, g = ops["batch_norm_add_relu_bwd_reduce"](
            grad_out, out, x, mean, invstd, ctx.relu, write_g
        )
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=ctx.group)
        sum_dy, sum_dy_xhat = sums.chunk(2)
        grad, mask_from = (g, None) if write_g else (grad_out, out)
        grad_input = ops["batch_norm_add_relu_bwd_input"](
            grad, mask_from, x, mean, invstd, weight, sum_dy, sum_dy_xhat, ctx.count, True, ctx.relu
        )
        grad_residual = (g if write_g else grad_out) if ctx.has_residual else None
        return grad_input, grad_residual, grad_weight, grad_bias, None, None, None, None, None, None, None


def sync_batch_norm_add_relu(
    input, residual, running_mean, running_var, weight=None, bias=None, momentum=0.1, eps=1e-5, *, relu=True, group=None
):
    """Training-mode batch_norm_add_relu with batch statistics over all processes of `group`
    (torch.distributed must be initialized)."""
    eps = _check_args(input, residual, running_mean, running_var, weight, bias, True, eps)
    backend = resolve_backend(input.device)
    if backend == "reference":
        raise RuntimeError("sync_batch_norm_add_relu needs a kernel backend (cpu, cuda or triton), not 'reference'")
    x = as_channels_view(input)
    r = _residual_view(residual, x, input.dtype)
    out = _SyncBatchNormAddReLU.apply(
        x, r, weight, bias, running_mean, running_var, float(momentum), eps, relu, group, backend
    )
    return out.view(input.shape)
