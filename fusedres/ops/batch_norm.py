"""BatchNorm (+ residual) (+ ReLU): the ResNet block tail relu(bn(conv(x)) + identity).

The operators are declared once in fusedres/spec/batch_norm.py; the C++ kernels (CPU and CUDA)
and the Triton kernels (fusedres/triton/batch_norm.py) implement them. This module adds what
every backend shares: fake kernels, one autograd formula, and the public functions.
fusedres/reference/batch_norm.py is the spec.

Per call, training: `batch_norm_stats` (batch mean and variance; the running stats are updated
inside its kernel) and `batch_norm_add_relu_fwd` (normalize + add + ReLU); backward:
`batch_norm_add_relu_bwd_reduce` (per-channel sums, and the residual's grad) and
`batch_norm_add_relu_bwd_input`. Eval: `batch_norm_add_relu_fwd` alone, with the running stats
(invstd is formed inside the kernel). An optional per-sample `rowscale` (drop path on the
block's branch) scales the normalized branch before the add; the three fused kernels take it (the
statistics are the unscaled input's). As for Add & Norm, eager calls the kernels from
`_BatchNormFunction`, torch.compile the registered operators, both with the same formula;
synchronized BatchNorm takes the eager path with an all-gather of the statistics and an
all-reduce of the backward's sums. Where fusedres._fastpath loaded (built for this torch and
CPython), eager calls on the C++ backends take it instead of `_BatchNormFunction`: one call into
C++, which runs the same formula as a C++ autograd node (csrc/fastpath/batch_norm.cpp; the tests
run both).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedres._checks import (
    as_channels,
    check_batch_norm_args,
    check_bias_add_relu_args,
    check_bn_bwd_input_op,
    check_bn_bwd_reduce_op,
    check_bn_combine_op,
    check_bn_fwd_op,
    check_bn_stats_op,
    like_input,
)
from fusedres._extension import EXTENSION_LOADED, FASTPATH
from fusedres.backends import resolve_backend
from fusedres.ops._eager import below_autograd, direct, fastpath_switch, plain, plain_tensors
from fusedres.reference.batch_norm import batch_norm_add_relu_reference
from fusedres.spec import batch_norm as spec
from fusedres.spec.python import allocate, empty_like_device

_is_compiling = torch.compiler.is_compiling
_increment_version = torch._C._increment_version
_grad_enabled = torch.is_grad_enabled

OP_NAMES = tuple(op.name for op in spec.FAMILY.ops)


class _Kernels(NamedTuple):
    """One backend's five kernels, in OP_NAMES order."""

    stats: object
    combine: object
    fwd: object
    bwd_reduce: object
    bwd_input: object


# backend -> (the kernels called directly (fusedres/ops/_eager.py); the registered operators)
_KERNELS: dict[str, tuple[_Kernels, _Kernels]] = {}

if EXTENSION_LOADED:
    _cpp = _Kernels(*(getattr(torch.ops.fusedres, name).default for name in OP_NAMES))
    for _device in ("cpu", "cuda"):
        _KERNELS[_device] = (_Kernels(*(direct(op, _device) for op in _cpp)), _cpp)

try:
    from fusedres.triton import batch_norm as _triton
except ImportError:  # no triton on this platform
    _triton = None
else:
    _KERNELS["triton"] = (
        _Kernels(*(getattr(_triton, name) for name in OP_NAMES)),
        _Kernels(*(getattr(torch.ops.fusedres, f"{name}_triton").default for name in OP_NAMES)),
    )


# --- fake kernels ------------------------------------------------------------------------------


def _fake(op, check):
    def fake(*args):
        check(*args)
        return allocate(op, args, empty_like_device)

    return fake


_CHECKS = (check_bn_stats_op, check_bn_combine_op, check_bn_fwd_op, check_bn_bwd_reduce_op, check_bn_bwd_input_op)
FAKES = {op.name: _fake(op, check) for op, check in zip(spec.FAMILY.ops, _CHECKS)}

if EXTENSION_LOADED:
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"fusedres::{_name}")(_fake)


# --- autograd: one formula for both paths ------------------------------------------------------


