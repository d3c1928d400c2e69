"""Conv -> BatchNorm with fixed statistics (-> + residual) (-> ReLU) as one library call.

Fuses torchvision's block tail ``relu(bn3(conv3(out)) + identity)``, its conv-BN-ReLU pairs and
the downsample branch's conv-BN, whenever BatchNorm normalizes with fixed statistics: a BN in eval
mode, a FrozenBatchNorm2d (detection backbones), or a BN in eval while the conv fine-tunes. BN is
folded into the conv, in fp32 (fp64 for fp64 weights):

    scale = gamma / sqrt(running_var + eps)
    w' = w * scale[o],   b' = beta + (conv_bias - running_mean) * scale

and one library call computes conv(x, w') + b' (+ residual) (then ReLU):

- CPU: oneDNN, through torch's own operators (torch.ops.mkldnn), the ones Inductor's freezing
  passes emit (torch/_inductor/fx_passes/mkldnn_fusion.py). The folded weight is reordered once
  per input shape into oneDNN's blocked layout (`_reorder_convolution_weight`, for channels_last
  input); `_convolution_pointwise` applies the ReLU as a post-op, `.binary` the add and the ReLU.
  Where the caller says the residual is dead (`consume_residual`: the downsample output made
  inside the block), `_convolution_pointwise_.binary` accumulates into the residual's own buffer
  (a sum post-op): no output allocated, one tensor less read.
- CUDA: cuDNN's fused conv + bias (+ add) + ReLU (`torch.cudnn_convolution_relu`,
  `torch.cudnn_convolution_add_relu`). Inference only: they have no derivative.
- anywhere else (float64, no oneDNN in this torch, autocast, padding modes): the conv with the
  folded weight, then fusedres's one-pass bias + add + ReLU kernel.

Packed weights are cached per conv-BN pair (on the BN module, never in its state_dict), keyed by
the identity, version and storage of the six tensors folded and by the input's shape, dtype,
device and layout: an optimizer step, a running-stat update, `load_state_dict` or `.to()` refolds.
At most MAX_PLANS input keys are kept per pair (first in, first out).

bf16 and fp16 on a CPU whose oneDNN has no kernels for them (torch reports it:
`torch.ops.mkldnn._is_mkldnn_bf16_supported()`; e.g. AVX2 without AVX-NE-CONVERT): eager PyTorch
then runs its slow reference convolution; here the conv runs in fp32 on the fp32 folded weight
and the result is rounded once to the input's dtype (at least as accurate as eager's).

With grad (BN frozen, the conv or BN's affine parameters training, or the input requiring grad):
`_FrozenConvBN`, whose forward is the same fused call on the folded weight and whose backward
takes the ReLU mask from the output (one pass with the BatchNorm backward kernel: the masked
grad and its per-channel sum), then one convolution backward on the folded weight, chained to
the conv's weight and bias and to BN's gamma and beta:

    g = grad * (out > 0);  db' = sum g;  dx, dw' = conv_backward(g, x, w')
    dw = dw' * scale;  dconv_bias = db' * scale;  dbeta = db'
    dgamma = invstd * (sum_{i,kh,kw} dw' * w + (conv_bias - running_mean) * db')

Where fusedres._fastpath loaded (built for this torch and CPython) the same formula runs as one
C++ autograd node (csrc/fastpath/conv_epilogue.cpp); the tests run both.

Under torch.compile, torch.export and torch.jit.trace the plain aten ops run instead (conv,
F.batch_norm, add, ReLU): the compiler folds and fuses them itself, and a trace stays portable.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fusedres._checks import stats_dtype
from fusedres._extension import FASTPATH
from fusedres.backends import resolve_backend
from fusedres.ops import batch_norm as _bn
from fusedres.ops._eager import below_autograd, fastpath_switch, plain, plain_tensors

_aten = torch.ops.aten
_CL = torch.channels_last
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_grad_enabled = torch.is_grad_enabled
_autocast = torch.is_autocast_enabled

MAX_PLANS = 4  # input keys (shape, dtype, layout) kept per conv-BN pair: full and last batches, two layouts
CACHE_ATTR = "_fusedres_folded"  # where the pair's plans live on the BN module (fusedres.unfuse drops it)


# --- the library calls this torch offers (probed once) -------------------------------------------


class _OneDNN(NamedTuple):
    unary: object  # conv + bias (+ ReLU)
    binary: object  # conv + bias + other (+ ReLU)
    binary_: object  # the same, written into `other`
    reorder: object  # the weight in oneDNN's blocked layout for one input shape


# The arguments each operator is called with here, in order: a torch whose schema differs (older,
# newer) takes the fallback rather than a call with misplaced arguments.
_ONEDNN_SCHEMAS = {
    "unary": ("_convolution_pointwise", "default", "X W B padding stride dilation groups attr scalars algorithm"),
    "binary": (
        "_convolution_pointwise",
        "binary",
        "X other W B padding stride dilation groups binary_attr alpha unary_attr unary_scalars unary_algorithm",
    ),
    "binary_": (
        "_convolution_pointwise_",
        "binary",
        "other X W B padding stride dilation groups binary_attr alpha unary_attr unary_scalars unary_algorithm",
    ),
    "reorder": ("_reorder_convolution_weight", "default", "self padding stride dilation groups input_size"),
}


def probe_onednn(namespace=None, available: bool | None = None) -> tuple[_OneDNN | None, str | None]:
    """(oneDNN's fused conv operators, None), or (None, why not). Arguments: for tests."""
    if available is None:
        available = torch.backends.mkldnn.is_available()
    if not available:
        return None, "torch is built without oneDNN (mkldnn)"
    namespace = torch.ops.mkldnn if namespace is None else namespace
    ops = {}
    for key, (name, overload, args) in _ONEDNN_SCHEMAS.items():
        try:
            op = getattr(getattr(namespace, name), overload)
        except (AttributeError, RuntimeError):
            return None, f"this torch has no torch.ops.mkldnn.{name}.{overload}"
        have = " ".join(a.name for a in op._schema.arguments)
        if have != args:
            return None, f"torch.ops.mkldnn.{name}.{overload} takes ({have}), not ({args})"
        ops[key] = op
    return _OneDNN(**ops), None


ONEDNN, ONEDNN_ERROR = probe_onednn()
_CUDNN_FUSED = hasattr(torch, "cudnn_convolution_relu") and hasattr(torch, "cudnn_convolution_add_relu")
_generation = 0  # bumped by without_library_calls(): cached plans of another setting are not reused


@contextlib.contextmanager
def without_library_calls():
    """Runs the enclosed calls as if this torch had neither oneDNN's nor cuDNN's fused operators:
    the conv with the folded weight, then fusedres's bias + add + ReLU (what the bench and the
    tests compare against; a process-wide switch, not thread-safe)."""
    global ONEDNN, _CUDNN_FUSED, _generation
    saved = ONEDNN, _CUDNN_FUSED
    ONEDNN, _CUDNN_FUSED = None, False
    _generation += 1
    try:
        yield
    finally:
        ONEDNN, _CUDNN_FUSED = saved
        _generation += 1


_NATIVE_LOW_PRECISION: dict[torch.dtype, bool] = {}


def _onednn_compute_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype oneDNN computes a conv of `dtype` input in here, or None (no oneDNN kernel)."""
    if dtype == torch.float32:
        return dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    native = _NATIVE_LOW_PRECISION.get(dtype)
    if native is None:
        query = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
        try:
            native = bool(getattr(torch.ops.mkldnn, query)())
        except (AttributeError, RuntimeError):
            native = False
        _NATIVE_LOW_PRECISION[dtype] = native
    return dtype if native else torch.float32


# --- folding -------------------------------------------------------------------------------------


def fold(conv_weight, conv_bias, bn_weight, bn_bias, mean, var, eps: float):
    """(w', b', scale, invstd) in fp32 (fp64 for an fp64 conv weight); differentiable."""
    acc = torch.promote_types(conv_weight.dtype, torch.float32)
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd * bn_weight.to(acc) if bn_weight is not None else invstd
    w = conv_weight.to(acc) * scale.reshape(-1, *([1] * (conv_weight.dim() - 1)))
    shift = -mean.to(acc) if conv_bias is None else conv_bias.to(acc) - mean.to(acc)
    b = shift * scale if bn_bias is None else torch.addcmul(bn_bias.to(acc), shift, scale)
    return w, b, scale, invstd


def _bn_state(conv, bn) -> tuple:
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _conv_args(conv) -> tuple | None:
    """(padding, stride, dilation, groups) as oneDNN and cuDNN take them, or None where the conv
    is not a plain zero-padded 2-D one (string padding, reflect/replicate/circular modes)."""
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str) or len(padding) != 2:
        return None
    return list(padding), list(conv.stride), list(conv.dilation), conv.groups


def _out_shape(x_shape, weight_shape, padding, stride, dilation) -> tuple:
    n, _, h, w = x_shape
    size = [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip((h, w), padding, dilation, weight_shape[2:], stride)
    ]
    return (n, weight_shape[0], *size)


# --- plans: what one input key runs ------------------------------------------------------------

_ONEDNN_PACKED, _ONEDNN_DENSE, _CUDNN, _FOLDED = range(4)


class _Plan(NamedTuple):
    kind: int
    weight: torch.Tensor  # oneDNN-packed, or dense (in the compute dtype)
    bias: torch.Tensor
    args: tuple | None  # padding, stride, dilation, groups
    compute: torch.dtype  # the dtype the conv runs in
    to_channels_last: bool  # x (and the residual) are fed channels_last, the output made NCHW again
    out_shape: tuple | None  # what a residual must be (None: fusedres's bias + add + ReLU checks it)


class _PlanCache:
    """One conv-BN pair's plans, for one state of its tensors. Never copied (a deep copy or a pickle
    of the model starts empty) and never in a state_dict."""

    __slots__ = ("state", "plans", "generation")

    def __init__(self, state=None):
        self.state = state
        self.plans: dict = {}
        self.generation = _generation

    def __deepcopy__(self, memo):
        return _PlanCache()

    def __reduce__(self):
        return (_PlanCache, ())


def _state_key(tensors, eps) -> tuple:
    # weakref, not id(): a freed tensor's id (and address) can come back for its replacement;
    # data_ptr: `.to(dtype)` and `p.data = ...` keep a Parameter's identity and version.
    return tuple(None if t is None else (weakref.ref(t), t._version, t.data_ptr()) for t in tensors) + (eps,)


def _state_matches(key, tensors, eps) -> bool:
    for entry, t in zip(key, tensors):
        if entry is None:
            if t is not None:
                return False
        elif t is None or entry[0]() is not t or entry[1] != t._version or entry[2] != t.data_ptr():
            return False
    return key[-1] == eps


def _plan(conv, bn, tensors, x: torch.Tensor) -> _Plan:
    cache = bn.__dict__.get(CACHE_ATTR)
    eps = bn.eps
    if (
        not isinstance(cache, _PlanCache)
        or cache.generation != _generation
        or cache.state is None
        or not _state_matches(cache.state, tensors, eps)
    ):
        cache = _PlanCache(_state_key(tensors, eps))
        bn.__dict__[CACHE_ATTR] = cache
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=_CL)
    key = (x.shape, x.dtype, x.device, channels_last)
    plan = cache.plans.get(key)
    if plan is None:
        with torch.no_grad():
            plan = _make_plan(conv, tensors, eps, x, channels_last)
        plans = cache.plans
        if len(plans) >= MAX_PLANS:
            plans.pop(next(iter(plans)), None)
        plans[key] = plan
    return plan


def _make_plan(conv, tensors, eps, x, channels_last) -> _Plan:
    w, b, _scale, _invstd = fold(*tensors, eps)
    args = _conv_args(conv) if x.dim() == 4 and conv.weight.dtype == x.dtype else None
    autocast = _autocast(x.device.type)
    if args is not None and not autocast:
        out_shape = _out_shape(x.shape, w.shape, args[0], args[1], args[2])
        if x.device.type == "cpu" and ONEDNN is not None:
            compute = _onednn_compute_dtype(x.dtype)
            if compute is not None:
                # Reduced precision goes through oneDNN channels_last only: its NCHW path ends in
                # an aten add_relu that has no bf16 kernel ("Unsupported datatype for add_relu").
                feed_cl = channels_last or compute != torch.float32
                w, b = w.to(compute), b.to(compute)
                if feed_cl:
                    packed = ONEDNN.reorder(w, *args, list(x.shape))
                    return _Plan(_ONEDNN_PACKED, packed, b, args, compute, not channels_last, out_shape)
                # NCHW: the packed weight would turn the output channels_last; oneDNN's NCHW path
                # reorders a dense weight itself and keeps the output NCHW.
                return _Plan(_ONEDNN_DENSE, w.contiguous(), b, args, compute, False, out_shape)
        if x.device.type == "cuda" and _CUDNN_FUSED and _cudnn_usable(x.dtype):
            fmt = _CL if channels_last else torch.contiguous_format
            w = w.to(x.dtype).contiguous(memory_format=fmt)
            return _Plan(_CUDNN, w, b.to(x.dtype), args, x.dtype, False, out_shape)
    # Anything else: today's path, the conv with the folded weight in the conv's dtype, then
    # fusedres's bias + add + ReLU.
    weight_dtype = conv.weight.dtype
    return _Plan(_FOLDED, w.to(weight_dtype), b.to(weight_dtype), args, weight_dtype, False, None)


def _cudnn_usable(dtype) -> bool:
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.backends.cudnn.is_acceptable(
        torch.empty(0, dtype=dtype, device="cuda")
    )


# --- running a plan ------------------------------------------------------------------------------


def _run(plan: _Plan, conv, x, residual, relu: bool, consume_residual: bool):
    kind = plan.kind
    if kind == _ONEDNN_PACKED or kind == _ONEDNN_DENSE:
        return _run_onednn(plan, x, residual, relu, consume_residual)
    if kind == _CUDNN:
        return _run_cudnn(plan, x, residual, relu)
    return _run_folded(conv, plan.weight, plan.bias, x, residual, relu)


_OUT_OF_PLACE_BINARY = [True]  # whether this torch's out-of-place oneDNN binary op works


def _run_onednn(plan: _Plan, x, residual, relu: bool, consume_residual: bool):
    dtype, compute, packed = x.dtype, plan.compute, plan.kind == _ONEDNN_PACKED
    # A packed weight was reordered for channels_last input; with a dense one oneDNN follows x.
    channels_last = packed or (not x.is_contiguous() and x.is_contiguous(memory_format=_CL))
    fmt = _CL if channels_last else torch.contiguous_format
    if dtype != compute:
        x = x.to(compute)
    if not x.is_contiguous(memory_format=fmt):
        x = x.contiguous(memory_format=fmt)
    args = plan.args
    if residual is None:
        out = ONEDNN.unary(x, plan.weight, plan.bias, *args, "relu" if relu else "none", [], "")
    else:
        other = residual
        if other.dtype != compute:
            other = other.to(compute)
        if not other.is_contiguous(memory_format=fmt):
            other = other.contiguous(memory_format=fmt)
        unary = ("relu", [], "") if relu else (None, [], None)
        if packed and (consume_residual or other is not residual):  # `other` is ours to overwrite
            out = ONEDNN.binary_(other, x, plan.weight, plan.bias, *args, "add", 1.0, *unary)
        elif not _OUT_OF_PLACE_BINARY[0]:
            out = ONEDNN.binary_(other.clone(memory_format=fmt), x, plan.weight, plan.bias, *args, "add", 1.0, *unary)
        else:
            try:
                out = ONEDNN.binary(x, other, plan.weight, plan.bias, *args, "add", 1.0, *unary)
            except RuntimeError:
                # torch 2.11's out-of-place binary op fails where its in-place form works ("could not
                # create a memory"): accumulate into a copy of the residual from then on.
                _OUT_OF_PLACE_BINARY[0] = False
                out = ONEDNN.binary_(
                    other.clone(memory_format=fmt), x, plan.weight, plan.bias, *args, "add", 1.0, *unary
                )
    if out.dtype != dtype:
        out = out.to(dtype)
    return out.contiguous() if plan.to_channels_last else out


def _run_cudnn(plan: _Plan, x, residual, relu: bool):
    padding, stride, dilation, groups = plan.args
    if relu and residual is not None:
        return torch.cudnn_convolution_add_relu(
            x, plan.weight, residual, 1.0, plan.bias, stride, padding, dilation, groups
        )
    if relu:
        return torch.cudnn_convolution_relu(x, plan.weight, plan.bias, stride, padding, dilation, groups)
    out = F.conv2d(x, plan.weight, plan.bias, stride, padding, dilation, groups)
    return out if residual is None else out.add_(residual)


def _run_folded(conv, weight, bias, x, residual, relu: bool):
    return _bn.bias_add_relu(conv._conv_forward(x, weight, None), bias, residual, relu=relu)


def _folded_eager(conv, tensors, eps, x, residual, relu: bool):
    """The folded conv, then bias + add + ReLU, without a cache; differentiable."""
    w, b, _scale, _invstd = fold(*tensors, eps)
    dtype = tensors[0].dtype
    return _run_folded(conv, w.to(dtype), b.to(dtype), x, residual, relu)


# --- with grad: BN frozen, the conv (or BN's affine) training ------------------------------------


def _dense_forward(x, w, b, residual, args, relu, compute, onednn: bool):
    """relu(conv(x, w) + b + residual) with w, b in `compute`: one oneDNN call on the CPU."""
    padding, stride, dilation, groups = args
    if onednn:
        plan = _Plan(_ONEDNN_DENSE, w, b, args, compute, False, None)
        return _run_onednn(plan, x, residual, relu, False)
    xc = x if x.dtype == compute else x.to(compute)
    out = _bn.bias_add_relu(F.conv2d(xc, w, None, stride, padding, dilation, groups), b, residual, relu=relu)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _mask_and_sum(grad, out, relu: bool):
    """(g, sum of g per channel in the stats dtype): grad zeroed where the ReLU was off. One pass of
    the BatchNorm backward kernel (its per-channel reduction and masked-grad output) where a C++
    or Triton backend serves the device."""
    acc = stats_dtype(out.dtype)
    if relu:
        backend = resolve_backend(out.device)
        if backend != "reference":
            direct, registered = _bn._KERNELS[backend]
            grad = (
                grad if grad.dtype == out.dtype and grad.stride() == out.stride() else torch.empty_like(out).copy_(grad)
            )
            # rowscale, mean, var None: xhat is the `input` argument itself, here `out` (already read).
            if plain(grad, out):
                sum_g, _unused, g = direct.bwd_reduce(grad, out, out, None, None, None, 1.0, True, True)
            else:
                with below_autograd():
                    sum_g, _unused, g = registered.bwd_reduce(grad, out, out, None, None, None, 1.0, True, True)
            return g, sum_g
        grad = _aten.threshold_backward(grad, out, 0)
    return grad, grad.sum((0, *range(2, grad.dim())), dtype=acc)


class _FrozenConvBN(torch.autograd.Function):
    """relu(conv(x, w') + b' + residual) with BN folded from fixed statistics; grads for x, the
    residual, the conv's weight and bias and BN's weight and bias (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, residual, conv_weight, conv_bias, bn_weight, bn_bias, call):
        mean, var, eps, args, relu = call
        w, b, scale, invstd = fold(conv_weight, conv_bias, bn_weight, bn_bias, mean, var, eps)
        onednn_compute = _onednn_compute_dtype(x.dtype) if x.device.type == "cpu" and ONEDNN is not None else None
        compute = onednn_compute or x.dtype
        w, b = w.to(compute), b.to(compute)
        out = _dense_forward(x, w, b, residual, args, relu, compute, onednn_compute is not None)
        ctx.save_for_backward(x, out, w, conv_weight, conv_bias, scale, invstd, mean)
        ctx.meta = (
            args,
            relu,
            compute,
            bn_weight.dtype if bn_weight is not None else None,
            bn_bias.dtype if bn_bias is not None else None,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, w, conv_weight, conv_bias, scale, invstd, mean = ctx.saved_tensors
        (padding, stride, dilation, groups), relu, compute, gamma_dtype, beta_dtype = ctx.meta
        needs_x, needs_residual, needs_cw, needs_cb, needs_gamma, needs_beta = ctx.needs_input_grad[:6]
        g, db = _mask_and_sum(grad, out, relu)
        needs_dw = needs_cw or needs_gamma
        dx = dw = None
        if needs_x or needs_dw:
            gc, xc = g.to(compute), x.to(compute)
            dx, dw, _ = _aten.convolution_backward(
                gc, xc, w, None, stride, padding, dilation, False, [0, 0], groups, [needs_x, needs_dw, False]
            )
            if needs_x and dx.dtype != x.dtype:
                dx = dx.to(x.dtype)
        acc = scale.dtype
        d_cw = d_cb = d_gamma = d_beta = None
        if needs_dw:
            dw = dw.to(acc)
            if needs_cw:
                d_cw = (dw * scale.reshape(-1, 1, 1, 1)).to(conv_weight.dtype)
            if needs_gamma:
                shift = -mean.to(acc) if conv_bias is None else conv_bias.to(acc) - mean.to(acc)
                d_gamma = (invstd * ((dw * conv_weight.to(acc)).sum((1, 2, 3)) + shift * db)).to(gamma_dtype)
        if needs_cb:
            d_cb = (db * scale).to(conv_bias.dtype)
        if needs_beta:
            d_beta = db.to(beta_dtype)
        return dx if needs_x else None, g if needs_residual else None, d_cw, d_cb, d_gamma, d_beta, None


def _requires_grad(t) -> bool:
    return t is not None and t.requires_grad


# _FrozenConvBN's formula as one crossing into a C++ autograd node (csrc/fastpath/conv_epilogue.cpp),
# where fusedres._fastpath loaded (built for this torch and CPython).
_fastpath = getattr(FASTPATH, "frozen_conv_bn", None)
_SELF_CHECKING = frozenset(("cpu", "cuda"))

has_fastpath, without_fastpath = fastpath_switch(globals())


def _frozen_with_grad(conv, bn, tensors, backend, x, residual, relu):
    cw, cb, bw, bb, mean, var = tensors
    args = _conv_args(conv) if x.dim() == 4 else None
    if args is None or _autocast(x.device.type) or cw.dtype != x.dtype or not _residual_fits(residual, x):
        return _folded_eager(conv, tensors, bn.eps, x, residual, relu)
    onednn_compute = _onednn_compute_dtype(x.dtype) if x.device.type == "cpu" and ONEDNN is not None else None
    if (
        _fastpath is not None
        and backend in _SELF_CHECKING
        and plain_tensors(x, residual, cw, cb)
        and plain_tensors(bw, bb, mean, var)
    ):
        fp32 = onednn_compute == torch.float32 and x.dtype != torch.float32
        return _fastpath(x, residual, cw, cb, bw, bb, mean, var, bn.eps, *args, relu, onednn_compute is not None, fp32)
    return _FrozenConvBN.apply(x, residual, cw, cb, bw, bb, (mean, var, bn.eps, args, relu))


# --- public --------------------------------------------------------------------------------------


def conv_frozen_bn(conv, bn, x, residual=None, *, relu: bool = True, consume_residual: bool = False):
    """``relu(bn(conv(x)) + residual)`` where `bn` normalizes with its running statistics: a BN
    module in eval mode or a FrozenBatchNorm2d (anything with weight, bias, running_mean,
    running_var and eps), as one fused library call (see the module docstring).

    Args:
        conv: an nn.Conv2d.
        bn: its BatchNorm, with running statistics.
        x: the conv's input, (N, C, H, W), NCHW or channels_last.
        residual: the conv output's shape, or None.
        relu: False leaves the ReLU out (the downsample branch's conv-BN).
        consume_residual: the caller holds the only reference to `residual` and gives it up: the
            result may be written into its memory (never pass a tensor that a caller, a hook or a
            feature extractor can still see).

    Returns:
        The output, in x's dtype and memory format.
    """
    if _tracing_state() is not None or _is_compiling():
        out = F.batch_norm(conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        out = out if residual is None else out + residual
        return torch.relu(out) if relu else out
    tensors = _bn_state(conv, bn)
    backend = resolve_backend(x.device)
    if backend == "reference":  # fusedres's kernels are off: eager all the way
        return _folded_eager(conv, tensors, bn.eps, x, residual, relu)
    cw, cb, bw, bb = tensors[:4]
    if _grad_enabled() and (
        cw.requires_grad
        or x.requires_grad
        or _requires_grad(residual)
        or _requires_grad(cb)
        or _requires_grad(bw)
        or _requires_grad(bb)
    ):
        return _frozen_with_grad(conv, bn, tensors, backend, x, residual, relu)
    plan = _plan(conv, bn, tensors, x)
    if (
        residual is not None
        and plan.out_shape is not None
        and (residual.shape != plan.out_shape or not _residual_fits(residual, x))
    ):
        return _folded_eager(conv, tensors, bn.eps, x, residual, relu)  # eager's broadcasting and errors
    return _run(plan, conv, x, residual, relu, consume_residual)


def _residual_fits(residual, x) -> bool:
    return residual is None or (residual.dtype == x.dtype and residual.device == x.device)


def has_onednn() -> bool:
    """Whether CPU inference takes oneDNN's fused conv operators (else the folded conv, then
    fusedres's bias + add + ReLU kernel); ONEDNN_ERROR says why not."""
    return ONEDNN is not None
