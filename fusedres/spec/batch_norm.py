"""BatchNorm (+ residual) (+ ReLU)'s operators, the ResNet block tail relu(bn(x) + identity).

Every activation argument (input, residual, out, grad*) is an (N, C, *) tensor, dense in NCHW
(contiguous) or channels_last order; outputs keep the input's strides. Per-channel vectors have C
contiguous elements. Statistics are in fp32 (fp64 for fp64 input); mean/var arguments may have
any float dtype (running stats). The layout checks of this family are its own (csrc/batch_norm.cpp,
fusedres/_checks.py), so its arguments' kinds are `Opaque` here: the spec gives the schema, the C++
argument structs and entry points, and the fake kernels' outputs.
"""

from __future__ import annotations

from . import Arg, Family, Op, Opaque, Out

_T = Opaque("Tensor")
_F = Opaque("float")
_B = Opaque("bool")
_I = Opaque("int")

# The statistics dtype of input's family: (C,) vectors.
_CHANNEL_STATS = ("channels:input", "stats")

STATS = Op(
    "batch_norm_stats",
    args=(
        Arg("input", _T),
        Arg("running_mean", _T, optional=True, mutable="a"),
        Arg("running_var", _T, optional=True, mutable="b"),
        Arg("momentum", _F),
    ),
    outputs=(Out("mean", *_CHANNEL_STATS), Out("var", *_CHANNEL_STATS)),
    doc="Per-channel batch mean and biased variance over N and the spatial dims. Running stats, when "
    "given, are updated in place as F.batch_norm does: running = (1 - momentum) * running + momentum * "
    "batch, with the unbiased variance.",
)

COMBINE_STATS = Op(
    "batch_norm_combine_stats",
    args=(
        Arg("stats", _T, doc="(W, 2C + 1): each process's mean (C), biased var (C) and count"),
        Arg("running_mean", _T, optional=True, mutable="a"),
        Arg("running_var", _T, optional=True, mutable="b"),
        Arg("momentum", _F),
    ),
    outputs=(Out("mean", "combined:stats", "of:stats"), Out("var", "combined:stats", "of:stats")),
    doc="Synchronized BatchNorm: the global (mean, biased var), combined in fp64 in row order; updates "
    "the running stats with the total count as batch_norm_stats does.",
)

FWD = Op(
    "batch_norm_add_relu_fwd",
    args=(
        Arg("input", _T),
        Arg("residual", _T, optional=True, doc="input's dtype and strides"),
        Arg("weight", _T, optional=True),
        Arg("bias", _T, optional=True),
        Arg("mean", _T, optional=True, doc="given with var, or neither (xhat = input: a folded conv's tail)"),
        Arg("var", _T, optional=True),
        Arg("eps", _F),
        Arg("relu", _B),
        Arg("training", _B, doc="mean/var are this batch's (grads flow through them) or constants"),
        Arg("count", _I, doc="values per channel in the batch"),
    ),
    outputs=(Out("output", "strided:input", "of:input"),),
    doc="out = relu(xhat * weight + bias + residual), xhat = (input - mean) * rsqrt(var + eps), one pass.",
)

BWD_REDUCE = Op(
    "batch_norm_add_relu_bwd_reduce",
    args=(
        Arg("grad_out", _T),
        Arg("out", _T),
        Arg("input", _T),
        Arg("mean", _T, optional=True),
        Arg("var", _T, optional=True),
        Arg("eps", _F),
        Arg("relu", _B),
        Arg("write_grad_residual", _B),
    ),
    outputs=(
        Out("sum_dy", *_CHANNEL_STATS),
        Out("sum_dy_xhat", *_CHANNEL_STATS),
        Out("grad_residual", "strided:input", "of:grad_out", when="write_grad_residual"),
    ),
    doc="Backward, first pass: g = grad_out zeroed where out <= 0 (relu); per-channel sums of g and "
    "g * xhat; g itself as the residual's grad when asked.",
)

BWD_INPUT = Op(
    "batch_norm_add_relu_bwd_input",
    args=(
        Arg("grad", _T, doc="grad_out (masked by out when out is given and relu), or the masked g"),
        Arg("out", _T, optional=True),
        Arg("input", _T),
        Arg("mean", _T, optional=True),
        Arg("var", _T, optional=True),
        Arg("eps", _F),
        Arg("weight", _T, optional=True),
        Arg("sum_dy", _T, optional=True),
        Arg("sum_dy_xhat", _T, optional=True),
        Arg("count", _I),
        Arg("training", _B),
        Arg("relu", _B),
    ),
    outputs=(Out("grad_input", "strided:input", "of:input"),),
    doc="Backward, second pass: training: weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / "
    "count); eval: weight * invstd * g.",
)

FAMILY = Family("batch_norm", (STATS, COMBINE_STATS, FWD, BWD_REDUCE, BWD_INPUT))
