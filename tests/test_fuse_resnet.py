"""fuse() on torchvision ResNets: what is fused, parity with the original in train and eval,
checkpoints in both directions, unfuse(), and variants that must be left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_checkpoints_load_both_ways, assert_model_parity, assert_within_rule
from torch import nn

import fusedres

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet  # noqa: E402

# Blocks per architecture: BasicBlock / Bottleneck counts + the stem.
ARCHS = {
    "resnet18": 8 + 1,
    "resnet34": 16 + 1,
    "resnet50": 16 + 1,
    "resnet101": 33 + 1,
    "resnet152": 50 + 1,
    "resnext50_32x4d": 16 + 1,
    "wide_resnet50_2": 16 + 1,
}


def tiny_resnet(block=resnet.BasicBlock, layers=(1, 1, 1, 1), **kwargs) -> resnet.ResNet:
    """The torchvision ResNet class at the smallest depth: every block kind, stride and downsample."""
    torch.manual_seed(0)
    model = resnet.ResNet(block, list(layers), num_classes=7, **kwargs)
    # Non-trivial BN parameters and statistics, so folding and the affine paths are exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("arch,blocks", ARCHS.items(), ids=list(ARCHS))
def test_every_block_of_the_real_architectures_is_fused(arch, blocks):
    model = getattr(resnet, arch)(num_classes=10)
    keys = list(model.state_dict())
    model, report = fusedres.fuse(model, report=True)
    assert len(report.replaced) == blocks and not report.skipped, str(report)
    assert list(model.state_dict()) == keys


def three_copies(model: nn.Module, train: bool = True):
    """(fused, original, float64 original): the fused model is judged by its distance to the
    float64 copy against the original's own distance."""
    model.train(train)
    return fusedres.fuse(copy.deepcopy(model)), model, copy.deepcopy(model).double()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(
    "block,kwargs",
    [(resnet.BasicBlock, {}), (resnet.Bottleneck, {}), (resnet.Bottleneck, {"groups": 4, "width_per_group": 8})],
    ids=["basic", "bottleneck", "resnext"],
)
def test_training_steps_match_the_original(block, kwargs, channels_last):
    """Outputs, every grad, and after two SGD steps the parameters and running stats. In float64:
    this checks the rewiring, and float64 keeps ReLU masks from flipping between the two models
    (in fp32 a value at the kink may land on either side, and one flip moves a whole grad)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    original = tiny_resnet(block, **kwargs).double().to(memory_format=fmt)
    models = (fusedres.fuse(copy.deepcopy(original)), original)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 3, 40, 40, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
        target = torch.randint(0, 7, (4,), generator=gen)
        outs = []
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            outs.append(model(x))
            nn.functional.cross_entropy(outs[-1], target).backward()
        torch.testing.assert_close(*outs, rtol=1e-9, atol=1e-9)
        assert_models_close(*models)
        for opt in optimizers:
            opt.step()
    assert_models_close(*models)


def assert_models_close(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-9, msg=f"{name}.grad")
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("block", [resnet.BasicBlock, resnet.Bottleneck], ids=["basic", "bottleneck"])
def test_eval_matches_the_original(block):
    """Eval folds BN into the convs; outputs, input grads and weight grads match the unfolded
    original (no_grad takes the cached folded weights)."""
    models = three_copies(tiny_resnet(block), train=False)
    x = torch.randn(3, 3, 36, 36, dtype=torch.float64)
    xs = [x.to(next(m.parameters()).dtype).requires_grad_() for m in models]
    outs = [m(t) for m, t in zip(models, xs)]
    assert_within_rule("logits", *outs, atol=1e-5)
    for out in outs:
        out.square().sum().backward()
    assert_within_rule("dx", *(t.grad for t in xs), atol=1e-5)
    assert_model_parity(*models)
    with torch.no_grad():
        assert_within_rule("logits (no_grad)", *(m(t) for m, t in zip(models, xs)), atol=1e-5)


def test_checkpoints_load_both_ways():
    original = tiny_resnet()
    fused = fusedres.fuse(tiny_resnet())
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p))
    assert_checkpoints_load_both_ways(fused, original)


def test_unfuse_restores_the_original_classes_and_results():
    original = tiny_resnet().eval()
    model = fusedres.fuse(copy.deepcopy(original))
    assert type(model.layer1[0]) is not resnet.BasicBlock and isinstance(model.layer1[0], resnet.BasicBlock)
    fusedres.unfuse(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert all("_fusedres_folded" not in m.__dict__ for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_fuse_is_idempotent_and_inplace_false_copies():
    original = tiny_resnet()
    fused, report = fusedres.fuse(original, inplace=False, report=True)
    assert fused is not original and len(report.replaced) == 5
    assert all(type(m).__module__.startswith(("torch", "torchvision")) for m in original.modules())
    again, report = fusedres.fuse(fused, report=True)
    assert again is fused and not report.replaced and not report.skipped


def test_nothing_to_fuse_returns_the_model_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    types = [type(m) for m in model.modules()]
    out, report = fusedres.fuse(model, report=True)
    assert out is model and [type(m) for m in model.modules()] == types
    assert not report and report.replaced == [] and report.skipped == []


class _MyBlock(resnet.BasicBlock):
    pass


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda b: setattr(b, "relu", nn.GELU()), "activation is GELU"),
        (lambda b: setattr(b, "bn2", nn.GroupNorm(4, b.bn2.num_features)), "bn2 is GroupNorm"),
        (lambda b: setattr(b, "conv1", nn.Sequential(b.conv1)), "conv1 is Sequential"),
    ],
    ids=["gelu", "groupnorm", "wrapped-conv"],
)
def test_unsupported_block_variants_are_skipped_with_the_reason(change, reason):
    model = tiny_resnet()
    change(model.layer2[0])
    x = torch.randn(2, 3, 32, 32)
    expected = copy.deepcopy(model).eval()(x)
    model, report = fusedres.fuse(model, report=True)
    assert [name for name, _ in report.skipped] == ["layer2.0"]
    assert reason in report.skipped[0][1]
    assert type(model.layer2[0]) is resnet.BasicBlock and len(report.replaced) == 4
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-4, atol=1e-4)


def test_subclassed_blocks_are_skipped():
    block = _MyBlock(8, 8)
    model = nn.Sequential(block)
    _, report = fusedres.fuse(model, report=True)
    assert type(block) is _MyBlock and "subclasses torchvision.models.resnet.BasicBlock" in report.skipped[0][1]


def test_sync_batch_norm_blocks_are_fused():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_resnet())
    _, report = fusedres.fuse(model, report=True)
    assert len(report.replaced) == 5 and not report.skipped


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiles_fullgraph(training):
    original = tiny_resnet().double().train(training)
    fused = fusedres.fuse(copy.deepcopy(original))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outs = [compiled(x), original(x)]
    torch.testing.assert_close(*outs, rtol=1e-9, atol=1e-9)
    for out in outs:
        out.sum().backward()
    assert_models_close(fused, original)


@pytest.mark.parametrize("arch,blocks", [("resnet18", 8), ("resnet26d", 8), ("seresnet18", 0)])
def test_timm_resnets(arch, blocks):
    """timm's blocks are fused when their extras (SE, DropBlock, anti-aliasing) are off; others
    are skipped with the reason. Float64, with random (not zero-init) BN weights."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = timm.create_model(arch, pretrained=False, num_classes=5).double()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    fused, report = fusedres.fuse(copy.deepcopy(original), report=True)
    assert len(report.replaced) == blocks
    if not blocks:
        assert report.skipped and all(r for _, r in report.skipped), str(report)
        return
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    g = torch.randn(4, 5, dtype=torch.float64)
    for train in (True, False):
        outs = [m.train(train)(x) for m in (fused, original)]
        torch.testing.assert_close(*outs, rtol=1e-9, atol=1e-9)
        for out in outs:
            (out * g).sum().backward()
        assert_models_close(fused, original)


