"""Conv -> BatchNorm with fixed statistics (-> add) (-> ReLU) as one library call
(fusedres/ops/conv_epilogue.py): parity with eager against a float64 copy in every layout, dtype
and tail; the in-place residual; the plan cache; the fallback where torch lacks the operators;
FrozenBatchNorm2d in fuse(); fine-tuning grads; tracing and export."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_checkpoints_load_both_ways, assert_close_to_ref, assert_model_parity, assert_within_rule
from torch import nn

import fusedres
from fusedres.nn.batch_norm import conv_bn_add_relu
from fusedres.ops import conv_epilogue as ce

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

# (in, out, kernel, stride, padding, dilation, groups, conv bias)
CONVS = {
    "3x3": (8, 12, 3, 1, 1, 1, 1, False),
    "1x1-s2": (8, 16, 1, 2, 0, 1, 1, False),
    "3x3-d2-g4": (8, 8, 3, 1, 2, 2, 4, False),
    "7x7-s2-bias": (3, 8, 7, 2, 3, 1, 1, True),
}
# (residual, relu, consume_residual)
TAILS = {
    "relu": (False, True, False),
    "add-relu": (True, True, False),
    "add-relu-consumed": (True, True, True),
    "bn-only": (False, False, False),
    "add": (True, False, False),
}
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def randomize_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    c = bn.running_mean.shape[0]
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.2)
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return bn


def make_pair(spec, frozen: bool = False, seed: int = 0) -> tuple[nn.Conv2d, nn.Module]:
    cin, cout, k, stride, padding, dilation, groups, bias = spec
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
    bn = randomize_bn(FrozenBatchNorm2d(cout) if frozen else nn.BatchNorm2d(cout), seed).eval()
    return conv, bn


def inputs(spec, tail, dtype, fmt, seed=1):
    cin, cout, k, stride, padding, dilation, _groups, _bias = spec
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, cin, 11, 13, generator=gen, dtype=torch.float64)
    h = (11 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w = (13 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    r = torch.randn(3, cout, h, w, generator=gen, dtype=torch.float64) if tail[0] else None
    cast = lambda t: None if t is None else t.to(dtype).contiguous(memory_format=fmt)  # noqa: E731
    return cast(x), cast(r)


def eager(conv, bn, x, r, relu):
    out = bn(conv(x))
    out = out if r is None else out + r
    return F.relu(out) if relu else out


def plan_kinds(bn) -> set[int]:
    cache = bn.__dict__.get(ce.CACHE_ATTR)
    return {p.kind for p in cache.plans.values()} if cache is not None else set()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("spec", CONVS)
def test_fused_call_matches_eager(spec, tail, dtype, layout):
    spec, tail, fmt = CONVS[spec], TAILS[tail], LAYOUTS[layout]
    has_residual, relu, consume = tail
    conv, bn = make_pair(spec)
    x, r = inputs(spec, tail, dtype, fmt)
    r_before = r.clone() if r is not None else None
    mods = [m.to(dtype) for m in (conv, bn)]
    ref_mods = [copy.deepcopy(m).double() for m in mods]
    with torch.no_grad():
        want = eager(*mods, x, r, relu)
        ref = eager(*ref_mods, x.double(), r.double() if r is not None else None, relu)
        got = conv_bn_add_relu(*mods, x, r, relu=relu, consume_residual=consume)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=fmt), "the output lost the input's memory format"
    assert_close_to_ref("out", got, want, ref, dtype)
    if dtype != torch.float64 and ce.has_onednn():
        assert plan_kinds(bn) & {ce._ONEDNN_PACKED, ce._ONEDNN_DENSE}, "oneDNN's fused call was not taken"
    if has_residual and not consume:
        assert torch.equal(r, r_before), "a residual the caller keeps was written to"
        assert got.data_ptr() != r.data_ptr()


def test_consumed_residual_is_accumulated_in_place():
    """channels_last fp32 with a dead residual: the result is written into the residual's buffer
    (a oneDNN sum post-op); the same call without consume_residual leaves it alone."""
    if not ce.has_onednn():
        pytest.skip(f"no oneDNN: {ce.ONEDNN_ERROR}")
    spec = CONVS["3x3"]
    conv, bn = make_pair(spec)
    x, r = inputs(spec, TAILS["add-relu"], torch.float32, torch.channels_last)
    with torch.no_grad():
        kept = r.clone()
        out = conv_bn_add_relu(conv, bn, x, kept, consume_residual=False)
        assert torch.equal(kept, r) and out.data_ptr() != kept.data_ptr()
        dead = r.clone()
        out2 = conv_bn_add_relu(conv, bn, x, dead, consume_residual=True)
    assert out2.data_ptr() == dead.data_ptr()
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


# --- the cache -------------------------------------------------------------------------------------


class _CountingReorder:
    def __init__(self, reorder):
        self.reorder, self.calls = reorder, 0

    def __call__(self, *args):
        self.calls += 1
        return self.reorder(*args)


@pytest.fixture
def counted_reorders(monkeypatch):
    if not ce.has_onednn():
        pytest.skip(f"no oneDNN: {ce.ONEDNN_ERROR}")
    counter = _CountingReorder(ce.ONEDNN.reorder)
    monkeypatch.setattr(ce, "ONEDNN", ce.ONEDNN._replace(reorder=counter))
    return counter


def _mutations():
    def swap_data(conv, bn):
        bn.weight.data = bn.weight.data * 1.5  # keeps the Parameter's identity and version

    def load(conv, bn):
        state = {k: v * 1.1 if v.is_floating_point() else v for k, v in bn.state_dict().items()}
        bn.load_state_dict(state)

    def replace_buffer(conv, bn):
        bn.running_var = bn.running_var + 0.3  # a new tensor where the old one was

    return {
        "conv-weight-inplace": lambda conv, bn: conv.weight.mul_(1.25),
        "running-var-inplace": lambda conv, bn: bn.running_var.add_(0.5),
        "bn-bias-inplace": lambda conv, bn: bn.bias.sub_(0.1),
        "data-swap": swap_data,
        "load-state-dict": load,
        "buffer-replaced": replace_buffer,
        "eps": lambda conv, bn: setattr(bn, "eps", 0.5),
    }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_cache_follows_every_change(mutation, counted_reorders):
    conv, bn = make_pair(CONVS["3x3"])
    x, _ = inputs(CONVS["3x3"], TAILS["relu"], torch.float32, torch.channels_last)
    with torch.no_grad():
        conv_bn_add_relu(conv, bn, x)
        conv_bn_add_relu(conv, bn, x)
        assert counted_reorders.calls == 1, "the weight was packed again for an unchanged state"
        _mutations()[mutation](conv, bn)
        got = conv_bn_add_relu(conv, bn, x)
        want = eager(conv, bn, x, None, True)
    assert counted_reorders.calls == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cache_is_bounded_and_keyed_by_input(counted_reorders):
    conv, bn = make_pair(CONVS["3x3"])
    with torch.no_grad():
        for n in range(1, ce.MAX_PLANS + 4):
            x = torch.randn(n, 8, 9, 9).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(conv_bn_add_relu(conv, bn, x), eager(conv, bn, x, None, True))
    assert len(bn.__dict__[ce.CACHE_ATTR].plans) == ce.MAX_PLANS
    assert counted_reorders.calls == ce.MAX_PLANS + 3
    assert all(not k.startswith("_") for k in bn.state_dict())


def test_fused_model_copies_and_saves_after_inference():
    """The plans (opaque oneDNN tensors) are never copied or pickled: a deep copy and a saved
    model start without them and compute the same."""
    model = fusedres.fuse(tiny_resnet()).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        clone = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (clone, loaded):
            torch.testing.assert_close(m(x), want, rtol=0, atol=0)


# --- without the operators ----------------------------------------------------------------------


class _Namespace:
    def __init__(self, **ops):
        self.__dict__.update(ops)


def test_probe_says_why_the_operators_are_missing():
    assert ce.probe_onednn(available=False) == (None, "torch is built without oneDNN (mkldnn)")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    real = torch.ops.mkldnn
    partial = _Namespace(
        _convolution_pointwise=real._convolution_pointwise, _reorder_convolution_weight=real._reorder_convolution_weight
    )
    ops, why = ce.probe_onednn(partial)
    assert ops is None and "no torch.ops.mkldnn._convolution_pointwise_.binary" in why
    other = _Namespace(
        _convolution_pointwise=_Namespace(default=real._convolution_pointwise.binary, binary=None),
        _convolution_pointwise_=real._convolution_pointwise_,
        _reorder_convolution_weight=real._reorder_convolution_weight,
    )
    ops, why = ce.probe_onednn(other)
    assert ops is None and "takes (X other W B" in why
    ops, why = ce.probe_onednn(real)
    assert ops is not None and why is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tail", ["add-relu", "add-relu-consumed", "bn-only"])
def test_without_the_operators_the_folded_path_runs(tail, layout):
    spec, fmt = CONVS["3x3"], LAYOUTS[layout]
    has_residual, relu, consume = TAILS[tail]
    conv, bn = make_pair(spec)
    x, r = inputs(spec, TAILS[tail], torch.float32, fmt)
    ref_mods = [copy.deepcopy(m).double() for m in (conv, bn)]
    with torch.no_grad(), ce.without_library_calls():
        got = conv_bn_add_relu(conv, bn, x, r.clone() if r is not None else None, relu=relu, consume_residual=consume)
        assert plan_kinds(bn) == {ce._FOLDED}
    want = eager(conv, bn, x, r, relu)
    ref = eager(*ref_mods, x.double(), r.double() if r is not None else None, relu)
    assert_close_to_ref("out", got, want, ref, torch.float32)
    assert got.is_contiguous(memory_format=fmt)
    with torch.no_grad():  # the switch back: the library call again, not the plan made without it
        conv_bn_add_relu(conv, bn, x, r, relu=relu)
    if ce.has_onednn():
        assert ce._FOLDED not in plan_kinds(bn)


def test_autocast_takes_the_folded_path():
    conv, bn = make_pair(CONVS["3x3"])
    x, _ = inputs(CONVS["3x3"], TAILS["relu"], torch.float32, torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv_bn_add_relu(conv, bn, x)
        want = eager(conv, bn, x, None, True)
    assert plan_kinds(bn) == {ce._FOLDED} and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


# --- with grad: frozen BN, training conv ---------------------------------------------------------


def _frozen_call(path):
    """The frozen-BN conv under autograd on one eager path: the C++ node or the Python Function."""
    if path == "fastpath":
        if not ce.has_fastpath():
            pytest.skip(f"fusedres._fastpath: {fusedres._extension.FASTPATH_ERROR}")
        return lambda x, r, cw, cb, g, b, mean, var, args, relu: ce._fastpath(
            x, r, cw, cb, g, b, mean, var, 1e-5, *args, relu, False, False
        )
    return lambda x, r, cw, cb, g, b, mean, var, args, relu: ce._FrozenConvBN.apply(
        x, r, cw, cb, g, b, (mean, var, 1e-5, args, relu)
    )


@pytest.mark.parametrize("path", ["fastpath", "function"])
@pytest.mark.parametrize("tail", ["relu", "add-relu", "bn-only"])
@pytest.mark.parametrize("conv_bias", [False, True], ids=["nobias", "bias"])
def test_frozen_gradcheck_float64(tail, conv_bias, path):
    has_residual, relu, _ = TAILS[tail]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, 5, 6, dtype=torch.float64, requires_grad=True) if has_residual else None
    cw = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(6, dtype=torch.float64, requires_grad=True) if conv_bias else None
    gamma = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(6, dtype=torch.float64) * 0.1, torch.rand(6, dtype=torch.float64) + 0.5
    call = _frozen_call(path)
    fn = lambda x, r, cw, cb, g, b: call(x, r, cw, cb, g, b, mean, var, ([1, 1], [1, 1], [1, 1], 2), relu)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, r, cw, cb, gamma, beta), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mask_and_sum_matches_torch(backend, layout):
    """The frozen backward's first pass: the grad masked by the ReLU (out > 0) and its per-channel
    sum, by the BatchNorm backward kernel or by torch ops."""
    fmt = LAYOUTS[layout]
    out = torch.relu(torch.randn(3, 5, 4, 6)).contiguous(memory_format=fmt)
    grad = torch.randn(3, 5, 4, 6)  # NCHW whatever out's layout
    with fusedres.use_backend(backend):
        g, total = ce._mask_and_sum(grad, out, True)
    want = torch.where(out > 0, grad, 0)
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    torch.testing.assert_close(total, want.sum((0, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_grads_match_eager(dtype, layout, device, autograd_path):
    """The fused forward and the custom backward against eager autograd, both judged by their
    distance to float64: input, residual, conv weight and bias, BN's gamma and beta."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec, fmt = CONVS["7x7-s2-bias"], LAYOUTS[layout]
    conv, bn = make_pair(spec)
    x, r = (t.to(device) for t in inputs(spec, TAILS["add-relu"], dtype, fmt))
    grad = torch.randn(r.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    results = []
    for which in ("ours", "eager", "ref"):
        c, b = (copy.deepcopy(m).to(device, torch.float64 if which == "ref" else dtype) for m in (conv, bn))
        xi, ri = (t.detach().to(c.weight.dtype).requires_grad_() for t in (x, r))
        out = conv_bn_add_relu(c, b, xi, ri) if which == "ours" else eager(c, b, xi, ri, True)
        if which == "ours":
            assert out.is_contiguous(memory_format=fmt), "the output lost the input's memory format"
        params = [xi, ri, c.weight, c.bias, b.weight, b.bias]
        results.append((out, *torch.autograd.grad(out, params, grad.to(out.dtype))))
    names = ("out", "dx", "dresidual", "dconv_weight", "dconv_bias", "dgamma", "dbeta")
    for name, ours, want, ref in zip(names, *results):
        assert ours.dtype == want.dtype, name
        assert_close_to_ref(name, ours, want, ref, dtype)


def frozen_resnet(block=resnet.BasicBlock, layers=(1, 1, 1, 1), **kwargs) -> resnet.ResNet:
    torch.manual_seed(0)
    model = resnet.ResNet(block, list(layers), num_classes=7, norm_layer=FrozenBatchNorm2d, **kwargs)
    for i, m in enumerate(m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)):
        randomize_bn(m, i)
    return model