def _setup_context(ctx, inputs, output):
    input, _residual, rowscale, weight, bias, mean, var, eps, relu, training, count = inputs
    # One attribute of ctx (each costs host time): (eps, relu, training, count, the eager path's
    # kernels and process group, bias's dtype (its grad's), whether the rowscale allows the eager
    # path's direct kernel calls).
    ctx.meta = (eps, relu, training, count, None, None, bias.dtype if bias is not None else None, True)
    ctx.save_for_backward(input, output, weight, mean, var, rowscale)


def _as_dtype(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _backward_with(kernels: _Kernels, ctx, needs, grad_out):
    """(grad_input, grad_residual, grad_weight, grad_bias); needs: whether each is wanted. The
    rowscale gets no grad."""
    input, out, weight, mean, var, rowscale = ctx.saved_tensors
    needs_input, needs_residual, needs_weight, needs_bias = needs
    eps, relu, training, count, _kernels, group, bias_dtype, _plain_rowscale = ctx.meta
    grad_out = like_input(grad_out, input)
    # With a ReLU, the residual's grad is the masked grad: written once by the reduce pass and
    # read back (instead of grad_out and out) by the input pass.
    write_g = needs_residual and relu
    sum_dy = sum_dy_xhat = g = grad_weight = grad_bias = None
    if (needs_input and training) or needs_weight or needs_bias or write_g:
        sum_dy, sum_dy_xhat, g = kernels.bwd_reduce(grad_out, out, input, rowscale, mean, var, eps, relu, write_g)
        grad_weight = _as_dtype(sum_dy_xhat, weight.dtype) if needs_weight else None
        grad_bias = _as_dtype(sum_dy, bias_dtype) if needs_bias else None
        if group is not None and needs_input:
            # dweight/dbias stay local (DDP reduces them); the input grad needs global sums.
            sums = torch.cat([sum_dy, sum_dy_xhat])
            torch.distributed.all_reduce(sums, group=group)
            sum_dy, sum_dy_xhat = sums.chunk(2)
    grad_input = None
    if needs_input:
        grad, mask_from = (g, None) if write_g else (grad_out, out)
        grad_input = kernels.bwd_input(
            grad, mask_from, input, rowscale, mean, var, eps, weight, sum_dy, sum_dy_xhat, count, training, relu
        )
    grad_residual = (g if write_g else grad_out) if needs_residual else None
    return grad_input, grad_residual, grad_weight, grad_bias


def _make_registered_backward(kernels: _Kernels):
    def backward(ctx, grad_out):
        n = ctx.needs_input_grad  # input, residual, rowscale, weight, bias, ...
        grad_input, grad_residual, grad_weight, grad_bias = _backward_with(
            kernels, ctx, (n[0], n[1], n[3], n[4]), grad_out
        )
        return grad_input, grad_residual, None, grad_weight, grad_bias, None, None, None, None, None, None

    return backward


for _registered in {id(r.fwd): r for _, r in _KERNELS.values()}.values():  # once per registered op
    torch.library.register_autograd(
        _registered.fwd, _make_registered_backward(_registered), setup_context=_setup_context
    )


def _sync_stats(kernels: _Kernels, x, running_mean, running_var, momentum, group):
    """Global (mean, var, count) over every process of `group`; updates the running stats."""
    import torch.distributed as dist

    mean, var = kernels.stats(x, None, None, 0.0)
    local = torch.cat([mean, var, mean.new_full((1,), x.numel() // x.shape[1])])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)
    mean, var = kernels.combine(stats, running_mean, running_var, momentum)
    return mean, var, int(stats[:, -1].sum().item())


def _forward(
    kernels, input, residual, weight, bias, rowscale, running_mean, running_var, momentum, eps, relu, training, group
):
    """The output, and what the backward reads: (out, mean, var, count)."""
    if not training:
        mean, var, count = running_mean, running_var, 1
    elif group is not None:
        mean, var, count = _sync_stats(kernels, input, running_mean, running_var, momentum, group)
    else:
        mean, var = kernels.stats(input, running_mean, running_var, momentum)
        count = input.numel() // input.shape[1]
    if training and running_mean is not None:
        _increment_version((running_mean, running_var))  # the kernel updated them in place
    out = kernels.fwd(input, residual, rowscale, weight, bias, mean, var, eps, relu, training, count)
    return out, mean, var, count


class _BatchNormFunction(torch.autograd.Function):
    """The eager path: the backend's kernels called directly, forward and backward.

    The tensors that get grads are apply's arguments, everything else one tuple, `call` =
    (kernels, `_forward`'s arguments after the tensors): each argument of apply costs host time,
    forward and backward (a grad slot)."""

    @staticmethod
    def forward(ctx, input, residual, weight, bias, call):
        kernels, rest = call
        direct, registered = kernels
        rowscale = rest[0]
        plain_rowscale = rowscale is None or plain_tensors(rowscale)
        if plain(input, residual, weight, bias) and plain_rowscale:
            out, mean, var, count = _forward(direct, input, residual, weight, bias, *rest)
        else:
            with below_autograd():
                out, mean, var, count = _forward(registered, input, residual, weight, bias, *rest)
        _running_mean, _running_var, _momentum, eps, relu, training, group = rest[1:]
        ctx.meta = (
            eps,
            relu,
            training,
            count,
            kernels,
            group,
            bias.dtype if bias is not None else None,
            plain_rowscale,
        )
        ctx.save_for_backward(input, out, weight, mean, var, rowscale)  # as _setup_context
        return out

    @staticmethod
    def backward(ctx, grad_out):
        direct, registered = ctx.meta[4]
        needs = ctx.needs_input_grad[:4]
        if plain(grad_out) and ctx.meta[7]:
            return (*_backward_with(direct, ctx, needs, grad_out), None)
        with below_autograd():
            return (*_backward_with(registered, ctx, needs, grad_out), None)


def _run(
    kernels, input, residual, weight, bias, rowscale, running_mean, running_var, momentum, eps, relu, training, group
):
    """The fused op on checked arguments. running stats None in eval: no normalization."""
    input = as_channels(input)
    if residual is not None:
        residual = like_input(residual, input)
    if weight is not None and not weight.is_contiguous():  # the kernels read C contiguous elements
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if rowscale is not None and not rowscale.is_contiguous():
        rowscale = rowscale.contiguous()
    direct, registered = kernels
    if _is_compiling() and group is None:
        if training:
            mean, var = registered.stats(input.detach(), running_mean, running_var, momentum)
            count = input.numel() // input.shape[1]
        else:
            mean, var, count = running_mean, running_var, 1
        return registered.fwd(input, residual, rowscale, weight, bias, mean, var, eps, relu, training, count)
    needs_grad = _grad_enabled() and (
        (weight is not None and weight.requires_grad)  # first: true in training
        or input.requires_grad
        or (residual is not None and residual.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    rest = (rowscale, running_mean, running_var, momentum, eps, relu, training, group)
    if needs_grad:
        return _BatchNormFunction.apply(input, residual, weight, bias, (kernels, rest))
    if plain(input, residual, weight, bias) and (rowscale is None or plain_tensors(rowscale)):
        return _forward(direct, input, residual, weight, bias, *rest)[0]
    with below_autograd():
        return _forward(registered, input, residual, weight, bias, *rest)[0]


# The eager call as one crossing into a C++ autograd node (csrc/fastpath/batch_norm.cpp), where
# fusedres._fastpath loaded (built for this torch and CPython); else _run's Python Function.
_fastpath = getattr(FASTPATH, "batch_norm_add_relu", None)
_SELF_CHECKING = frozenset(("cpu", "cuda"))

has_fastpath, without_fastpath = fastpath_switch(globals())


def _call(backend, input, residual, weight, bias, running_mean, running_var, momentum, eps, relu, training, rowscale):
    """The fused op on checked arguments, on a kernel backend, without a process group."""
    if (
        _fastpath is not None
        and backend in _SELF_CHECKING
        and not _is_compiling()
        and plain_tensors(input, residual, weight, bias)
        and (rowscale is None or plain_tensors(rowscale))
    ):
        return _fastpath(
            input, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu, rowscale
        )
    kernels = _KERNELS[backend]
    rest = (rowscale, running_mean, running_var, momentum, eps, relu, training, None)
    return _run(kernels, input, residual, weight, bias, *rest)


# --- public API --------------------------------------------------------------------------------


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
    rowscale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    * rowscale[:, None, ...] + residual)`` in one pass over memory (two in training: statistics,
    then the fused rest).

    Fuses torchvision's Bottleneck / BasicBlock tail ``out = bn3(conv3(out)); out += identity;
    out = relu(out)``, and with rowscale timm's, whose drop path scales the branch per sample
    before the add (``x = drop_path(bn3(conv3(x))); x += shortcut; x = act3(x)``).

    Args:
        input: (N, C, *) activations, NCHW or channels_last; float32 / float64 / float16 /
            bfloat16. fp16/bf16 input with fp32 weight, bias and running stats (autocast's mix)
            is computed in fp32.
        residual: input's shape (added before the ReLU), or None (BN + ReLU).
        running_mean, running_var: (C,), updated in place in training as F.batch_norm does
            (unbiased variance into running_var); required in eval; None in training uses batch
            statistics only.
        weight, bias: (C,) or None.
        training: batch statistics (True) or the running ones (False).
        momentum: the running-stat update factor.
        eps: added to the variance, > 0.
        relu: False gives BN (+ add).
        rowscale: (N,) or None: a per-sample scale of the normalized branch, applied before the
            add (drop path / stochastic depth: the keep mask divided by the keep probability; see
            fusedres.nn.drop_path_rowscale). Any float dtype; no grad (it must not require one).
            The statistics are of the unscaled input, as eager's BatchNorm-then-drop-path.

    Shape:
        input, residual, output: (N, C, *); the output keeps the input's memory format.

    Returns:
        The output, in input's dtype.

    Example::

        >>> x, identity = torch.randn(8, 64, 14, 14), torch.randn(8, 64, 14, 14)
        >>> rm, rv = torch.zeros(64), torch.ones(64)
        >>> out = fusedres.batch_norm_add_relu(x, identity, rm, rv, training=True)
    """
    eps = check_batch_norm_args(input, residual, running_mean, running_var, weight, bias, training, eps, rowscale)
    backend = resolve_backend(input.device)
    if backend == "reference":
        return batch_norm_add_relu_reference(
            input,
            residual,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            relu=relu,
            rowscale=rowscale,
        )
    momentum = float(momentum)
    return _call(
        backend, input, residual, weight, bias, running_mean, running_var, momentum, eps, relu, training, rowscale
    )


def bias_add_relu(input: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None, *, relu: bool = True):
    """``relu(input + bias[c] + residual)`` in one pass: the tail of a conv whose BatchNorm was
    folded into its weight and bias (eval mode). Same layouts and dtypes as batch_norm_add_relu.

    Args:
        input: (N, C, *) conv output.
        bias: (C,).
        residual: input's shape, or None.
        relu: False gives the bias + add alone.
    """
    check_bias_add_relu_args(input, bias, residual)
    backend = resolve_backend(input.device)
    if backend == "reference":
        out = input + bias.reshape(1, -1, *([1] * (input.dim() - 2))).to(input.dtype)
        out = out + residual if residual is not None else out
        return torch.relu(out) if relu else out
    return _call(backend, input, residual, None, bias, None, None, 0.0, 1.0, relu, False, None)


def sync_batch_norm_add_relu(
    input,
    residual,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    momentum=0.1,
    eps=1e-5,
    *,
    relu=True,
    group=None,
    rowscale=None,
):
    """Training-mode batch_norm_add_relu with batch statistics over all processes of `group`
    (torch.distributed must be initialized), as nn.SyncBatchNorm: all-gather of (mean, var,
    count) before normalizing, all-reduce of the backward's sums before the input grad;
    dweight/dbias stay local (DDP reduces them). rowscale: as batch_norm_add_relu's."""
    eps = check_batch_norm_args(input, residual, running_mean, running_var, weight, bias, True, eps, rowscale)
    backend = resolve_backend(input.device)
    if backend == "reference":
        raise RuntimeError("sync_batch_norm_add_relu needs a kernel backend (cpu, cuda or triton), not 'reference'")
    if group is None:
        group = torch.distributed.group.WORLD
    return _run(
        _KERNELS[backend],
        input,
        residual,
        weight,
        bias,
        rowscale,
        running_mean,
        running_var,
        float(momentum),
        eps,
        relu,
        True,
        group,
    )