@pytest.mark.parametrize("arch", ["resnet18", "resnet26d"], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("frozen", [False, True], ids=["bn", "frozen-bn"])
def test_timm_drop_path_is_the_rowscale(arch, frozen):
    """drop_path_rate > 0: every block is fused, the drop path's per-sample mask is drawn as timm
    draws it, so with the same seed both models drop the same samples: fp64 outputs, grads and
    running stats match over two training steps; eval is the plain tail. A frozen BN (fixed
    statistics in training) keeps the drop path unfused after the folded conv-BN. state_dict
    keys are unchanged, and unfuse restores the original."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = timm.create_model(arch, pretrained=False, num_classes=5, drop_path_rate=0.5).double()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    if frozen:
        original = timm.layers.freeze_batch_norm_2d(original)
    keys = list(original.state_dict())
    fused, report = fusedres.fuse(copy.deepcopy(original), report=True)
    assert len(report.replaced) == 8 and not report.skipped, str(report)
    assert list(fused.state_dict()) == keys
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    g = torch.randn(8, 5, dtype=torch.float64)
    for step in range(2):
        outs = []
        for m in (fused, original):
            torch.manual_seed(10 + step)  # the same masks in both models
            outs.append(m.train()(x))
        torch.testing.assert_close(*outs, rtol=1e-9, atol=1e-9)
        for out in outs:
            (out * g).sum().backward()
        assert_models_close(fused, original)
    others = []
    for m in (fused, original):  # other masks, another output: the drop path is at work
        torch.manual_seed(99)
        others.append(m(x))
    torch.testing.assert_close(*others, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(others[0], outs[0])
    evals = [m.eval()(x) for m in (fused, original)]
    torch.testing.assert_close(*evals, rtol=1e-9, atol=1e-9)
    fusedres.unfuse(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in original.modules()]
    torch.testing.assert_close(fused(x), evals[1], rtol=1e-12, atol=1e-12)


def test_report_is_logged_and_printable(caplog):
    model = tiny_resnet()
    model.layer3[0].relu = nn.SiLU()
    with caplog.at_level("INFO", logger="fusedres"):
        _, report = fusedres.fuse(model, report=True)
    text = str(report)
    assert text in caplog.text
    assert "4 block(s) fused, 1 skipped" in text and "skipped layer3.0: BasicBlock: activation is SiLU" in text