def tiny_resnet() -> resnet.ResNet:
    return tiny_resnet_layers((1, 1, 1, 1))


def tiny_resnet_layers(layers) -> resnet.ResNet:
    torch.manual_seed(0)
    model = resnet.ResNet(resnet.BasicBlock, list(layers), num_classes=7)
    for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        randomize_bn(m, i)
    return model


def test_frozen_resnet50_is_fused_every_block_with_parity():
    original = resnet.resnet50(num_classes=10, norm_layer=FrozenBatchNorm2d)
    for i, m in enumerate(m for m in original.modules() if isinstance(m, FrozenBatchNorm2d)):
        randomize_bn(m, i)
    fused, report = fusedres.fuse(copy.deepcopy(original), report=True)
    assert len(report.replaced) == 17 and not report.skipped, str(report)
    assert list(fused.state_dict()) == list(original.state_dict())
    assert_checkpoints_load_both_ways(fused, copy.deepcopy(original))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    models = [fused, original, copy.deepcopy(original).double()]
    with torch.no_grad():
        outs = [m.train()(x.to(next(m.parameters()).dtype)) for m in models]  # FrozenBN ignores train()
    assert_within_rule("logits", *outs, atol=1e-5)


@pytest.mark.parametrize("block", [resnet.BasicBlock, resnet.Bottleneck], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("norm", ["frozen", "bn-eval"])
def test_fine_tuning_steps_match_the_original(block, norm, autograd_path):
    """A detection-style fine-tuning step: FrozenBatchNorm2d (or BatchNorm2d in eval with its
    affine parameters training) under training convs. Float64: outputs, every grad and the
    parameters after two SGD steps agree with the unfused model to 1e-9."""
    original = frozen_resnet(block) if norm == "frozen" else tiny_resnet()
    original = original.double().to(memory_format=torch.channels_last)
    models = (fusedres.fuse(copy.deepcopy(original)), original)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(3, 3, 40, 40, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 7, (3,), generator=gen)
        outs = []
        for model, opt in zip(models, optimizers):
            model.train(norm == "frozen")  # BatchNorm2d: eval, while its conv trains
            opt.zero_grad()
            outs.append(model(x))
            F.cross_entropy(outs[-1], target).backward()
        torch.testing.assert_close(*outs, rtol=1e-9, atol=1e-9)
        for (name, pa), pb in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-9, msg=f"{name}.grad")
        for opt in optimizers:
            opt.step()


