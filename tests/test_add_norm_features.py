"""Add & Norm's residual features on every backend: dropout (the mask regenerated in the backward),
rowscale (drop path), colscale (LayerScale) and weight_offset (Gemma's (1 + w)), forward and
backward against the float64 reference fed the call's own keep-mask; dropout's statistics and
reproducibility; the modules; bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_ref, device_backends, skip_if_unusable

import fusedres
from fusedres.reference import add_norm_reference

pytestmark = pytest.mark.usefixtures("autograd_path")

# The backends whose kernels implement the residual features; a backend listed here that still
# refuses them fails its tests, one missing from it that implements them XPASSes (strict).
IMPLEMENTED = {"reference", "cpu", "triton", "cuda"}

FEATURES = {
    "dropout": dict(dropout_p=0.3),
    "rowscale": dict(rowscale=True),
    "colscale": dict(colscale=True),
    "offset": dict(weight_offset=1.0),
    "all": dict(dropout_p=0.2, rowscale=True, colscale=True, weight_offset=0.5),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def feature_backends(kernels_only=False):
    """(device, backend) params; kernels_only leaves out the reference (eager PyTorch)."""
    params = []
    for p in device_backends():
        device, backend = p.values
        if kernels_only and backend == "reference":
            continue
        marks = list(p.marks)
        if backend not in IMPLEMENTED:
            marks.append(pytest.mark.xfail(strict=True, raises=(NotImplementedError, RuntimeError), reason="not yet"))
        params.append(pytest.param(device, backend, id=p.id, marks=marks))
    return params


def make(shape, dtype, device, feature, *, residual=True, rms=False, seed=0):
    """Inputs of one case: random (never zeros), shifted, odd-sized; scales near 1."""
    gen = torch.Generator().manual_seed(seed)

    def rand(s, dt, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale + shift).to(dt).to(device)

    n = shape[-1]
    param = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    f = FEATURES[feature]
    return dict(
        x=rand(shape, dtype, 1.0, 0.5),
        residual=rand(shape, dtype) if residual else None,
        weight=rand((n,), param, 0.3, 1.0),
        bias=None if rms else rand((n,), param, 0.3),
        dropout_p=f.get("dropout_p", 0.0),
        rowscale=rand(shape[:-1], dtype, 0.2, 1.0) if f.get("rowscale") else None,
        colscale=rand((n,), param, 0.2, 1.0) if f.get("colscale") else None,
        weight_offset=f.get("weight_offset", 0.0),
    )


def call(args, rms, prenorm, **extra):
    kw = {k: v for k, v in args.items() if k not in ("x", "residual", "weight", "bias")}
    if rms:
        return fusedres.add_rms_norm(args["x"], args["residual"], args["weight"], prenorm=prenorm, **kw, **extra)
    return fusedres.add_layer_norm(
        args["x"], args["residual"], args["weight"], args["bias"], prenorm=prenorm, **kw, **extra
    )


def reference(args, mask, rms, prenorm, dtype=None):
    """The spec, fed the call's keep-mask; dtype=torch.float64 converts every input first."""
    conv = {k: (v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return add_norm_reference(
        conv["x"],
        conv["residual"],
        conv["weight"],
        conv["bias"],
        1e-5 if not rms else 1e-6,
        rms_norm=rms,
        prenorm=prenorm,
        dropout_p=conv["dropout_p"],
        dropout_mask=mask if conv["dropout_p"] > 0 else None,
        rowscale=conv["rowscale"],
        colscale=conv["colscale"],
        weight_offset=conv["weight_offset"],
    )


GRADS = ("x", "residual", "weight", "bias", "colscale")


def leaves(args, dtype=None):
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to(dtype) if dtype is not None else v.detach().clone()
            if k in GRADS:
                v.requires_grad_()
        out[k] = v
    return out


@pytest.mark.parametrize("device,backend", feature_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_forward_and_backward_match_the_reference(device, backend, dtype, feature, rms):
    skip_if_unusable(device, backend)
    prenorm = feature in ("dropout", "all")
    shape = (3, 5, 37) if feature == "all" else (6, 37)
    base = make(shape, dtype, device, feature, rms=rms, residual=feature != "colscale")
    ours_in = leaves(base)
    with fusedres.use_backend(backend):
        out = call(ours_in, rms, prenorm, return_dropout_mask=True)
    *ours, mask = out
    assert mask.dtype == torch.bool and mask.shape == shape
    if base["dropout_p"] == 0:
        assert mask.all()
    eager_in, ref_in = leaves(base), leaves(base, torch.float64)
    eager = reference(eager_in, mask, rms, prenorm)
    ref = reference(ref_in, mask, rms, prenorm)
    eager, ref = (eager, ref) if prenorm else ((eager,), (ref,))
    for name, o, e, r in zip(("y", "h"), ours, eager, ref):
        assert_close_to_ref(name, o, e, r, o.dtype)

    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(device) for o in ours]
    names = [k for k in GRADS if isinstance(base[k], torch.Tensor)]
    got = torch.autograd.grad(ours, [ours_in[k] for k in names], grads_out)
    want = torch.autograd.grad(eager, [eager_in[k] for k in names], grads_out)
    want64 = torch.autograd.grad(ref, [ref_in[k] for k in names], [g.double() for g in grads_out])
    for name, o, e, r in zip(names, got, want, want64):
        assert_close_to_ref(f"d{name}", o, e, r, o.dtype)


@pytest.mark.parametrize("device,backend", feature_backends())
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_gradcheck_fp64(device, backend, rms):
    """The whole formula in float64, the dropout mask fixed by reseeding before every call."""
    skip_if_unusable(device, backend)
    args = leaves(make((3, 9), torch.float64, device, "all", rms=rms))
    tensors = [args[k] for k in GRADS if isinstance(args[k], torch.Tensor)]

    def fn(*ts):
        a = dict(args, **dict(zip([k for k in GRADS if isinstance(args[k], torch.Tensor)], ts)))
        torch.manual_seed(0)
        return call(a, rms, True)

    with fusedres.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device,backend", feature_backends())
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(device, backend, p):
    """At 512 x 256 the dropped fraction is within 0.01 of p, and kept values are x scaled by
    exactly 1 / (1 - p) (x = 1, no residual: h is the dropped-out x)."""
    skip_if_unusable(device, backend)
    x = torch.ones(512, 256, device=device)
    with fusedres.use_backend(backend), torch.no_grad():
        _y, h, mask = fusedres.add_layer_norm(x, dropout_p=p, prenorm=True, return_dropout_mask=True)
    assert abs((1 - mask.float().mean()).item() - p) < 0.01
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(h[mask], scale.expand(int(mask.sum())))
    assert torch.equal(h[~mask], torch.zeros(int((~mask).sum()), device=device))


@pytest.mark.parametrize("device,backend", feature_backends())
def test_dropout_is_reproducible_and_fresh(device, backend):
    skip_if_unusable(device, backend)
    x, r = torch.randn(64, 48, device=device), torch.randn(64, 48, device=device)
    with fusedres.use_backend(backend), torch.no_grad():
        torch.manual_seed(123)
        first = fusedres.add_layer_norm(x, r, dropout_p=0.5, return_dropout_mask=True)
        second = fusedres.add_layer_norm(x, r, dropout_p=0.5, return_dropout_mask=True)
        torch.manual_seed(123)
        again = fusedres.add_layer_norm(x, r, dropout_p=0.5, return_dropout_mask=True)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], second[1])


