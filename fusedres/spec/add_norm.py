"""Add & Norm's operators: h = residual + dropout(x) * rowscale * colscale, y = norm(h) * (weight +
weight_offset) + bias over the last dimension (LayerNorm or RMSNorm), and its backward.

The public functions (fusedres/ops/add_norm.py) turn their keywords into these arguments with
`plan` (fusedres/ops/add_norm.py); the eager spec is fusedres/reference/add_norm.py.
"""

from __future__ import annotations

from . import Arg, Elements, Family, Flag, FloatDtype, Op, Out, Real, Rows, Rule, SeedOffset

_EPS = Real(low=0.0, low_open=True, what="a positive finite number")
_P = Real(low=0.0, high=1.0, high_open=True, what="in [0, 1)")
_FINITE = Real(what="a finite number")

# The residual features, in the same order in both directions.
_FEATURES = (
    Arg("dropout_p", _P, default=0.0, doc="probability of zeroing an element of x (kept ones: scaled by 1/(1-p))"),
    Arg(
        "seed_offset", SeedOffset(), optional=True, default=None, doc="the dropout RNG state; needed when dropout_p > 0"
    ),
    Arg("rowscale", Elements("M"), optional=True, default=None, doc="per-row scale of x's branch (drop path)"),
    Arg("colscale", Elements("N"), optional=True, default=None, doc="per-column scale of x's branch (LayerScale)"),
    Arg("weight_offset", _FINITE, default=0.0, doc="added to weight in fp32 (Gemma's (1 + w))"),
)
_FEATURE_RULES = (
    Rule(
        py="dropout_p == 0.0 or seed_offset is not None",
        cpp="a.dropout_p == 0.0 || a.seed_offset.has_value()",
        message="dropout_p > 0 needs seed_offset",
    ),
    Rule(
        py="weight_offset == 0.0 or weight is not None",
        cpp="a.weight_offset == 0.0 || a.weight.has_value()",
        message="weight_offset needs a weight (it is added to it)",
    ),
)
_SAME_PARAM_DTYPE = Rule(
    py="weight is None or bias is None or weight.dtype == bias.dtype",
    cpp="!a.weight || !a.bias || a.weight->scalar_type() == a.bias->scalar_type()",
    message="bias must have weight's dtype",
    error="TypeError",
)

FWD = Op(
    "add_norm_fwd",
    args=(
        Arg("x", Rows(), doc="(..., N): the branch added to the residual stream; M = numel / N rows"),
        Arg("residual", Rows(like="x"), optional=True, doc="the residual stream"),
        Arg("weight", Elements("N"), optional=True),
        Arg("bias", Elements("N"), optional=True),
        Arg("eps", _EPS),
        Arg("rms_norm", Flag()),
        Arg("h_dtype", FloatDtype(), doc="h is formed in fp32 (fp64 for fp64 x) and rounded to this dtype"),
        Arg("store_h", Flag(), doc="write h (else an empty (0,) tensor)"),
        *_FEATURES,
        Arg("store_mask", Flag(), default=False, doc="write the dropout keep-mask"),
    ),
    outputs=(
        Out("y", "like:x", "of:x"),
        Out("h", "like:x", "arg:h_dtype", when="store_h"),
        Out("mean", "rows", "stats", when="not rms_norm"),
        Out("rstd", "rows", "stats"),
        Out("mask", "like:x", "bool", when="store_mask"),
    ),
    rules=(_SAME_PARAM_DTYPE, *_FEATURE_RULES),
    doc="Add & Norm forward. Outputs: y (x's dtype), h, mean ((0,) for RMSNorm) and rstd (M,) in "
    "the statistics dtype (fp64 for fp64 x, else fp32), the keep-mask (bool, True = kept).",
)