def test_fine_tuning_step_fp32_is_within_the_rule(autograd_path):
    """The same step in fp32 (oneDNN's forward, the custom backward) against a float64 copy."""
    original = frozen_resnet(resnet.Bottleneck).to(memory_format=torch.channels_last).train()
    fused, reference = fusedres.fuse(copy.deepcopy(original)), copy.deepcopy(original).double()
    x = torch.randn(4, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 7, (4,), generator=torch.Generator().manual_seed(0))
    for model in (fused, original, reference):
        F.cross_entropy(model(x.to(next(model.parameters()).dtype)), target).backward()
    assert_model_parity(fused, original, reference)


def test_timm_frozen_resnet_is_fused():
    timm = pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(0)
    original = timm.create_model("resnet18", pretrained=False, num_classes=5)
    for i, m in enumerate(m for m in original.modules() if isinstance(m, nn.BatchNorm2d)):
        randomize_bn(m, i)
    original = freeze_batch_norm_2d(original).double()
    fused, report = fusedres.fuse(copy.deepcopy(original), report=True)
    assert len(report.replaced) == 8 and not report.skipped, str(report)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-9, atol=1e-9)


# --- what may hold the identity --------------------------------------------------------------------


def test_hooked_downsample_output_is_never_written_over():
    original = tiny_resnet().eval().to(memory_format=torch.channels_last)
    fused = fusedres.fuse(copy.deepcopy(original))
    seen = {}
    for name, model in (("fused", fused), ("original", original)):
        model.layer2[0].downsample.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        outs = [fused(x), original(x)]
    torch.testing.assert_close(*outs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["fused"], seen["original"], rtol=1e-4, atol=1e-4)


