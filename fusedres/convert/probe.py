"""What a norm (or a residual-branch op) computes, found by running it, not by its class name.

A norm module is run once on a small random input, with random values in place of its
parameters (torch.func.functional_call: the module is not changed), and compared with each
formula the fused ops compute:

    LayerNorm  (x - mean) / sqrt(var + eps) * (w + offset) (+ b)
    RMSNorm    x / sqrt(mean(x^2) + eps) * (w + offset)

offset 0 is `w * x_hat` (Llama, T5's scale-only norm, nn.LayerNorm), offset 1 is Gemma's
`(1 + w) * x_hat`. eps is read from the module (eps, variance_epsilon or epsilon) and then
checked by a second run on an input small enough that eps changes the output.

The ops on a residual branch are classified the same way: an nn.Dropout; a LayerScale (one
vector parameter g, forward(x) = x * g); a per-sample scale, i.e. drop path / stochastic depth
(no parameters, the input itself in eval, one random factor per sample in training); an
identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


@dataclass(frozen=True)
class NormSpec:
    rms: bool
    weight: str | None  # the module's parameter names
    bias: str | None
    eps: float
    offset: float  # weight_offset: 1.0 for (1 + w)
    size: int

    def describe(self) -> str:
        kind = "RMSNorm" if self.rms else "LayerNorm"
        scale = "" if self.weight is None else ("(1+w)*" if self.offset else "w*")
        shift = "+b" if self.bias else ""
        return f"{kind} {scale}xhat{shift}, eps={self.eps:g}"


def _vector_params(module: nn.Module):
    params = dict(module.named_parameters(recurse=False))
    if any(p.dim() != 1 for p in params.values()):
        return None, "its parameters are not vectors"
    return params, None


def _size(module: nn.Module, params: dict) -> int | None:
    sizes = {p.numel() for p in params.values()}
    if len(sizes) == 1:
        return sizes.pop()
    if sizes:
        return None
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def _formula(x: torch.Tensor, w, b, eps: float, rms: bool, offset: float) -> torch.Tensor:
    x = x.double()
    if rms:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    if w is not None:
        y = y * (w.double() + offset)
    if b is not None:
        y = y + b.double()
    return y


def probe_norm(module: nn.Module) -> NormSpec | str:
    """The NormSpec of what `module(x)` computes, or why it is none the fused ops compute."""
    if any(True for _ in module.children()):
        return f"{type(module).__name__} has submodules"
    if any(True for _ in module.buffers(recurse=False)):
        return "it has buffers (running statistics?)"
    params, why = _vector_params(module)
    if why:
        return why
    size = _size(module, params)
    if size is None:
        return "its normalized size is not one dimension"
    names = list(params)
    if len(names) > 2 or (len(names) == 2 and "bias" not in names):
        return f"it has parameters {names}, not a weight and an optional bias"
    bias = "bias" if "bias" in names else None
    weight = next((n for n in names if n != "bias"), None)
    eps = next((getattr(module, n) for n in _EPS_NAMES if isinstance(getattr(module, n, None), (float, int))), None)
    if eps is None or not 0 < eps < math.inf:
        return "its eps is not a number it holds (eps, variance_epsilon, epsilon)"
    device = next(iter(params.values())).device if params else torch.device("cpu")
    if device.type == "meta":
        return "its parameters are on the meta device"
    gen = torch.Generator().manual_seed(0)
    w = (torch.rand(size, generator=gen) + 0.5).to(device) if weight else None
    b = torch.randn(size, generator=gen).to(device) if bias else None
    x = (torch.randn(3, size, generator=gen) * 2 + 0.7).to(device)
    values = {k: v for k, v in ((weight, w), (bias, b)) if k}
    try:
        with torch.no_grad():
            outs = [torch.func.functional_call(module, values, (t,)) for t in (x, x * math.sqrt(eps))]
    except Exception as e:  # any failure means: not a norm we can stand in for
        return f"running it on a ({3}, {size}) tensor failed: {type(e).__name__}: {e}"
    if not all(isinstance(o, torch.Tensor) and o.shape == x.shape for o in outs):
        return "it does not return a tensor of its input's shape"
    matches = []
    for rms in (True, False):
        for offset in (0.0, 1.0) if w is not None else (0.0,):
            if all(_close(o, _formula(t, w, b, eps, rms, offset)) for o, t in zip(outs, (x, x * math.sqrt(eps)))):
                matches.append((rms, offset))
    if len(matches) != 1:
        err = min(
            (_formula(x, w, b, eps, rms, off) - outs[0].double()).abs().max().item()
            for rms in (True, False)
            for off in (0.0, 1.0)
        )
        return f"it computes neither LayerNorm nor RMSNorm (w or (1+w), eps={eps:g}) (closest off by {err:.2g})"
    rms, offset = matches[0]
    return NormSpec(rms, weight, bias, float(eps), offset, size)


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    # fp32 output (the module may compute in fp32 or round its x_hat): a few ulp of the scale
    return (out.double() - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


# --- ops on the residual branch --------------------------------------------------------------

IDENTITY, DROPOUT, ROWSCALE, COLSCALE, OPAQUE = "identity", "dropout", "rowscale", "colscale", "module"


def probe_wrapper(module: nn.Module) -> tuple[str, str | None]:
    """(kind, parameter name for colscale) of a module applied to a residual branch."""
    if type(module) is nn.Identity:
        return IDENTITY, None
    if type(module) is nn.Dropout:
        return DROPOUT, None
    if any(True for _ in module.children()):
        return OPAQUE, None
    params = dict(module.named_parameters(recurse=False))
    if len(params) == 1:
        name, p = next(iter(params.items()))
        if p.dim() == 1 and _is_layer_scale(module, name, p.numel(), p.device):
            return COLSCALE, name
        return OPAQUE, None
    if params or any(True for _ in module.buffers(recurse=False)):
        return OPAQUE, None
    return (ROWSCALE, None) if _is_per_sample(module) else (OPAQUE, None)


def _is_layer_scale(module, name, size, device) -> bool:
    gen = torch.Generator().manual_seed(1)
    g, x = torch.rand(size, generator=gen).to(device) + 0.5, torch.randn(2, 3, size, generator=gen).to(device)
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, {name: g}, (x.clone(),))
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.shape == x.shape and torch.allclose(out, x * g)


def _is_per_sample(module: nn.Module) -> bool:
    """Identity in eval; in training a factor per sample (dim 0), the same over the other dims."""
    was_training = module.training
    x = torch.ones(16, 3, 5)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module.train(False)
            if module(x) is not x:
                return False
            module.train(True)
            out = module(x)
    except Exception:
        return False
    finally:
        module.train(was_training)
    if out is x:  # probability 0: nothing to tell it from an identity, and nothing to fold
        return hasattr(module, "drop_prob") or hasattr(module, "p")
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return False
    flat = out.reshape(16, -1)
    return bool((flat == flat[:, :1]).all())