@pytest.mark.parametrize("n", [33, 36], ids=["per-element", "aligned"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_backend_draws_the_same_mask(device, n):
    """One generator state, one mask: every backend usable on the device (on the CPU: the CPU
    kernels, Triton's under the interpreter) against the reference, on rows whose kernels draw one
    Philox block per element (N % 4 != 0) or per 4 elements."""
    skip_if_unusable(device, "reference")
    x = torch.randn(7, n, device=device)
    masks = {}
    for backend in fusedres.available_backends(device):
        if backend not in IMPLEMENTED:
            continue
        torch.manual_seed(7)
        with fusedres.use_backend(backend), torch.no_grad():
            masks[backend] = fusedres.add_rms_norm(x, x, dropout_p=0.4, return_dropout_mask=True)[1]
    assert {"reference", device, "triton"} <= masks.keys()  # the device's C++ kernels and Triton's
    for backend, mask in masks.items():
        assert torch.equal(mask, masks["reference"]), backend


# Not the reference: eager PyTorch keeps what autograd keeps, the mask included.
@pytest.mark.parametrize("device,backend", feature_backends(kernels_only=True))
def test_backward_keeps_no_mask(device, backend):
    """The mask is regenerated in the backward: nothing of x's size and bool dtype is saved, and
    the saved bytes are those of the inputs plus per-row statistics."""
    skip_if_unusable(device, backend)
    saved = []
    args = leaves(make((64, 128), torch.float32, device, "dropout"))
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with fusedres.use_backend(backend), hooks:
        call(args, False, False)
    assert saved and not any(t.dtype == torch.bool for t in saved)
    big = [t for t in saved if t.numel() >= 64 * 128]
    assert len(big) <= 2, [tuple(t.shape) for t in big]  # x and residual, or h


@pytest.mark.parametrize("device,backend", feature_backends())
def test_dropout_with_eval_module_is_the_plain_op(device, backend):
    skip_if_unusable(device, backend)
    norm = fusedres.nn.AddLayerNorm(40, dropout_p=0.5).to(device)
    x, r = torch.randn(4, 40, device=device), torch.randn(4, 40, device=device)
    with fusedres.use_backend(backend):
        norm.eval()
        assert torch.equal(norm(x, r), fusedres.add_layer_norm(x, r, norm.weight, norm.bias))
        norm.train()
        torch.manual_seed(0)
        y = norm(x, r)
        torch.manual_seed(0)
        expected = fusedres.add_layer_norm(x, r, norm.weight, norm.bias, dropout_p=0.5)
    assert torch.equal(y, expected)


def test_rms_module_weight_offset():
    norm = fusedres.nn.AddRMSNorm(16, eps=1e-6, weight_offset=1.0)
    torch.nn.init.normal_(norm.weight)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    with fusedres.use_backend("reference"):
        y = norm(x, r)
    expected = torch.nn.functional.rms_norm(x + r, (16,), eps=1e-6) * (1.0 + norm.weight)
    torch.testing.assert_close(y, expected)
    assert "weight_offset=1.0" in repr(norm)


BAD = [
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in \\[0, 1\\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in \\[0, 1\\)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    (dict(rowscale=torch.ones(4)), ValueError, "rowscale must have shape \\(3,\\)"),
    (dict(rowscale=torch.ones(3, dtype=torch.int32)), TypeError, "rowscale must be float32"),
    (dict(rowscale=torch.ones(3, device="meta")), ValueError, "rowscale is on meta"),
    (dict(colscale=torch.ones(7)), ValueError, "colscale must have shape \\(8,\\)"),
    (dict(colscale=[1.0] * 8), TypeError, "colscale must be a torch.Tensor"),
    (dict(weight=None, weight_offset=1.0), ValueError, "weight_offset needs a weight"),
    (dict(weight_offset=float("inf")), ValueError, "weight_offset must be a finite number"),
]


@pytest.mark.parametrize("backend", [b for b in fusedres.available_backends("cpu")])
@pytest.mark.parametrize("change,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_feature_argument_is_named(backend, change, exc, match):
    args = dict(x=torch.randn(3, 8), residual=torch.randn(3, 8), weight=torch.randn(8), bias=torch.randn(8))
    args.update(change)
    with fusedres.use_backend(backend), pytest.raises(exc, match=match):
        fusedres.add_layer_norm(**args)


@pytest.mark.parametrize("backend", [b for b in fusedres.available_backends("cpu")])
def test_in_place_refuses_what_it_cannot_do(backend):
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    with fusedres.use_backend(backend):
        with torch.no_grad(), pytest.raises(ValueError, match="must not overlap"):
            fusedres.add_rms_norm_(x, x, w)
        with torch.no_grad(), pytest.raises(ValueError, match="must be contiguous"):
            fusedres.add_rms_norm_(torch.randn(3, 10)[:, :8], r, w)  # row-strided: readable, not dense
        with pytest.raises(RuntimeError, match="keeps nothing for a backward"):
            fusedres.add_rms_norm_(x, r, w.requires_grad_())


@pytest.mark.parametrize("device,backend", feature_backends())
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_matches_the_out_of_place_op(device, backend, rms, dtype):
    skip_if_unusable(device, backend)
    args = make((5, 33), dtype, device, "all", rms=rms)
    x, r, w, b, cs = args["x"], args["residual"], args["weight"], args["bias"], args["colscale"]
    fn = fusedres.add_rms_norm if rms else fusedres.add_layer_norm
    fn_ = fusedres.add_rms_norm_ if rms else fusedres.add_layer_norm_
    params = (w,) if rms else (w, b)
    with fusedres.use_backend(backend), torch.no_grad():
        y, h = fn(x, r, *params, colscale=cs, weight_offset=0.5, prenorm=True)
        x_, r_ = x.clone(), r.clone()
        fn_(x_, r_, *params, colscale=cs, weight_offset=0.5)
    assert torch.equal(x_, y) and torch.equal(r_, h)


def kernel_backends():
    """The backends usable on CPU here whose own operators implement the residual features (the
    Triton kernels run under the interpreter)."""
    usable = fusedres.available_backends("cpu")
    return [pytest.param(b, id=b) for b in ("cpu", "triton") if b in usable and b in IMPLEMENTED]


def operator(backend: str, name: str):
    """The backend's operator: fusedres::add_norm_* for the CPU kernels, fusedres::add_norm_*_triton."""
    return getattr(torch.ops.fusedres, name if backend == "cpu" else f"{name}_{backend}")


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_with_features(backend):
    from fusedres.ops.add_norm import BwdArgs, FwdArgs, InplaceArgs

    args = make((5, 3, 12), torch.float32, "cpu", "all")
    so = fusedres.philox_seed_offset(torch.device("cpu"))
    x, r, w, b, rs, cs = (args[k] for k in ("x", "residual", "weight", "bias", "rowscale", "colscale"))
    fwd = FwdArgs(x, r, w, b, 1e-5, False, torch.float32, True, 0.2, so, rs, cs, 0.5, True)
    grads = {0, 1, 2, 3, 11}  # x, residual, weight, bias, colscale
    torch.library.opcheck(
        operator(backend, "add_norm_fwd"),
        tuple(a.detach().requires_grad_() if i in grads else a for i, a in enumerate(fwd)),
    )
    y, h, mean, rstd, _mask = operator(backend, "add_norm_fwd")(*fwd)
    for stored in (True, False):
        bwd = BwdArgs(
            torch.randn_like(y), torch.randn_like(h), h if stored else None, x, None if stored else r,
            torch.float32, w, b, mean, rstd, False, torch.float32, 0.2, so, rs, cs, 0.5, True,
        )  # fmt: skip
        torch.library.opcheck(operator(backend, "add_norm_bwd"), bwd)
    inplace = InplaceArgs(x.clone(), r.clone(), w, b, 1e-5, False, cs, 0.5)
    torch.library.opcheck(operator(backend, "add_norm_inplace"), inplace)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_torch_compile_fullgraph_with_dropout(backend, rms):
    """Compiled, the seed is drawn by the compiler's own RNG (as for F.dropout): the outputs and
    grads are checked against the reference fed the compiled call's mask."""
    torch._dynamo.reset()
    base = make((4, 6, 40), torch.float32, "cpu", "all", rms=rms)
    ours_in = leaves(base)

    def fn(**a):
        return call(a, rms, True, return_dropout_mask=True)

    with fusedres.use_backend(backend):
        y, h, mask = torch.compile(fn, fullgraph=True)(**ours_in)
    ref_in = leaves(base, torch.float64)
    ref = reference(ref_in, mask, rms, True)
    eager = reference(leaves(base), mask, rms, True)
    for name, o, e, r in zip(("y", "h"), (y, h), eager, ref):
        assert_close_to_ref(name, o, e, r, o.dtype)
    names = [k for k in GRADS if isinstance(base[k], torch.Tensor)]
    got = torch.autograd.grad((y, h), [ours_in[k] for k in names], (torch.ones_like(y), torch.ones_like(h)))
    want = torch.autograd.grad(ref, [ref_in[k] for k in names], (torch.ones_like(ref[0]), torch.ones_like(ref[1])))
    for name, o, r in zip(names, got, want):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4, msg=name)
    assert 0.6 < mask.float().mean().item() < 0.95
