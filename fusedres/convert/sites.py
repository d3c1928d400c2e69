"""What a fused forward calls: one fused Add & Norm per site, and the carry of a block's last add
into the next block's first norm.

A site (forward_ast.py) is `norm(ops(x) + residual)`, ops being the branch's dropout / drop path /
LayerScale / scalar multiplier. Per instance, fuse() decides which ops fold into the fused call
(features.py: those add_norm takes, outermost first, one of each kind) and which torch applies in
front of it, and whether the norm is one the fused ops compute at all (probe.py); anything else
runs exactly the original expression.

Carry (vLLM's and flash-attn's residual threading, without changing what a block returns): a
block's last add, `h = residual + ops(x)`, is fused with the first norm of the block after it:
the producer computes (y, h) in one pass, returns h as before and leaves y on the link; the
consumer norm, called with that same h (same tensor, or a contiguous view of it, unmodified),
returns y instead of normalizing again. Every block still returns its full hidden state, so
output_hidden_states, hooks and caches see what they saw. Where the consumer is not called with h
(another code path, a hook that replaced the output, an fp16 clamp) the link notices and turns
itself off, and the blocks run as before. No carry under torch.compile (the compiler fuses the add
into the norm itself), under saved-tensor hooks (activation checkpointing, which re-runs the
producer), under inference_mode (its tensors have no version counter, so an in-place edit of h by
a hook could not be seen), or when the consumer's weight is not a plain tensor (a sharded
parameter); nor when the consumer runs in another grad mode than the producer did.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fusedres.convert import features, probe
from fusedres.convert.norms import norm_after_add

logger = logging.getLogger("fusedres")

_is_compiling = torch.compiler.is_compiling
_inference_mode = torch.is_inference_mode_enabled
_grad_enabled = torch.is_grad_enabled
_saved_tensor_hooks = torch._C._autograd._top_saved_tensors_default_hooks
SITES, EXITS, LINK = "_fusedres_sites", "_fusedres_exits", "_fusedres_link"

_FEATURE_OF = {
    probe.DROPOUT: features.DROPOUT,
    "dropout_fn": features.DROPOUT,
    probe.ROWSCALE: features.ROWSCALE,
    probe.COLSCALE: features.COLSCALE,
    "scale": features.COLSCALE,
}


class BranchOp:
    """One op on a branch, as this instance has it: kind (probe's, or "dropout_fn" / "scale"),
    the attribute it lives under, its LayerScale parameter, where its dynamic arguments start."""

    __slots__ = ("kind", "attr", "param", "dyn")

    def __init__(self, kind, attr, param, dyn):
        self.kind, self.attr, self.param, self.dyn = kind, attr, param, dyn

    def apply(self, module, x, dyn):
        """As the original forward wrote it."""
        kind = self.kind
        if kind == "dropout_fn":
            return F.dropout(x, p=dyn[self.dyn], training=dyn[self.dyn + 1])
        if kind == "scale":
            return x * getattr(module, self.attr)
        if kind == probe.IDENTITY:
            return x
        return getattr(module, self.attr)(x)

    def fold(self, module, x, dyn, kwargs, cache):
        """The add_norm keyword this op becomes (added to kwargs), with the same values."""
        kind = self.kind
        if kind == probe.DROPOUT:
            m = getattr(module, self.attr)
            p = m.p if m.training else 0.0
            if p:
                kwargs["dropout_p"] = p
        elif kind == "dropout_fn":
            p = dyn[self.dyn] if dyn[self.dyn + 1] else 0.0
            if p:
                kwargs["dropout_p"] = p
        elif kind == probe.ROWSCALE:
            # The module's own draw (same RNG calls as on x): the per-sample factor, over the rows.
            ones = x.new_ones((x.shape[0],) + (1,) * (x.dim() - 1))
            scale = getattr(module, self.attr)(ones)
            if scale is not ones:
                kwargs["rowscale"] = scale.reshape(scale.shape[:-1]).expand(x.shape[:-1]).contiguous()
        elif kind == probe.COLSCALE:
            kwargs["colscale"] = getattr(getattr(module, self.attr), self.param)
        elif kind == "scale":
            value = getattr(module, self.attr)
            # Eager multiplies by the Python number in x's compute type (fp32 for 16-bit x): a
            # 16-bit colscale would round the multiplier first.
            dtype = torch.promote_types(x.dtype, torch.float32)
            key = (value, x.shape[-1], dtype, x.device)
            if cache.get("key") != key:
                cache["key"], cache["colscale"] = (
                    key,
                    torch.full((x.shape[-1],), float(value), dtype=dtype, device=x.device),
                )
            kwargs["colscale"] = cache["colscale"]


def branch_ops(module: nn.Module, wrappers) -> tuple[tuple[BranchOp, ...], tuple[BranchOp, ...]]:
    """(applied by torch, innermost first; folded into the fused call), for this instance."""
    ops, dyn = [], 0
    for w in wrappers:  # outermost first
        if w.kind == "dropout":
            ops.append(BranchOp("dropout_fn", None, None, dyn))
            dyn += 2
        elif w.kind == "scale":
            ops.append(BranchOp("scale", w.attr, None, None))
        else:
            kind, param = probe.probe_wrapper(getattr(module, w.attr))
            ops.append(BranchOp(kind, w.attr, param, None))
    folded, used = [], set()
    for op in ops:
        if op.kind == probe.IDENTITY:
            continue
        feature = _FEATURE_OF.get(op.kind)
        if feature is None or feature in used or not features.supported(feature):
            break
        used.add(feature)
        folded.append(op)
    applied = [op for op in ops if op not in folded and op.kind != probe.IDENTITY]
    return tuple(reversed(applied)), tuple(folded)


class _Fused:
    """What sites and exits share: the branch ops, and the fused call for a norm."""

    __slots__ = ("applied", "folded", "needs", "cache")

    def __init__(self, applied, folded):
        self.applied, self.folded, self.cache = applied, folded, {}
        self.needs = frozenset(_FEATURE_OF[op.kind] for op in folded)

    def ops_on(self, x, offset: float):
        """(ops torch applies, innermost first; ops folded) on the backend x's device runs, which
        may lack some features (features.available); None when the norm needs weight_offset there."""
        have = features.available(x.device)
        if offset and features.WEIGHT_OFFSET not in have:
            return None
        if self.needs <= have:
            return self.applied, self.folded
        n = next(i for i, op in enumerate(self.folded) if _FEATURE_OF[op.kind] not in have)
        return self.applied + tuple(reversed(self.folded[n:])), self.folded[:n]

    def apply_all(self, module, x, dyn):
        for op in self.applied:
            x = op.apply(module, x, dyn)
        for op in reversed(self.folded):
            x = op.apply(module, x, dyn)
        return x

    def fused(self, module, norm, spec, x, residual, dyn, prenorm, folded, wide_y=False):
        if x.dtype != residual.dtype and x.device.type == "cpu":
            # A bf16 branch meeting an fp32 residual stream (autocast): the CPU kernels read and
            # write 16-bit floats far slower than they compute in fp32 (8x197x384, prenorm
            # LayerNorm: 1189 us with x bf16, 600 us with the residual bf16, 342 us in fp32), so
            # the narrow operand is widened first (the whole site: 430 us, eager 492 us) and y
            # comes out wide, the dtype eager's norm gives it.
            wide = torch.promote_types(x.dtype, residual.dtype)
            x, residual, wide_y = x.to(wide), residual.to(wide), True
        kwargs = {}
        for op in folded:
            op.fold(module, x, dyn, kwargs, self.cache)
        bias = getattr(norm, spec.bias) if spec.bias else None
        weight = getattr(norm, spec.weight) if spec.weight else None
        return norm_after_add(
            x, residual, weight, bias, spec.eps, rms_norm=spec.rms, prenorm=prenorm, wide_y=wide_y,
            weight_offset=spec.offset, **kwargs,
        )  # fmt: skip


class Site(_Fused):
    """One add -> norm site of one instance; `spec` None runs the original expression."""

    __slots__ = ("norm", "spec", "prenorm")

    def __init__(self, norm, spec, prenorm, applied, folded):
        super().__init__(applied, folded)
        self.norm, self.spec, self.prenorm = norm, spec, prenorm

    def __call__(self, module, x, residual, dyn):
        norm = module._modules[self.norm]
        spec = self.spec
        ops = None if spec is None or x.shape != residual.shape else self.ops_on(x, spec.offset)
        if ops is None:
            h = self.apply_all(module, x, dyn) + residual
            return (norm(h), h) if self.prenorm else norm(h)
        applied, folded = ops
        for op in applied:
            x = op.apply(module, x, dyn)
        return self.fused(module, norm, spec, x, residual, dyn, self.prenorm, folded)


class Link:
    """A producer's last add, carried into `norm` (the next block's first, or the stack's final
    norm: `wide_y`, its output is the model's). `stash` holds (h, h's version, y, the grad
    mode) from the producer until the norm takes it."""

    __slots__ = ("norm", "spec", "wide_y", "alive", "stash", "name")

    def __init__(self, norm, spec, wide_y, name):
        self.norm, self.spec, self.wide_y, self.name = norm, spec, wide_y, name
        self.alive, self.stash = True, None

    def disable(self, why: str) -> None:
        self.alive, self.stash = False, None
        logger.info("fusedres: the add carried into %s runs unfused from now on: %s", self.name, why)

    def __deepcopy__(self, memo):  # a copied model gets its own link, fresh (no stash)
        import copy

        return Link(copy.deepcopy(self.norm, memo), self.spec, self.wide_y, self.name)


class Exit(_Fused):
    """A block's last add (its result is what the block returns)."""

    __slots__ = ("link",)

    def __init__(self, applied, folded):
        super().__init__(applied, folded)
        self.link = None

    def __call__(self, module, x, residual, dyn):
        link = self.link
        if (
            link is None
            or not link.alive
            or _is_compiling()
            or _saved_tensor_hooks(False) is not None
            or _inference_mode()  # inference tensors keep no version: an in-place edit would go unseen
        ):
            return self.apply_all(module, x, dyn) + residual
        if link.stash is not None:
            link.disable("the previous output of the block before it never reached it")
            return self.apply_all(module, x, dyn) + residual
        norm, spec = link.norm, link.spec
        weight = getattr(norm, spec.weight) if spec.weight else None
        ops = None
        if x.shape == residual.shape and (weight is None or type(weight) in _PLAIN):
            ops = self.ops_on(x, spec.offset)
        if ops is None:
            return self.apply_all(module, x, dyn) + residual
        applied, folded = ops
        for op in applied:
            x = op.apply(module, x, dyn)
        y, h = self.fused(module, norm, spec, x, residual, dyn, True, folded, link.wide_y)
        link.stash = (h, h._version, y, _grad_enabled())
        return h