def test_resnet_loop_accumulates_into_dead_block_inputs(monkeypatch):
    """The fused ResNet runs its blocks itself in inference: each block's input is dead after it, so
    every block tail accumulates in place, into the downsample's output or into the block's input
    (as Inductor does); blocks called by anyone else leave their input alone."""
    if not ce.has_onednn():
        pytest.skip(f"no oneDNN: {ce.ONEDNN_ERROR}")
    in_place = []
    binary_ = ce.ONEDNN.binary_
    monkeypatch.setattr(ce, "ONEDNN", ce.ONEDNN._replace(binary_=lambda *a: in_place.append(1) or binary_(*a)))
    original = tiny_resnet_layers((2, 2, 2, 2)).eval().to(memory_format=torch.channels_last)
    fused = fusedres.fuse(copy.deepcopy(original))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)  # layer4 2x2: channels_last
    with torch.no_grad():
        want = original(x)
        torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4)
        assert len(in_place) == 8  # every block's tail
        h = fused.maxpool(fused.relu(fused.bn1(fused.conv1(x))))
        kept = h.clone()
        in_place.clear()
        fused.layer1(h)  # called by the user: h is theirs
        assert torch.equal(h, kept)
        # the out-of-place op, where this torch's works (torch 2.11's: into a copy of h instead)
        assert in_place == [] or not ce._OUT_OF_PLACE_BINARY[0]


