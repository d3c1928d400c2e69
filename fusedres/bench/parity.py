"""Parity: every provider's outputs and grads against the float64 reference, beside eager's own error.

Per tensor (each output, then the grad of each differentiable input):
  abs error  max |ours - ref64| over the elements where ref64 is finite;
  rel error  abs error / max |ref64|: normwise, not elementwise, because every normalized output
             has elements near zero, where an elementwise ratio measures nothing but rounding;
  pass       abs error <= 2 |eager - ref64| + atol (fusedres.testing: the rule the tests use).
Only fusedres providers are held to the rule (`judged`); the others get the same verdict for
information, and eager is the yardstick itself.
"""

from __future__ import annotations

import torch

from fusedres.testing import max_abs_error, parity_bound, ref_scale

# Below this a reference magnitude is zero for the relative error (an all-zero grad, say).
TINY = 1e-30


def relative(abs_error: float, ref_magnitude: float) -> float:
    return abs_error / max(ref_magnitude, TINY)


def max_rel_error(t: torch.Tensor, ref: torch.Tensor) -> float:
    return relative(max_abs_error(t, ref), ref_scale(ref))


def is_judged(provider: str) -> bool:
    return provider.startswith("fusedres")


def differentiable(t) -> bool:
    """Inputs that get a grad: floating tensors (not None, not token ids)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def tensor_names(case, inputs: list, n_outputs: int) -> list[str]:
    """Names of the outputs then the grads: the case's own (output_names, input_names) when it has
    them, else out0.., dinput0.."""
    outs = list(getattr(case, "output_names", ()))[:n_outputs]
    outs += [f"out{i}" for i in range(len(outs), n_outputs)]
    names = list(getattr(case, "input_names", ()))
    names += [f"input{i}" for i in range(len(names), len(inputs))]
    return outs + [f"d{n}" for n, t in zip(names, inputs) if differentiable(t)]


def _run(fn, tensors: list, upstream: list) -> list[torch.Tensor]:
    """Outputs of fn on fresh leaves, then the grads of sum(out * upstream) for every leaf."""
    leaves = [t.detach().requires_grad_() if differentiable(t) else t for t in tensors]
    outs = _outputs(fn(*leaves))
    wrt = [t for t in leaves if differentiable(t)]
    if not wrt:
        return [o.detach() for o in outs]
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, wrt))


def _seeded(fn, seed: int = 0):
    def run(*args):
        torch.manual_seed(seed)
        return fn(*args)

    return run


def parity(case, inputs: list, provider_fns: dict) -> dict[str, dict]:
    """{provider: report} for every provider in provider_fns (name -> callable over inputs).
    A case without `reference()` has no float64 answer: the report is empty."""
    if not hasattr(case, "reference"):
        return {}
    # A case whose outputs depend on the RNG (dropout): every function runs from one seed, the
    # reference and the error baseline (parity_eager) on the mask fusedres draws from it; providers
    # that draw their own (F.dropout, compiled code) are not compared.
    seeded = getattr(case, "seeded", False)
    wrap = _seeded if seeded else (lambda fn: fn)
    gen = torch.Generator(device="cpu").manual_seed(1)
    baseline = getattr(case, "parity_eager", case.eager)()
    probe = _outputs(wrap(baseline)(*inputs))
    upstream = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype).double() for o in probe]
    ref = _run(wrap(case.reference()), [t.double() if differentiable(t) else t for t in inputs], upstream)
    eager = _run(wrap(baseline), inputs, upstream)
    names = tensor_names(case, inputs, len(probe))
    scales = [ref_scale(r) for r in ref]
    eager_abs = [max_abs_error(e, r) for e, r in zip(eager, ref)]
    eager_rel = [relative(ea, s) for ea, s in zip(eager_abs, scales)]
    dtype = getattr(case, "dtype", torch.float32)
    bounds = [parity_bound(ea, dtype, s) for ea, s in zip(eager_abs, scales)]

    report = {}
    for provider, fn in provider_fns.items():
        if seeded and not is_judged(provider):
            report[provider] = {"pass": None, "judged": False, "note": "draws its own dropout mask: not compared"}
            continue
        try:
            ours = _run(wrap(fn), inputs, upstream)
        except Exception as e:  # reported, and a failure when the provider is fusedres
            report[provider] = {"pass": False, "judged": is_judged(provider), "error": f"{type(e).__name__}: {e}"}
            continue
        if len(ours) != len(ref):
            report[provider] = {
                "pass": False,
                "judged": is_judged(provider),
                "error": f"{len(ours)} outputs and grads, the reference has {len(ref)}",
            }
            continue
        tensors = {}
        for name, o, r, scale, ea, er, bound in zip(names, ours, ref, scales, eager_abs, eager_rel, bounds):
            err = max_abs_error(o, r) if o.shape == r.shape else float("inf")
            tensors[name] = {
                "abs": err,
                "rel": relative(err, scale),
                "eager_abs": ea,
                "eager_rel": er,
                "bound": bound,
                "pass": err <= bound,
            }
        worst = max(tensors, key=lambda n: tensors[n]["abs"] / tensors[n]["bound"])
        report[provider] = {
            "pass": None if provider == "eager" else all(t["pass"] for t in tensors.values()),
            "judged": is_judged(provider),
            "max_abs_error": max(t["abs"] for t in tensors.values()),
            "max_rel_error": max(t["rel"] for t in tensors.values()),
            "eager_max_abs_error": max(eager_abs),
            "eager_max_rel_error": max(eager_rel),
            "worst": worst,
            "tensors": tensors,
        }
    return report


def failed(report: dict) -> bool:
    """A judged (fusedres) provider that missed the rule or raised."""
    return report.get("judged", False) and report.get("pass") is False