_PLAIN = (torch.Tensor, nn.Parameter)


def take(link: Link, t) -> torch.Tensor | None:
    """The carried y, if `t` is the carried h (or a contiguous view of all of it), unmodified, and
    the norm runs in the grad mode y was made in (a re-entrant checkpoint makes y without grad)."""
    h, version, y, grad_enabled = link.stash
    link.stash = None
    if grad_enabled != _grad_enabled():
        return None
    if t is not h:
        if not (
            isinstance(t, torch.Tensor)
            and t.data_ptr() == h.data_ptr()
            and t.dtype == h.dtype
            and t.numel() == h.numel()
            and t.shape[-1] == h.shape[-1]
            and t.is_contiguous()
            and h.is_contiguous()
        ):
            return None
        y = y.view(t.shape)
    if t._version != version:
        return None
    return y


def carried_norm_forward(self, *args, **kwargs):
    """The forward of a norm that a link carries into: the stashed y when called on the stashed h."""
    link = self.__dict__.get(LINK)
    if link is not None and link.stash is not None:
        y = take(link, args[0]) if len(args) == 1 and not kwargs and not _is_compiling() else None
        if y is not None:
            return y
        link.disable("it was called on something else than the output of the block before it")
    return type(self)._fusedres_original.forward(self, *args, **kwargs)


# --- the helpers a fused forward calls (forward_ast's names) -------------------------------------


def run_site(module, k, x, residual, *dyn):
    return module.__dict__[SITES][k](module, x, residual, dyn)


def run_exit(module, e, x, residual, *dyn):
    return module.__dict__[EXITS][e](module, x, residual, dyn)


def run_view(norm, y, t):
    """The norm of t, a view of a site's h: y viewed alike when t keeps the normalized dim."""
    if t.shape[-1] == y.shape[-1] and t.numel() == y.numel():
        return y.reshape(t.shape)
    return norm(t)


HELPERS = {"_fusedres_site": run_site, "_fusedres_exit": run_exit, "_fusedres_view": run_view}
