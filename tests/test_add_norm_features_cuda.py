"""The CUDA kernels' residual features where tests/test_add_norm_features.py cannot reach them:
every kernel path (row group sizes, one or two packs per thread, unaligned rows, rows too long
for registers) against the float64 reference fed the call's own mask; the mask against the CPU
operator's for the same seed_offset; CUDA-graph replays drawing fresh masks; the in-place
operator aliasing its inputs on every path; dcolscale's determinism; opcheck with the features.
All of it needs a GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_ref
from test_add_norm_features import GRADS, call, leaves, make, reference

import fusedres
from fusedres.ops.add_norm import BwdArgs, FwdArgs
from fusedres.reference.philox import dropout_mask_reference

pytestmark = pytest.mark.gpu

# (M, N) per kernel path, for fp32 / bf16 (the forward keeps 4 packs of 8 per thread in registers
# up to N = 16384, the backward 1 pack up to 4096 and 2 packs up to 8192 when rows are 16-byte
# aligned; beyond, or unaligned beyond 4096, the long-row kernels and the column kernel).
PATHS = {
    "groups": (301, 40),  # several row groups per block, the last block partly empty
    "one-group": (33, 3000),  # one row per block (T = 384)
    "two-packs": (24, 6144),  # backward: two packs per thread
    "unaligned-long": (20, 6001),  # backward: long rows (unaligned beyond 4096); forward: registers
    "long": (6, 20000),  # both directions: long rows
}
DTYPES = [torch.float32, torch.bfloat16]


def _skip_unless_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "cuda" not in fusedres.available_backends("cuda"):
        pytest.skip("the cuda backend is not usable here")


def _seed_offset(seed: int, offset: int, device="cuda") -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_every_path_matches_the_reference(path, dtype, rms):
    """All features at once (dropout, rowscale, colscale, weight_offset, prenorm), forward and
    every grad, against the float64 reference fed the call's own mask."""
    _skip_unless_cuda()
    shape = PATHS[path]
    base = make(shape, dtype, "cuda", "all", rms=rms)
    ours_in = leaves(base)
    with fusedres.use_backend("cuda"):
        y, h, mask = call(ours_in, rms, True, return_dropout_mask=True)
    eager_in, ref_in = leaves(base), leaves(base, torch.float64)
    eager, ref = reference(eager_in, mask, rms, True), reference(ref_in, mask, rms, True)
    for name, o, e, r in zip(("y", "h"), (y, h), eager, ref):
        assert_close_to_ref(f"{path} {name}", o, e, r, o.dtype)
    gen = torch.Generator().manual_seed(1)
    douts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).cuda() for o in (y, h)]
    names = [k for k in GRADS if isinstance(base[k], torch.Tensor)]
    got = torch.autograd.grad((y, h), [ours_in[k] for k in names], douts)
    want = torch.autograd.grad(eager, [eager_in[k] for k in names], douts)
    want64 = torch.autograd.grad(ref, [ref_in[k] for k in names], [d.double() for d in douts])
    for name, o, e, r in zip(names, got, want, want64):
        assert_close_to_ref(f"{path} d{name}", o, e, r, o.dtype)


SEED_OFFSETS = [(0, 0), (123456789, 987654321), (-1, -3)]  # the last: counters wrap past 2**64


def _masks_of_every_mask_operator(so, rows, cols, p):
    """{backend: mask} of fusedres.dropout_mask's operators for this seed_offset: the CPU one (fed a
    CPU copy), the CUDA one and the Triton one (when Triton is usable on this GPU)."""
    masks = {
        "cpu": torch.ops.fusedres.dropout_mask(so.cpu(), rows, cols, p).cuda(),
        "cuda": torch.ops.fusedres.dropout_mask(so, rows, cols, p),
    }
    if "triton" in fusedres.available_backends("cuda"):
        masks["triton"] = torch.ops.fusedres.dropout_mask_triton(so, rows, cols, p)
    return masks