@pytest.mark.parametrize("where", ["block", "layer", "maxpool", "global"])
def test_a_hook_anywhere_on_the_chain_keeps_block_inputs_intact(where):
    """A forward hook may keep an activation: then the blocks run through their modules and no
    block input is written over."""
    original = tiny_resnet_layers((2, 2, 2, 2)).eval().to(memory_format=torch.channels_last)
    fused = fusedres.fuse(copy.deepcopy(original))
    kept = []
    hook = lambda module, inputs: kept.append((inputs[0], inputs[0].clone()))  # noqa: E731
    target = {"block": fused.layer1[1], "layer": fused.layer2, "maxpool": fused.maxpool}.get(where)
    handle = (
        target.register_forward_pre_hook(hook)
        if target is not None
        else torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, i: hook(m, i) if isinstance(m, resnet.BasicBlock) else None
        )
    )
    try:
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-4)
    finally:
        handle.remove()
    assert kept and all(torch.equal(t, copy_) for t, copy_ in kept), "a hooked activation was written over"


def test_feature_extractor_outputs_match():
    from torchvision.models._utils import IntermediateLayerGetter

    original = tiny_resnet().eval().to(memory_format=torch.channels_last)
    layers = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    getters = [IntermediateLayerGetter(m, layers) for m in (fusedres.fuse(copy.deepcopy(original)), original)]
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        features = [g(x) for g in getters]
    for key in layers.values():
        torch.testing.assert_close(features[0][key], features[1][key], rtol=1e-4, atol=1e-4, msg=key)


