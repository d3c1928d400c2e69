"""fuse() on every model family it covers (tests/fuse_families.py: transformers decoders, encoders,
encoder-decoders and vision models, timm and torchvision ViTs and Swins), each from a tiny config.

Per family: the fused model, run in fp64 forward and backward, matches the original in fp64 (to
fp32's precision where the family's own norms compute in fp32, else to fp64's), in training (same
dropout / drop path draws) and in eval; state_dict keys stay; the report counts the fused sites
(two per pre-norm decoder layer) and names every skip; unfuse() restores the original classes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fuse_families import BY_NAME, FAMILIES, Family, recording, replaying

import fusedres

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("torchvision")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def _run(family: Family, model, train: bool, masks: list | None = None, record: bool = False) -> torch.Tensor:
    """fp64 forward and backward of sum(out * g), the random draws seeded alike. The fused dropout
    draws its mask by Philox, not as torch's dropout does: `record` keeps each fused call's mask
    in `masks`; else the dropouts of the original model whose call matches the next kept mask
    (same p, same size) replay it, drawing the seed the fused call drew, so that the random stream
    goes on alike."""
    model.train(train)
    torch.manual_seed(1234)
    with recording(masks) if record else replaying(masks):
        out = family.output(model(**family.make_inputs(torch.float64)))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * g).sum().backward()
    return out


# The families whose residual dropout becomes the fused dropout in training (their tiny configs
# keep the library's default p > 0), and how many fused calls draw a mask per step.
FUSED_DROPOUT = dict(phi3=4, opt=2, bert=4, xlm_roberta=4, camembert=4, electra=4, deberta_v2=4, t5=10, bart=10)


@pytest.fixture(scope="module")
def built():
    """Each family's original model, built once (fp64)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = BY_NAME[name].build().double()
        return cache[name]

    return get


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_family_matches_the_original_in_fp64(name, train, built):
    family = BY_NAME[name]
    original = copy.deepcopy(built(name))
    fused, report = fusedres.fuse(copy.deepcopy(original), report=True)
    assert list(fused.state_dict()) == list(original.state_dict())
    masks = []
    out = _run(family, fused, train, masks, record=True)
    recorded = len(masks)
    expected = _run(family, original, train, masks)
    assert not masks, f"{name}: {len(masks)} fused dropout mask(s) not replayed"
    assert recorded == (FUSED_DROPOUT.get(name, 0) if train else 0), f"{name}: {recorded} fused dropout calls"
    tol = 1e-5 if family.fp32_norms else 1e-10
    assert _max_rel(out, expected) <= tol, f"{name}: output off by {_max_rel(out, expected):.3g}"
    for (pname, p), q in zip(fused.named_parameters(), original.parameters()):
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            assert _max_rel(p.grad, q.grad) <= tol, f"{name}: grad of {pname} off by {_max_rel(p.grad, q.grad):.3g}"


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_family_report(name, built):
    """What the report says: each fused site named, the count per model (two per pre-norm decoder
    layer), every skip with its reason, never "0 fused, 0 skipped"."""
    family = BY_NAME[name]
    model = copy.deepcopy(built(name))
    classes = [type(m) for m in model.modules()]
    _, report = fusedres.fuse(model, report=True)
    assert report.sites == family.sites, str(report)
    assert report.replaced or report.skipped
    if family.skipped:
        assert report.skipped and all(family.skipped in why for _, why in report.skipped), str(report)
    else:
        assert not report.skipped, str(report)
    for _, what in report.replaced:
        assert "self." in what or "carried into" in what, what  # names the add and its norm
    fusedres.unfuse(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_fusedres") for m in model.modules() for k in vars(m)), "unfuse left state behind"


@pytest.mark.parametrize("name", ["qwen3", "gpt_neox", "vit", "gemma2", "granite", "timm_vit", "bert"])
def test_family_compiles_fullgraph(name, built):
    family = BY_NAME[name]
    model = copy.deepcopy(built(name)).float().eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    expected = family.output(model(**family.make_inputs()))
    torch._dynamo.reset()
    out = family.output(torch.compile(fused, fullgraph=True, backend="aot_eager")(**family.make_inputs()))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()


@pytest.mark.parametrize("name,head", [("qwen3", "Qwen3ForCausalLM"), ("t5", "T5ForConditionalGeneration")])
def test_generation_with_a_kv_cache_gives_the_same_tokens(name, head):
    import transformers

    torch.manual_seed(0)
    config = BY_NAME[name].build().config
    model = getattr(transformers, head)(config).eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, attention_mask=torch.ones_like(ids))
    assert torch.equal(fused.generate(ids, **kwargs), model.generate(ids, **kwargs))
    assert all(link.alive for link in _links(fused))


def _links(model):
    from fusedres.convert import sites

    return [vars(m)[sites.LINK] for m in model.modules() if sites.LINK in vars(m)]


@pytest.mark.parametrize("name", ["qwen3", "t5"])
def test_hidden_states_and_activation_checkpointing(name, built):
    """output_hidden_states sees every layer's full output (the carry leaves what a layer returns
    alone); under activation checkpointing the carry stands aside and the grads still match."""
    family = BY_NAME[name]
    model = copy.deepcopy(built(name))
    fused = fusedres.fuse(copy.deepcopy(model))
    model.eval(), fused.eval()
    a = fused(**family.make_inputs(torch.float64), output_hidden_states=True)
    b = model(**family.make_inputs(torch.float64), output_hidden_states=True)
    keys = [k for k in b.keys() if k.endswith("hidden_states") and k != "last_hidden_state"]
    assert keys
    for key in keys:
        assert len(a[key]) == len(b[key])
        assert all(_max_rel(x, y) <= 1e-5 for x, y in zip(a[key], b[key])), key
    assert all(link.alive for link in _links(fused))
    for m in (model, fused):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _run(family, m, train=True)
    for (pname, p), q in zip(fused.named_parameters(), model.parameters()):
        assert _max_rel(p.grad, q.grad) <= 1e-5, pname