@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
@pytest.mark.parametrize("shape", [(7, 33), (64, 1000), (5, 8), (301, 40), (3, 20001)], ids=str)
def test_mask_matches_the_cpu_and_triton_operators(shape, seed, offset):
    """One seed_offset, one mask: the CUDA forward's keep-mask (register and long-row kernels, rows
    starting mid-block when N % 4 != 0, a row-strided x) is the CPU, CUDA and Triton dropout_mask
    operators' (the CPU one computes it on the host), and h is x scaled by it (+ residual)."""
    _skip_unless_cuda()
    p = 0.3
    so = _seed_offset(seed, offset)
    rows, cols = shape
    expected = _masks_of_every_mask_operator(so, rows, cols, p)
    wide = torch.randn(rows, cols + 3, device="cuda")
    for x in (wide[:, :cols], wide[:, :cols].contiguous()):
        r = torch.randn(rows, cols, device="cuda")
        args = FwdArgs(x, r, None, None, 1e-5, False, torch.float32, True, p, so, None, None, 0.0, True)
        _y, h, _mean, _rstd, mask = torch.ops.fusedres.add_norm_fwd(*args)
        for backend, want in expected.items():
            assert torch.equal(mask, want), f"{shape} vs {backend}: {int((mask != want).sum())} elements differ"
        scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
        torch.testing.assert_close(h, torch.where(mask, x * scale.cuda(), 0.0) + r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_backward_regenerates_the_forward_mask(path):
    """Dropout alone: dx is zero exactly where the forward dropped x, and dL/dh * 1/(1-p)
    elsewhere (dresidual is dL/dh)."""
    _skip_unless_cuda()
    rows, cols = PATHS[path]
    so = _seed_offset(42, 7)
    x, r = torch.randn(rows, cols, device="cuda"), torch.randn(rows, cols, device="cuda")
    w = torch.randn(cols, device="cuda")
    fwd = FwdArgs(x, r, w, None, 1e-6, True, torch.float32, True, 0.4, so, None, None, 0.0, True)
    _y, h, _mean, rstd, mask = torch.ops.fusedres.add_norm_fwd(*fwd)
    dy = torch.randn_like(x)
    dx, dres, *_ = torch.ops.fusedres.add_norm_bwd(
        *BwdArgs(dy, None, h, None, None, torch.float32, w, None, None, rstd, True, torch.float32, 0.4, so)
    )
    assert torch.equal(dx == 0, ~mask | (dres == 0))
    scale = torch.tensor(1.0 / 0.6, dtype=torch.float32).cuda()
    assert torch.equal(dx[mask], dres[mask] * scale)


def test_cuda_graph_replays_draw_fresh_masks():
    """Captured forward + backward with dropout: every replay draws a new seed_offset on the
    device, so a new mask, and the outputs and grads follow that replay's mask."""
    _skip_unless_cuda()
    torch.manual_seed(0)
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    r = torch.randn(64, 1000, device="cuda", requires_grad=True)
    w, b = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
    dy = torch.randn(64, 1000, device="cuda")

    def step():
        y, h, mask = fusedres.add_layer_norm(x, r, w, b, dropout_p=0.3, prenorm=True, return_dropout_mask=True)
        dx, dr = torch.autograd.grad(y, (x, r), dy)
        return h, mask, dx, dr

    with fusedres.use_backend("cuda"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        h, mask, dx, dr = (t.clone() for t in static)
        expected_h = torch.where(mask, x.detach() / 0.7, 0.0) + r.detach()
        torch.testing.assert_close(h, expected_h)
        assert torch.equal(dx == 0, ~mask | (dr == 0))
        seen.append(mask)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize(
    "dtype, residual_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "bf16-fp32res", "fp32-bf16res"],
)
@pytest.mark.parametrize("shape", [(1001, 48), (17, 3000), (6, 20000), (5, 20001)], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("features", [False, True], ids=["plain", "colscale-offset"])
def test_in_place_is_the_out_of_place_op(shape, dtype, residual_dtype, rms, features):
    """x <- y and residual <- h, bit for bit the out-of-place prenorm call, on every path: row
    groups whose spare groups re-read the last row while it is written, one group, the long-row
    kernel (which re-reads each row three times), and a residual dtype without an in-place kernel."""
    _skip_unless_cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = shape[-1]
    x = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    r = torch.randn(shape, generator=gen, device="cuda").to(residual_dtype or dtype)
    w = torch.randn(n, generator=gen, device="cuda")
    b = None if rms else torch.randn(n, generator=gen, device="cuda")
    extra = dict(colscale=torch.rand(n, generator=gen, device="cuda") + 0.5, weight_offset=0.5) if features else {}
    params = (w,) if rms else (w, b)
    fn, fn_ = (
        (fusedres.add_rms_norm, fusedres.add_rms_norm_) if rms else (fusedres.add_layer_norm, fusedres.add_layer_norm_)
    )
    with fusedres.use_backend("cuda"), torch.no_grad():
        y, h = fn(x, r, *params, prenorm=True, **extra)
        x_, r_ = x.clone(), r.clone()
        fn_(x_, r_, *params, **extra)
    assert torch.equal(r_, h), f"h: {int((r_ != h).sum())} elements differ"
    assert torch.equal(x_, y), f"y: {int((x_ != y).sum())} elements differ"


@pytest.mark.parametrize("path", PATHS)
def test_dcolscale_is_deterministic(path):
    """dweight, dbias and dcolscale come through fixed-size partials summed in a fixed order: the
    same call twice gives the same bits (no atomics)."""
    _skip_unless_cuda()
    rows, cols = PATHS[path]
    gen = torch.Generator(device="cuda").manual_seed(3)
    x, r = (torch.randn(rows, cols, generator=gen, device="cuda") for _ in range(2))
    w, b = torch.randn(cols, generator=gen, device="cuda"), torch.randn(cols, generator=gen, device="cuda")
    rowscale, colscale = torch.rand(rows, generator=gen, device="cuda"), torch.rand(cols, generator=gen, device="cuda")
    so = _seed_offset(5, 6)
    _y, h, mean, rstd, _mask = torch.ops.fusedres.add_norm_fwd(
        *FwdArgs(x, r, w, b, 1e-5, False, torch.float32, True, 0.2, so, rowscale, colscale, 1.0, False)
    )
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    args = BwdArgs(
        dy,
        dh,
        h,
        x,
        None,
        torch.float32,
        w,
        b,
        mean,
        rstd,
        False,
        torch.float32,
        0.2,
        so,
        rowscale,
        colscale,
        1.0,
        True,
    )
    first = torch.ops.fusedres.add_norm_bwd(*args)
    for _ in range(3):
        again = torch.ops.fusedres.add_norm_bwd(*args)
        for name, a, b_ in zip(("dx", "dresidual", "dweight", "dbias", "dcolscale"), first, again):
            assert torch.equal(a, b_), f"{path} {name} differs between identical calls"
    # and it is the reference's: dcolscale = sum over rows of dL/dh * x * keep / (1 - p) * rowscale
    mask = dropout_mask_reference((rows, cols), 0.2, so.cpu()).cuda()
    branch = torch.where(mask, x.double() / 0.8, 0.0) * rowscale.double()[:, None]
    expected = (first[1].double() * branch).sum(0)
    torch.testing.assert_close(first[4].double(), expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_backward_recomputes_h_with_the_features():
    """Without h, the backward forms it again from x and the residual, dropout included, exactly
    as the forward did (it runs the forward kernel)."""
    _skip_unless_cuda()
    gen = torch.Generator(device="cuda").manual_seed(4)
    x, r = (torch.randn(9, 1000, generator=gen, device="cuda").bfloat16() for _ in range(2))
    w, cs = torch.randn(1000, generator=gen, device="cuda"), torch.rand(1000, generator=gen, device="cuda")
    rs = torch.rand(9, generator=gen, device="cuda").bfloat16()
    so = _seed_offset(8, 9)
    fwd = FwdArgs(x, r, w, None, 1e-6, True, torch.bfloat16, True, 0.25, so, rs, cs, 1.0, False)
    _y, h, _mean, rstd, _mask = torch.ops.fusedres.add_norm_fwd(*fwd)
    dy = torch.randn_like(x)
    common = dict(
        h_dtype=torch.bfloat16,
        weight=w,
        bias=None,
        mean=None,
        rstd=rstd,
        rms_norm=True,
        dresidual_dtype=torch.bfloat16,
        dropout_p=0.25,
        seed_offset=so,
        rowscale=rs,
        colscale=cs,
        weight_offset=1.0,
        colscale_grad=True,
    )
    with_h = torch.ops.fusedres.add_norm_bwd(*BwdArgs(dy, None, h, x, None, **common))
    without_h = torch.ops.fusedres.add_norm_bwd(*BwdArgs(dy, None, None, x, r, **common))
    for name, a, b in zip(("dx", "dresidual", "dweight", "dbias", "dcolscale"), with_h, without_h):
        assert torch.equal(a, b), name


def test_no_host_sync():
    """seed and offset stay on the device: forward and backward with every feature never sync."""
    _skip_unless_cuda()
    args = leaves(make((64, 512), torch.bfloat16, "cuda", "all"))
    with fusedres.use_backend("cuda"):
        call(args, False, True)  # loads everything once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y, h = call(args, False, True)
            torch.autograd.grad((y, h), [args[k] for k in GRADS], (torch.ones_like(y), torch.ones_like(h)))
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _feature_fwd_samples():
    torch.manual_seed(0)
    x, r = torch.randn(6, 33, device="cuda"), torch.randn(6, 33, device="cuda")
    w, b = torch.randn(33, device="cuda"), torch.randn(33, device="cuda")
    rs, cs, so = torch.rand(6, device="cuda"), torch.rand(33, device="cuda"), _seed_offset(1, 2)
    return [
        FwdArgs(x, r, w, b, 1e-5, False, torch.float32, True, 0.3, so, rs, cs, 0.5, True),
        FwdArgs(x.bfloat16(), r, w, None, 1e-6, True, torch.float32, True, 0.3, so, None, cs, 1.0, False),
        FwdArgs(x, None, w, b, 1e-5, False, torch.float32, False, 0.0, None, rs, None, 0.0, True),
    ]


def test_opcheck_with_the_features():
    _skip_unless_cuda()
    fwd, bwd = torch.ops.fusedres.add_norm_fwd, torch.ops.fusedres.add_norm_bwd
    for a in _feature_fwd_samples():
        grads = a._replace(
            x=a.x.detach().requires_grad_(),
            colscale=None if a.colscale is None else a.colscale.detach().requires_grad_(),
        )
        torch.library.opcheck(fwd, grads if a.store_h else a)
        y, h, mean, rstd, _mask = fwd(*a._replace(store_h=True))
        dy = torch.randn_like(y)
        dres = torch.float32 if a.residual is not None else None
        common = dict(
            h_dtype=a.h_dtype,
            weight=a.weight,
            bias=a.bias,
            mean=None if a.rms_norm else mean,
            rstd=rstd,
            rms_norm=a.rms_norm,
            dresidual_dtype=dres,
            dropout_p=a.dropout_p,
            seed_offset=a.seed_offset,
            rowscale=a.rowscale,
            colscale=a.colscale,
            weight_offset=a.weight_offset,
            colscale_grad=a.colscale is not None,
        )
        torch.library.opcheck(bwd, BwdArgs(dy, torch.randn_like(h), h, a.x, None, **common))
        torch.library.opcheck(bwd, BwdArgs(dy, None, None, a.x, a.residual, **common))
    x, r, w = torch.randn(5, 40, device="cuda"), torch.randn(5, 40, device="cuda"), torch.randn(40, device="cuda")
    torch.library.opcheck(
        torch.ops.fusedres.add_norm_inplace, (x, r, w, None, 1e-6, True, torch.rand(40, device="cuda"), 1.0)
    )