# --- tracing, export, compile -----------------------------------------------------------------------


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("norm", ["bn", "frozen"])
def test_jit_trace_of_the_fused_eval_model(grad, norm):
    original = (tiny_resnet() if norm == "bn" else frozen_resnet()).eval()
    fused = fusedres.fuse(copy.deepcopy(original))
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(fused, x)  # the trace's sanity check runs it again
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert not any(k.startswith(("fusedres::", "mkldnn::")) for k in kinds), kinds  # portable aten
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x2 = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x2), original(x2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["bn", "frozen"])
def test_export_of_the_fused_eval_model(norm):
    original = (tiny_resnet() if norm == "bn" else frozen_resnet()).eval()
    fused = fusedres.fuse(copy.deepcopy(original))
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(fused, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), original(x), rtol=1e-4, atol=1e-4)


def test_compiles_fullgraph_with_frozen_bn():
    original = frozen_resnet().double().train()
    fused = fusedres.fuse(copy.deepcopy(original))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outs = [compiled(x), original(x)]
    torch.testing.assert_close(*outs, rtol=1e-9, atol=1e-9)
    for out in outs:
        out.sum().backward()
    for (name, pa), pb in zip(fused.named_parameters(), original.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-9, msg=name)


# --- hosts and devices this one lacks ------------------------------------------------------------


@pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU's oneDNN has no bf16 kernels (eager bf16 takes aten's reference conv)",
)
@pytest.mark.parametrize("tail", ["add-relu", "add-relu-consumed", "relu"])
def test_native_bf16_nchw_goes_channels_last(tail):
    """oneDNN's bf16 NCHW path ends in an aten add_relu without a bf16 kernel: never reached."""
    test_fused_call_matches_eager("3x3", tail, torch.bfloat16, "nchw")
    conv, bn = make_pair(CONVS["3x3"])
    x, r = inputs(CONVS["3x3"], TAILS[tail], torch.bfloat16, torch.contiguous_format)
    with torch.no_grad():
        conv_bn_add_relu(conv.bfloat16(), bn.bfloat16(), x, r, consume_residual=TAILS[tail][2])
    assert plan_kinds(bn) == {ce._ONEDNN_PACKED}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tail", TAILS)
def test_cudnn_fused_call_matches_eager(tail, dtype, layout):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec, fmt = CONVS["3x3"], LAYOUTS[layout]
    has_residual, relu, consume = TAILS[tail]
    conv, bn = (m.to("cuda", dtype) for m in make_pair(spec))
    x, r = (t.cuda() if t is not None else None for t in inputs(spec, TAILS[tail], dtype, fmt))
    ref_mods = [copy.deepcopy(m).double() for m in (conv, bn)]
    with torch.no_grad():
        want = eager(conv, bn, x, r, relu)
        ref = eager(*ref_mods, x.double(), r.double() if r is not None else None, relu)
        got = conv_bn_add_relu(conv, bn, x, r, relu=relu, consume_residual=consume)
    if torch.backends.cudnn.is_available():
        assert plan_kinds(bn) == {ce._CUDNN}
    assert got.is_contiguous(memory_format=fmt)
    assert_close_to_ref("out", got, want, ref, dtype)
