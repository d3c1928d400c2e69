"""The Triton backend's eager launchers and registered ops, against the eager references.

Runs on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without
a GPU), on CUDA tensors otherwise. Every result is judged by the tolerance rule of tests/helpers.py:
|ours - ref64| <= 2 |eager - ref64| + atol, with ref64 the reference evaluated in float64 and eager
the reference evaluated in the inputs' dtype. Shapes are tiny: the interpreter runs a few
thousand elements per second per program.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref, assert_within_rule

from fusedres import available_backends
from fusedres.reference import add_norm_reference, batch_norm_add_relu_reference

triton_add_norm = pytest.importorskip("fusedres.triton.add_norm")
from fusedres.triton import batch_norm as triton_batch_norm  # noqa: E402

FwdArgs, BwdArgs = triton_add_norm.FwdArgs, triton_add_norm.BwdArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE), reason=f"triton cannot run on {DEVICE}")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-5


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weights as autocast leaves them: fp32 beside fp16 / bf16 activations."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def randn(*shape, dtype=torch.float32, gen, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).to(DEVICE)


# --- Add & Norm ---------------------------------------------------------------------------------


def bwd_of(dy, h, h_dtype, weight, bias, mean, rstd):
    """The backward of a LayerNorm forward that stored h, without dh or a residual."""
    return BwdArgs(dy, None, h, None, None, h_dtype, weight, bias, mean, rstd, False, None)


def add_norm_case(
    x, residual, weight, bias, rms, *, dh=True, residual_in_fp32=False, store_h=True, recompute=False, gen
):
    """Runs the forward and backward launchers on one input and checks every output and grad."""
    h_dtype = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32:
        h_dtype = torch.promote_types(h_dtype, torch.float32)
    args = FwdArgs(x, residual, weight, bias, EPS, rms, h_dtype, store_h)
    y, h, mean, rstd, _mask = triton_add_norm.add_norm_fwd(*args)
    m = x.numel() // x.shape[-1]
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert h.shape == (x.shape if store_h else (0,)) and h.dtype == h_dtype
    assert mean.shape == ((0,) if rms else (m,)) and rstd.shape == (m,) and rstd.dtype == stats

    def reference(dtype, *tensors):
        x_, r_, w_, b_ = (t if t is None or dtype is None else t.to(dtype) for t in tensors)
        return add_norm_reference(x_, r_, w_, b_, EPS, rms_norm=rms, prenorm=True, residual_in_fp32=residual_in_fp32)

    inputs = [t.detach().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    inputs64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    y_eager, h_eager = reference(None, *inputs)
    y_ref, h_ref = reference(None, *inputs64)
    assert_close_to_ref("y", y, y_eager, y_ref, x.dtype)
    if store_h:
        assert_close_to_ref("h", h, h_eager, h_ref, h_dtype)

    # incoming grads as row-strided views (slices of wider rows), read in place
    n = x.shape[-1]
    dy = randn(*x.shape[:-1], n + 3, dtype=x.dtype, gen=gen)[..., :n]
    dh_in = randn(*x.shape[:-1], n + 1, dtype=h_dtype, gen=gen)[..., :n] if dh else None
    separate = residual is not None and residual.dtype != x.dtype
    recompute = recompute or not store_h  # without h the backward gets x (and residual: h is recomputed)
    dx, dres, dw, db, _ = triton_add_norm.add_norm_bwd(
        *BwdArgs(
            dy,
            dh_in,
            None if recompute else h,
            x if recompute else None,
            residual if recompute else None,
            h_dtype,
            weight,
            bias,
            None if rms else mean,
            rstd,
            rms,
            residual.dtype if separate else None,
        )
    )
    present = [t for t in inputs if t is not None]
    present64 = [t for t in inputs64 if t is not None]
    outs = (y_eager, h_eager) if dh else (y_eager,)
    outs64 = (y_ref, h_ref) if dh else (y_ref,)
    grads_in = (dy, dh_in) if dh else (dy,)
    eager = dict(zip(("x", "residual", "weight", "bias"), _grads(outs, present, grads_in, inputs)))
    ref = dict(
        zip(("x", "residual", "weight", "bias"), _grads(outs64, present64, [g.double() for g in grads_in], inputs64))
    )
    assert dx.shape == x.shape and dx.dtype == dy.dtype and dx.is_contiguous()
    assert_close_to_ref("dx", dx, eager["x"], ref["x"], x.dtype)
    if residual is not None:
        ours = dres if separate else dx
        assert ours.dtype == residual.dtype
        assert_close_to_ref("dresidual", ours, eager["residual"], ref["residual"], residual.dtype)
    else:
        assert dres.shape == (0,)
    for name, ours, param in (("weight", dw, weight), ("bias", db, bias)):
        if param is None:
            assert ours.shape == (0,)
            continue
        assert ours.shape == param.shape and ours.dtype == param.dtype
        assert_close_to_ref(f"d{name}", ours, eager[name], ref[name], param.dtype)
    return dx, dres, dw, db


def _grads(outputs, inputs, grad_outputs, all_inputs):
    grads = iter(torch.autograd.grad(outputs, inputs, grad_outputs))
    return [next(grads) if t is not None else None for t in all_inputs]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("n", [1, 7, 33, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_norm_matches_reference(dtype, n, rms):
    gen = torch.Generator().manual_seed(n)
    shape = (2, 3, n)  # 3-D: the leading dims are rows
    x, r = randn(*shape, dtype=dtype, gen=gen), randn(*shape, dtype=dtype, gen=gen)
    w = randn(n, dtype=param_dtype(dtype), gen=gen, shift=1.0)
    b = None if rms else randn(n, dtype=param_dtype(dtype), gen=gen)
    add_norm_case(x, r, w, b, rms, gen=gen)


@pytest.mark.parametrize("dtype, n", [(torch.float32, 20000), (torch.bfloat16, 20000), (torch.float64, 9000)], ids=str)
def test_add_norm_wide_rows(dtype, n):
    """Rows beyond the single-block limits (forward 16384 elements, 8192 for float64; backward
    8192, 4096 for float64) loop over blocks."""
    fwd = triton_add_norm.add_norm_fwd_config(n, dtype)
    bwd = triton_add_norm.add_norm_bwd_config(n, dtype)
    assert not fwd.single_block and not bwd.single_block
    gen = torch.Generator().manual_seed(1)
    x, r = randn(3, n, dtype=dtype, gen=gen), randn(3, n, dtype=dtype, gen=gen, shift=5.0)
    w, b = randn(n, dtype=param_dtype(dtype), gen=gen), randn(n, dtype=param_dtype(dtype), gen=gen)
    add_norm_case(x, r, w, b, False, gen=gen)
    add_norm_case(x, r, w, None, True, dh=False, gen=gen)


def test_add_norm_fp64_backward_block_is_capped():
    """float64 rows of 4096 and more would spill registers as one block (sm_90, with a residual
    grad to write; fusedres.triton.aot checks it): they take the loop."""
    assert triton_add_norm.add_norm_bwd_config(8192, torch.float64).single_block is False
    assert triton_add_norm.add_norm_bwd_config(4096, torch.float64).single_block is False
    assert triton_add_norm.add_norm_bwd_config(2048, torch.float64).single_block is True
    assert triton_add_norm.add_norm_bwd_config(8192, torch.float32).single_block is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_norm_strided_rows(dtype):
    """Row-strided views (a slice of wider rows; leading dims that collapse into one row stride)
    are read in place."""
    gen = torch.Generator().manual_seed(2)
    n = 33
    x = randn(2, 3, 2 * n, dtype=dtype, gen=gen)[..., :n]  # strides (6n, 2n, 1): rows of stride 2n
    r = randn(6, n + 5, dtype=dtype, gen=gen)[:, :n].view(2, 3, n)
    w, b = randn(n, dtype=dtype, gen=gen), randn(n, dtype=dtype, gen=gen)
    assert not x.is_contiguous() and not r.is_contiguous()
    add_norm_case(x, r, w, b, False, gen=gen)
    single_row = randn(1, 1, 3 * n, dtype=dtype, gen=gen)[..., ::1][:, :, :n]  # one row, odd strides
    add_norm_case(single_row, None, w, b, True, gen=gen)


def test_add_norm_optional_operands_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(3)
    n = 40
    x = randn(5, n, dtype=torch.bfloat16, gen=gen)
    r32 = randn(5, n, dtype=torch.float32, gen=gen)
    w = randn(n, dtype=torch.float32, gen=gen)
    add_norm_case(x, None, None, None, False, gen=gen)  # plain LayerNorm without affine
    add_norm_case(x, None, w, None, True, store_h=False, dh=False, gen=gen)  # h not stored
    add_norm_case(x, r32, w, w.clone(), False, gen=gen)  # fp32 residual stream: h fp32, dresidual fp32
    add_norm_case(x, x.clone(), w, None, True, residual_in_fp32=True, gen=gen)  # h fp32 from bf16 + bf16
    add_norm_case(x, r32, w, w.clone(), False, dh=False, recompute=True, gen=gen)  # h recomputed in bwd
    w2d = randn(4, n // 4, dtype=torch.float32, gen=gen)  # weight of any shape, N contiguous elements
    y, h, mean, rstd, _ = triton_add_norm.add_norm_fwd(*FwdArgs(x, None, w2d, w2d, EPS, False, x.dtype, True))
    flat = FwdArgs(x, None, w2d.flatten(), w2d.flatten(), EPS, False, x.dtype, True)
    assert torch.equal(y, triton_add_norm.add_norm_fwd(*flat)[0])
    _, _, dw, db, _ = triton_add_norm.add_norm_bwd(*bwd_of(y, h, x.dtype, w2d, w2d, mean, rstd))
    assert dw.shape == w2d.shape and db.shape == w2d.shape and dw.dtype == torch.float32


def test_add_norm_param_grads_are_deterministic():
    gen = torch.Generator().manual_seed(4)
    n = 48
    x, dy = randn(11, n, gen=gen), randn(11, n, gen=gen)  # 11 rows: several programs, uneven
    w, b = randn(n, gen=gen), randn(n, gen=gen)
    y, h, mean, rstd, _ = triton_add_norm.add_norm_fwd(*FwdArgs(x, None, w, b, EPS, False, x.dtype, True))
    first = triton_add_norm.add_norm_bwd(*bwd_of(dy, h, x.dtype, w, b, mean, rstd))
    second = triton_add_norm.add_norm_bwd(*bwd_of(dy, h, x.dtype, w, b, mean, rstd))
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_add_norm_no_rows(shape):
    x = torch.empty(shape, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.ones(8, device=DEVICE)
    y, h, mean, rstd, _ = triton_add_norm.add_norm_fwd(*FwdArgs(x, x, w, b, EPS, False, x.dtype, True))
    assert y.shape == shape and h.shape == shape and mean.shape == (0,) and rstd.shape == (0,)
    dx, dres, dw, db, _ = triton_add_norm.add_norm_bwd(*bwd_of(x, h, x.dtype, w, b, mean, rstd))
    assert dx.shape == shape and torch.equal(dw, torch.zeros(8, device=DEVICE)) and torch.equal(db, dw)


def test_add_norm_registered_ops_check_their_arguments():
    fwd, bwd = torch.ops.fusedres.add_norm_fwd_triton, torch.ops.fusedres.add_norm_bwd_triton
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="rows of one stride"):
        fwd(*FwdArgs(x.t().contiguous().t(), None, w, None, EPS, False, x.dtype, False))
    with pytest.raises(ValueError, match="weight"):
        fwd(*FwdArgs(x, None, torch.randn(16, device=DEVICE)[::2], None, EPS, False, x.dtype, False))
    with pytest.raises(ValueError, match="eps"):
        fwd(*FwdArgs(x, None, w, None, -1.0, False, x.dtype, False))
    y, h, mean, rstd, _ = fwd(*FwdArgs(x, None, w, None, EPS, False, x.dtype, True))
    with pytest.raises(ValueError, match="mean"):
        bwd(*bwd_of(y, h, x.dtype, w, None, mean[:2], rstd))
    with pytest.raises(TypeError, match="rstd"):
        bwd(*bwd_of(y, h, x.dtype, w, None, mean, rstd.double()))


def test_add_norm_opcheck():
    gen = torch.Generator().manual_seed(5)
    x, r = randn(6, 33, gen=gen), randn(6, 33, gen=gen)
    w, b = randn(33, gen=gen), randn(33, gen=gen)
    wide = randn(6, 40, gen=gen)[:, :33]
    fwd_samples = [
        FwdArgs(x, r, w, b, EPS, False, torch.float32, True),
        FwdArgs(wide, None, w, None, 1e-6, True, torch.float32, False),
        FwdArgs(x.bfloat16(), r, w, b, EPS, False, torch.float32, True),
    ]
    fwd, bwd = torch.ops.fusedres.add_norm_fwd_triton, torch.ops.fusedres.add_norm_bwd_triton
    for args in fwd_samples:
        torch.library.opcheck(fwd, args)
    y, h, mean, rstd, _ = fwd(*fwd_samples[2])
    bf = fwd_samples[2].x
    torch.library.opcheck(bwd, BwdArgs(y, h, h, None, None, torch.float32, w, b, mean, rstd, False, torch.float32))
    torch.library.opcheck(bwd, BwdArgs(y, None, None, bf, r, torch.float32, w, None, mean, rstd, False, None))


# --- BatchNorm + add + ReLU ---------------------------------------------------------------------


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, -1).contiguous().transpose(1, -1)  # (N, C, L) with C innermost


def batch_norm_case(x, residual, weight, bias, *, relu=True, gen, running_dtype=torch.float32, momentum=0.1):
    """Training: stats (running stats updated) -> forward -> backward, against the reference."""
    c = x.shape[1]
    rm0, rv0 = randn(c, dtype=torch.float64, gen=gen), randn(c, dtype=torch.float64, gen=gen).abs() + 0.5
    rm, rv = rm0.to(running_dtype), rv0.to(running_dtype)
    mean, var = triton_batch_norm.batch_norm_stats(x, rm, rv, momentum)
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.dtype == stats and var.dtype == stats and mean.shape == (c,)

    x64 = x.detach().double()
    m64, v64 = x64.transpose(0, 1).reshape(c, -1).mean(1), x64.transpose(0, 1).reshape(c, -1).var(1, unbiased=False)
    x_acc = x.detach().to(stats)
    m_e, v_e = x_acc.transpose(0, 1).reshape(c, -1).mean(1), x_acc.transpose(0, 1).reshape(c, -1).var(1, unbiased=False)
    assert_close_to_ref("mean", mean, m_e, m64, stats)
    assert_close_to_ref("var", var, v_e, v64, stats)

    # running stats: F.batch_norm's update, in the running stats' dtype (eager) and in float64
    rm_e, rv_e = rm0.to(running_dtype).float(), rv0.to(running_dtype).float()
    rm_r, rv_r = rm0.to(running_dtype).double(), rv0.to(running_dtype).double()
    F.batch_norm(x_acc.float(), rm_e, rv_e, None, None, True, momentum, EPS)
    F.batch_norm(x64, rm_r, rv_r, None, None, True, momentum, EPS)
    assert_within_rule("running_mean", rm.float(), rm_e.to(running_dtype).float(), rm_r, 1e-5)
    assert_within_rule("running_var", rv.float(), rv_e.to(running_dtype).float(), rv_r, 1e-5)

    count = x.numel() // c
    out = triton_batch_norm.batch_norm_add_relu_fwd(x, residual, weight, bias, mean, var, EPS, relu, True, count)
    assert out.shape == x.shape and out.stride() == x.stride() and out.dtype == x.dtype

    def reference(dtype, *tensors):
        x_, r_, w_, b_ = (t if t is None or dtype is None else t.to(dtype) for t in tensors)
        return batch_norm_add_relu_reference(x_, r_, None, None, w_, b_, True, momentum, EPS, relu=relu)

    inputs = [t.detach().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    inputs64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    out_eager, out_ref = reference(None, *inputs), reference(None, *inputs64)
    assert_close_to_ref("out", out, out_eager, out_ref, x.dtype)

    grad_out = to_layout(randn(*x.shape, dtype=x.dtype, gen=gen), not x.is_contiguous())
    write = residual is not None
    sum_dy, sum_dy_xhat, grad_residual = triton_batch_norm.batch_norm_add_relu_bwd_reduce(
        grad_out, out, x, mean, var, EPS, relu, write
    )
    grad = grad_residual if write else grad_out
    grad_input = triton_batch_norm.batch_norm_add_relu_bwd_input(
        grad, None if write else out, x, mean, var, EPS, weight, sum_dy, sum_dy_xhat, count, True, relu
    )
    assert grad_input.stride() == x.stride()
    names = ("x", "residual", "weight", "bias")
    eager = dict(zip(names, _grads((out_eager,), [t for t in inputs if t is not None], (grad_out,), inputs)))
    ref = dict(zip(names, _grads((out_ref,), [t for t in inputs64 if t is not None], (grad_out.double(),), inputs64)))
    assert_close_to_ref("grad_input", grad_input, eager["x"], ref["x"], x.dtype)
    if write:
        assert grad_residual.stride() == x.stride()
        assert_close_to_ref("grad_residual", grad_residual, eager["residual"], ref["residual"], x.dtype)
    if weight is not None:
        assert_close_to_ref("grad_weight", sum_dy_xhat, eager["weight"], ref["weight"], stats)
    if bias is not None:
        assert_close_to_ref("grad_bias", sum_dy, eager["bias"], ref["bias"], stats)


BN_CASES = [
    *[pytest.param(d, (3, 5, 7, 6), cl, id=f"{d}-4d-{'cl' if cl else 'nchw'}") for d in DTYPES for cl in (False, True)],
    *[
        pytest.param(d, shape, cl, id=f"{d}-{len(shape)}d-{'cl' if cl else 'nchw'}")
        for d in (torch.float32, torch.bfloat16)
        for shape in ((4, 6, 9), (2, 3, 3, 4, 5))
        for cl in (False, True)
    ],
    pytest.param(torch.float32, (10, 7), False, id="float32-2d"),
    pytest.param(torch.float32, (3, 1, 5, 5), True, id="float32-one-channel"),
]


@pytest.mark.parametrize("dtype, shape, channels_last", BN_CASES)
def test_batch_norm_matches_reference(dtype, shape, channels_last):
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = to_layout(randn(*shape, dtype=dtype, gen=gen, scale=2.0, shift=3.0), channels_last)
    residual = torch.empty_like(x).copy_(randn(*shape, dtype=dtype, gen=gen))
    p = param_dtype(dtype)
    batch_norm_case(x, residual, randn(c, dtype=p, gen=gen), randn(c, dtype=p, gen=gen), gen=gen)


def test_batch_norm_variants():
    """No residual; no ReLU; no affine; running stats of other dtypes; a large mean (Welford on
    shifted data keeps the variance)."""
    gen = torch.Generator().manual_seed(6)
    x = randn(4, 3, 5, 5, gen=gen)
    w, b = randn(3, gen=gen), randn(3, gen=gen)
    batch_norm_case(x, None, w, b, gen=gen)
    batch_norm_case(to_layout(x, True), torch.empty_like(to_layout(x, True)).copy_(x), None, None, relu=False, gen=gen)
    batch_norm_case(x.bfloat16(), None, w, b, gen=gen, running_dtype=torch.bfloat16)
    batch_norm_case(x, None, w, b, gen=gen, running_dtype=torch.float64, momentum=0.3)
    batch_norm_case(randn(4, 3, 5, 5, gen=gen, shift=1e4), None, w, b, gen=gen)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_batch_norm_eval_and_folded(channels_last):
    """Eval: running stats (any float dtype) as the statistics, input not read by the input grad;
    mean = var = None: the bias + add + ReLU tail of a folded conv."""
    gen = torch.Generator().manual_seed(7)
    x = to_layout(randn(2, 4, 3, 5, dtype=torch.bfloat16, gen=gen), channels_last)
    r = torch.empty_like(x).copy_(randn(2, 4, 3, 5, gen=gen))
    w, b = randn(4, gen=gen), randn(4, gen=gen)
    rm, rv = randn(4, dtype=torch.float64, gen=gen), randn(4, dtype=torch.float64, gen=gen).abs() + 0.5
    count = x.numel() // 4
    for mean, var in ((rm, rv), (None, None)):
        out = triton_batch_norm.batch_norm_add_relu_fwd(x, r, w, b, mean, var, EPS, True, False, count)
        xs = [t.detach().requires_grad_() for t in (x, r)]
        x64 = [t.detach().double().requires_grad_() for t in (x, r)]

        def reference(x_, r_, dtype, mean=mean, var=var):
            if mean is None:  # relu(x * w + b + r)
                shape = (1, -1) + (1,) * (x_.dim() - 2)
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                y = x_.to(acc) * w.to(acc).view(shape) + b.to(acc).view(shape) + r_.to(acc)
                return F.relu(y).to(x_.dtype)
            return batch_norm_add_relu_reference(x_, r_, mean.to(dtype), var.to(dtype), w.to(dtype), b.to(dtype), False)

        eager, ref = reference(*xs, torch.float32), reference(*x64, torch.float64)
        assert_close_to_ref("out", out, eager, ref, x.dtype)
        grad_out = torch.empty_like(x).copy_(randn(2, 4, 3, 5, gen=gen))
        sum_dy, sum_dy_xhat, _ = triton_batch_norm.batch_norm_add_relu_bwd_reduce(
            grad_out, out, x, mean, var, EPS, True, False
        )
        grad_input = triton_batch_norm.batch_norm_add_relu_bwd_input(
            grad_out, out, x, mean, var, EPS, w, None, None, count, False, True
        )
        gx_e, gr_e = torch.autograd.grad(eager, xs, grad_out)
        gx_r, gr_r = torch.autograd.grad(ref, x64, grad_out.double())
        assert_close_to_ref("grad_input", grad_input, gx_e, gx_r, x.dtype)
        g = torch.where(out > 0, grad_out, 0).double()
        dims = [d for d in range(x.dim()) if d != 1]
        xhat = x.double() if mean is None else (x.double() - rm.view(1, -1, 1, 1)) / (rv.view(1, -1, 1, 1) + EPS).sqrt()
        torch.testing.assert_close(sum_dy.double(), g.sum(dims), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sum_dy_xhat.double(), (g * xhat).sum(dims), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the interpreter's 0 / 0 = NaN
def test_batch_norm_empty_batch():
    x = torch.empty(0, 3, 4, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    mean, var = triton_batch_norm.batch_norm_stats(x, rm, rv, 0.1)
    assert mean.isnan().all() and var.isnan().all()
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))
    out = triton_batch_norm.batch_norm_add_relu_fwd(x, x, None, None, rm, rv, EPS, True, False, 0)
    assert out.shape == x.shape
    sum_dy, sum_dy_xhat, gr = triton_batch_norm.batch_norm_add_relu_bwd_reduce(x, x, x, rm, rv, EPS, True, True)
    assert torch.equal(sum_dy, torch.zeros(3, device=DEVICE)) and torch.equal(sum_dy_xhat, sum_dy)
    assert gr.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_batch_norm_combine_stats(dtype):
    """Sync BatchNorm: per-process (mean, var, count) rows, one with no values, combined in fp64."""
    gen = torch.Generator().manual_seed(8)
    c, counts = 5, [12.0, 0.0, 7.0, 30.0]
    chunks = [randn(int(n), c, dtype=torch.float64, gen=gen, scale=1 + i, shift=i) for i, n in enumerate(counts)]
    rows = []
    for chunk, n in zip(chunks, counts):
        m = chunk.mean(0) if n else torch.full((c,), float("nan"), dtype=torch.float64, device=DEVICE)
        v = chunk.var(0, unbiased=False) if n else torch.full((c,), float("nan"), dtype=torch.float64, device=DEVICE)
        rows.append(torch.cat([m, v, torch.tensor([n], dtype=torch.float64, device=DEVICE)]))
    stats = torch.stack(rows).to(dtype)
    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    mean, var = triton_batch_norm.batch_norm_combine_stats(stats, rm, rv, 0.1)
    assert mean.dtype == dtype and var.dtype == dtype
    stats64 = stats.double()  # the float64 combination of exactly the rows given
    n = stats64[:, -1]
    live = n > 0
    mean64 = (n[live, None] * stats64[live, :c]).sum(0) / n.sum()
    var64 = (n[live, None] * (stats64[live, c : 2 * c] + (stats64[live, :c] - mean64) ** 2)).sum(0) / n.sum()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(mean.double(), mean64, **tol)
    torch.testing.assert_close(var.double(), var64, **tol)
    total = n.sum()
    torch.testing.assert_close(rm.double(), 0.1 * mean64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var64 * total / (total - 1), rtol=1e-6, atol=1e-7)
    everything = torch.cat([ch for ch in chunks if ch.numel()])
    torch.testing.assert_close(mean64, everything.mean(0))
    torch.testing.assert_close(var64, everything.var(0, unbiased=False))


def test_batch_norm_registered_ops_check_their_arguments():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="dense"):
        torch.ops.fusedres.batch_norm_stats_triton(x[:, :, ::2], None, None, 0.1)
    with pytest.raises(ValueError, match="together"):
        torch.ops.fusedres.batch_norm_stats_triton(x, torch.zeros(3, device=DEVICE), None, 0.1)
    with pytest.raises(ValueError, match="memory format"):
        torch.ops.fusedres.batch_norm_add_relu_fwd_triton(
            x, x.contiguous(memory_format=torch.channels_last), None, None, None, None, EPS, True, False, 0
        )
    with pytest.raises(TypeError, match="statistics dtype"):
        c = torch.zeros(3, dtype=torch.float64, device=DEVICE)
        torch.ops.fusedres.batch_norm_add_relu_bwd_input_triton(x, None, x, None, None, EPS, None, c, c, 32, True, True)
    with pytest.raises(ValueError, match=r"\(W, 2C \+ 1\)"):
        torch.ops.fusedres.batch_norm_combine_stats_triton(torch.zeros(2, 4, device=DEVICE), None, None, 0.1)


def test_batch_norm_opcheck():
    gen = torch.Generator().manual_seed(9)
    x = randn(2, 3, 4, 5, gen=gen)
    xc = to_layout(x, True)
    w, b, rm, rv = randn(3, gen=gen), randn(3, gen=gen), torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    ops = torch.ops.fusedres
    torch.library.opcheck(ops.batch_norm_stats_triton, (xc, rm, rv, 0.1))
    torch.library.opcheck(ops.batch_norm_stats_triton, (x.bfloat16(), None, None, 0.1))
    stats = torch.tensor([[1.0, 2.0, 0.5, 1.0, 10.0], [3.0, 4.0, 2.0, 3.0, 30.0]], device=DEVICE)
    torch.library.opcheck(ops.batch_norm_combine_stats_triton, (stats, rm[:2].clone(), rv[:2].clone(), 0.1))
    mean, var = ops.batch_norm_stats_triton(x, None, None, 0.1)
    torch.library.opcheck(ops.batch_norm_add_relu_fwd_triton, (xc, xc, w, b, mean, var, EPS, True, True, 40))
    torch.library.opcheck(ops.batch_norm_add_relu_fwd_triton, (x, None, None, b, None, None, EPS, False, False, 40))
    out = ops.batch_norm_add_relu_fwd_triton(x, x, w, b, mean, var, EPS, True, True, 40)
    torch.library.opcheck(ops.batch_norm_add_relu_bwd_reduce_triton, (x, out, x, mean, var, EPS, True, True))
    sums = ops.batch_norm_add_relu_bwd_reduce_triton(x, out, x, mean, var, EPS, True, False)[:2]
    torch.library.opcheck(
        ops.batch_norm_add_relu_bwd_input_triton, (x, out, x, mean, var, EPS, w, *sums, 40, True, True)
    )
    torch.library.opcheck(
        ops.batch_norm_add_relu_bwd_input_triton, (x, None, x, rm, rv, EPS, w, None, None, 40, False, False)
    )


# --- compiled for a GPU --------------------------------------------------------------------------


def compile_for_sm90() -> None:
    """Compiles the specializations the launchers pick for representative shapes for sm_90 and
    checks ptxas's register report for spills. Run without the interpreter: the launchers get a
    `launch` that, instead of launching, binds the arguments as Triton does (Triton internals)
    and compiles; CPU tensors stand in for CUDA ones (only dtypes, alignment and ints matter)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    an, bn = triton_add_norm, triton_batch_norm
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    seen = set()

    def compile_one(kernel, args, kwargs):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
        key = (kernel.__name__, str(signature), str(constexprs), options.num_warps)
        if key in seen:
            return
        seen.add(key)
        src = ASTSource(kernel, signature, constexprs, attrs)
        ptx = triton.compile(src, target=target, options=options.__dict__).asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        regs = re.findall(r"Used (\d+) registers", log.stderr)
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.stderr)]
        named = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()}
        print(kernel.__name__, named, "warps", options.num_warps, "regs", regs, "spills", spills)
        assert log.returncode == 0 and spills and not any(spills), log.stderr

    class compile_instead:  # noqa: N801 (used as `launch(kernel)[grid](*args)`)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: compile_one(self.kernel, args, kwargs)

    for dtype, n in ((torch.float32, 4096), (torch.bfloat16, 8192), (torch.float64, 8192), (torch.float32, 20000)):
        for rms in (False, True):
            x = torch.randn(4, n, dtype=dtype)
            w = torch.ones(n, dtype=param_dtype(dtype))
            b = None if rms else w
            y, h, mean, rstd, _ = an.add_norm_fwd(*FwdArgs(x, x, w, b, EPS, rms, dtype, True), launch=compile_instead)
            bwd = BwdArgs(x, x, h, None, None, dtype, w, b, None if rms else mean, rstd, rms, None)
            an.add_norm_bwd(*bwd, launch=compile_instead)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for channels_last in (False, True):
            x = to_layout(torch.randn(4, 64, 14, 14, dtype=dtype), channels_last)
            p = torch.ones(64, dtype=param_dtype(dtype))
            mean, var = bn.batch_norm_stats(x, p, p.clone(), 0.1, launch=compile_instead)
            out = bn.batch_norm_add_relu_fwd(x, x, p, p, mean, var, EPS, True, True, 4, launch=compile_instead)
            sums = bn.batch_norm_add_relu_bwd_reduce(x, out, x, mean, var, EPS, True, True, launch=compile_instead)[:2]
            bn.batch_norm_add_relu_bwd_input(
                x, None, x, mean, var, EPS, p, *sums, 4, True, True, launch=compile_instead
            )
    bn.batch_norm_combine_stats(torch.ones(2, 129), None, None, 0.1, launch=compile_instead)
    print(len(seen), "specializations compiled")


def test_kernels_compile_for_sm90(tmp_path):
    """The specializations the launchers pick for representative shapes (fp32 / bf16 / fp64,
    narrow and wide rows, both BatchNorm layouts) compile for sm_90 without a GPU and spill no
    registers (compile_for_sm90, in a process without the interpreter). It uses Triton internals,
    so it skips where those moved."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    tests = os.path.dirname(os.path.abspath(__file__))
    command = (
        f"import sys; sys.path.insert(0, {tests!r}); "
        "from test_triton_launchers import compile_for_sm90; compile_for_sm90()"
    )
    done = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 and ("ImportError" in done.stderr or "AttributeError" in done.stderr):
        pytest.skip(f"Triton's compile internals differ here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