BWD = Op(
    "add_norm_bwd",
    args=(
        Arg("dy", Rows(), doc="the grad of y (x's dtype)"),
        Arg("dh", Rows(like="dy"), optional=True, doc="the grad of h (prenorm), added to the grad through y"),
        Arg("h", Rows(like="dy"), optional=True, doc="the stored h; None: recomputed from x (+ residual)"),
        Arg("x", Rows(like="dy"), optional=True, doc="the forward's x: needed to recompute h and for dcolscale"),
        Arg("residual", Rows(like="dy"), optional=True, doc="the forward's residual, to recompute h"),
        Arg("h_dtype", FloatDtype()),
        Arg("weight", Elements("N"), optional=True),
        Arg("bias", Elements("N"), optional=True, doc="given when dbias is wanted"),
        Arg("mean", Elements("M", stats=True), optional=True, doc="the forward's mean (None for RMSNorm)"),
        Arg("rstd", Elements("M", stats=True)),
        Arg("rms_norm", Flag()),
        Arg("dresidual_dtype", FloatDtype(), optional=True, doc="write dresidual in this dtype; None: it is dx"),
        *_FEATURES,
        Arg("colscale_grad", Flag(), default=False, doc="compute dcolscale (needs x and colscale)"),
    ),
    outputs=(
        Out("dx", "like:dy", "of:dy"),
        Out("dresidual", "like:dy", "arg:dresidual_dtype", when="dresidual_dtype"),
        Out("dweight", "elements:weight", "of:weight"),
        Out("dbias", "elements:bias", "of:bias"),
        Out("dcolscale", "elements:colscale", "of:colscale", when="colscale_grad"),
    ),
    rules=(
        _SAME_PARAM_DTYPE,
        *_FEATURE_RULES,
        Rule(py="h is not None or x is not None", cpp="a.h || a.x", message="add_norm_bwd needs h or x"),
        Rule(
            py="rms_norm or mean is not None",
            cpp="a.rms_norm || a.mean.has_value()",
            message="LayerNorm's backward needs mean",
        ),
        Rule(
            py="not colscale_grad or (x is not None and colscale is not None)",
            cpp="!a.colscale_grad || (a.x && a.colscale)",
            message="colscale_grad needs x and colscale",
        ),
    ),
    doc="Add & Norm backward: dx (dy's dtype), dresidual, dweight, dbias, dcolscale. The reduction "
    "over rows is deterministic (fixed-size partials, summed in a fixed order).",
)

INPLACE = Op(
    "add_norm_inplace",
    args=(
        Arg("x", Rows(), mutable="a", doc="(..., N), contiguous: overwritten with y"),
        Arg("residual", Rows(like="x"), mutable="b", doc="contiguous: overwritten with h"),
        Arg("weight", Elements("N"), optional=True),
        Arg("bias", Elements("N"), optional=True),
        Arg("eps", _EPS),
        Arg("rms_norm", Flag()),
        Arg("colscale", Elements("N"), optional=True, default=None, doc="per-column scale of x (LayerScale)"),
        Arg("weight_offset", _FINITE, default=0.0, doc="added to weight in fp32 (Gemma's (1 + w))"),
    ),
    outputs=(),
    rules=(
        _SAME_PARAM_DTYPE,
        _FEATURE_RULES[1],
        Rule(
            py="x.is_contiguous() and residual.is_contiguous() and _disjoint(x, residual)",
            cpp="a.x.is_contiguous() && a.residual.is_contiguous() && disjoint(a.x, a.residual)",
            message="add_norm_inplace writes x and residual: they must be contiguous and must not overlap",
        ),
    ),
    doc="Add & Norm in place, for inference (vLLM's fused_add_rms_norm): h = residual + x * colscale is "
    "written into residual, y = norm(h) * (weight + weight_offset) + bias into x (h keeps residual's "
    "dtype); no statistics are kept.",
)

FAMILY = Family("add_norm", (FWD, BWD, INPLACE))

# The residual features' argument names, in the operators' order.
FEATURES = tuple(a.name for a in _FEATURES)
