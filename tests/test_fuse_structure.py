"""How fuse() reads structure, on small modules written here: the add -> norm forms it finds in a
forward (and the ones it leaves, with why), the norm and branch-op probes, the carry of a block's
last add into the next block's norm (and how it stands aside when that block is not called on it),
and the branch ops and (1 + w) norms folded into the fused call once add_norm takes issue 23's
keywords (run here against a stand-in that computes issue 23's formula in eager PyTorch)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fuse_families import recording, replaying
from torch import nn

import fusedres
from fusedres.convert import features, probe, sites

N = 24


class RMSNorm(nn.Module):
    """As transformers writes it: in fp32, weight * x_hat."""

    def __init__(self, n, eps=1e-6, offset=0.0):
        super().__init__()
        self.weight, self.variance_epsilon, self.offset = nn.Parameter(torch.rand(n) + 0.5), eps, offset

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return ((self.weight.float() + self.offset) * y).to(x.dtype)


class PreNormLayer(nn.Module):
    def __init__(self, n=N, norm=RMSNorm):
        super().__init__()
        self.input_norm, self.post_norm = norm(n), norm(n)
        self.attn, self.mlp = nn.Linear(n, n), nn.Linear(n, n)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        residual = x
        x = self.attn(self.input_norm(x))
        x = residual + self.dropout(x)
        residual = x
        x = self.post_norm(x)
        x = self.mlp(x)
        x = residual + x
        return x


class Stack(nn.Module):
    def __init__(self, n_layers=3, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList(PreNormLayer(**kwargs) for _ in range(n_layers))
        self.norm = RMSNorm(N)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Forms(nn.Module):
    """One forward with the other forms: an inline post-norm add, a view and metadata between an
    add and its norm, an if between them (its test does not depend on the sum), a flag-guarded
    path (OPT's do_layer_norm_before), a functional dropout statement before the add, and a
    returned tuple whose head is the block's last add through a view."""

    def __init__(self, flag=True):
        super().__init__()
        self.n1, self.n2, self.n3, self.n4 = (nn.LayerNorm(N) for _ in range(4))
        self.f1, self.f2 = nn.Linear(N, N), nn.Linear(N, N)
        self.flag, self.p = flag, 0.1

    def forward(self, x, extra=None):
        h = self.n1(x + self.f1(x))
        shape = h.shape
        s = h + self.f2(h)
        s = s.reshape(-1, s.size(-1))
        if extra is not None:
            s = s * extra
        t = self.n2(s)
        if self.flag:
            u = self.n3(t)
        else:
            u = t
        u = F.dropout(u, p=self.p, training=self.training)
        u = s + u
        w = self.n4(u)
        return (u + w).view(shape), shape


def _seeded(fn, *args, seed=7, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def _replayed(fused, original, *args):
    """(fused(*args), original(*args)), seeded alike, the fused dropout's masks replayed in the original."""
    masks = []
    with recording(masks):
        out = _seeded(fused, *args)
    with replaying(masks):
        expected = _seeded(original, *args)
    assert not masks
    return out, expected


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forms_match_and_are_reported(train):
    torch.manual_seed(0)
    for flag in (True, False):
        model = Forms(flag).double().train(train)
        fused, report = fusedres.fuse(copy.deepcopy(model), report=True)
        x = torch.randn(2, 5, N, dtype=torch.float64)
        for extra in (None, torch.rand(N, dtype=torch.float64)):
            masks = []
            with recording(masks):
                out, shape = _seeded(fused, x, extra)
            assert len(masks) == train  # the fused dropout (training), replayed in the original
            with replaying(masks):
                expected, _ = _seeded(model, x, extra)
            assert not masks
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        [(name, what)] = report.replaced
        assert "self.n1(x + self.f1(x)) (LayerNorm w*xhat+b, eps=1e-05)" in what
        # s: through the reshape, the metadata read and the if (duplicated into both branches)
        assert "h + self.f2(h) -> self.n2 (LayerNorm w*xhat+b, eps=1e-05, prenorm" in what
        assert "s + u -> self.n4 (LayerNorm w*xhat+b, eps=1e-05, prenorm" in what  # with the dropout before it
        assert "s + u -> self.n4 (LayerNorm w*xhat+b, eps=1e-05, prenorm, +F.dropout folded)" in what
        assert report.sites == 3 and not report.skipped


def test_the_fused_forward_is_readable_source():
    import inspect

    fused = fusedres.fuse(PreNormLayer())
    source = inspect.getsource(type(fused).forward)
    assert "_fusedres_y0, x = _fusedres_site(self, 0, x, residual)" in source
    assert "_fusedres_exit(self, 0, x, residual)" in source


def test_what_is_not_a_site_is_left_alone():
    class NotSites(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.emb, self.lin = nn.LayerNorm(N), nn.Embedding(10, N), nn.Linear(N, N)

        def forward(self, ids, x):
            e = self.emb(ids) + self.emb(ids)  # an embedding sum: positions broadcast, not a residual add
            e = self.norm(e)
            y = x + self.lin(x)
            return e, self.norm(y * 2)  # the sum reaches the norm through another op

    model = NotSites()
    _, report = fusedres.fuse(model, report=True)
    assert not report.replaced
    assert report.skipped == [("", "NotSites: x + self.lin(x) reaches self.norm only through y * 2")]


def test_report_of_a_model_without_any_site_is_empty():
    _, report = fusedres.fuse(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), report=True)
    assert str(report) == "fusedres.fuse: 0 block(s) fused, 0 skipped"


# --- probes ------------------------------------------------------------------------------------


class WrongEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(N)), 1e-6

    def forward(self, x):
        return F.rms_norm(x, (N,), self.weight, eps=1e-2)


def _norm_cases():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return [
        (nn.LayerNorm(N, eps=1e-6), "LayerNorm w*xhat+b, eps=1e-06"),
        (nn.LayerNorm(N, bias=False), "LayerNorm w*xhat, eps=1e-05"),
        (nn.LayerNorm(N, elementwise_affine=False), "LayerNorm xhat, eps=1e-05"),
        (nn.RMSNorm(N, eps=1e-5), "RMSNorm w*xhat, eps=1e-05"),
        (RMSNorm(N), "RMSNorm w*xhat, eps=1e-06"),
        (T5LayerNorm(N, eps=1e-6), "RMSNorm w*xhat, eps=1e-06"),  # scale-only: no mean, no bias
        (GemmaRMSNorm(N, eps=1e-6), "RMSNorm (1+w)*xhat, eps=1e-06"),
        (nn.RMSNorm(N), "its eps is not a number it holds"),  # eps None: the dtype's, per call
        (WrongEps(), "it computes neither LayerNorm nor RMSNorm"),
        (nn.BatchNorm1d(N), "it has buffers"),
        (nn.Linear(N, N), "its parameters are not vectors"),
    ]


def test_probe_tells_norms_apart_by_what_they_compute():
    pytest.importorskip("transformers")
    for module, expected in _norm_cases():
        found = probe.probe_norm(module)
        text = found.describe() if isinstance(found, probe.NormSpec) else found
        assert text.startswith(expected), (type(module).__name__, text)
    assert probe.probe_norm(nn.LayerNorm(N)).bias == "bias" and probe.probe_norm(RMSNorm(N)).weight == "weight"


def test_probe_classifies_the_ops_on_a_branch():
    from timm.layers import DropPath, LayerScale
    from torchvision.ops import StochasticDepth

    ls = LayerScale(N, init_values=0.5)
    assert probe.probe_wrapper(nn.Identity()) == (probe.IDENTITY, None)
    assert probe.probe_wrapper(nn.Dropout(0.1)) == (probe.DROPOUT, None)
    assert probe.probe_wrapper(ls) == (probe.COLSCALE, "gamma")
    assert probe.probe_wrapper(DropPath(0.2)) == (probe.ROWSCALE, None)
    assert probe.probe_wrapper(DropPath(0.0)) == (probe.ROWSCALE, None)
    assert probe.probe_wrapper(StochasticDepth(0.2, "row")) == (probe.ROWSCALE, None)
    assert probe.probe_wrapper(nn.Linear(N, N))[0] == probe.OPAQUE
    assert probe.probe_wrapper(nn.GELU())[0] == probe.OPAQUE
    state = torch.random.get_rng_state()
    probe.probe_wrapper(DropPath(0.2))
    assert torch.equal(torch.random.get_rng_state(), state)  # probing draws from a forked RNG


# --- carrying a block's last add into the next block's first norm -----------------------------


def _links(model):
    return [vars(m)[sites.LINK] for m in model.modules() if sites.LINK in vars(m)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_stack_carries_every_layer_output(train):
    torch.manual_seed(0)
    model = Stack().double().train(train)
    fused, report = fusedres.fuse(copy.deepcopy(model), report=True)
    assert report.sites == 6  # two per layer
    assert report.carried == [
        ("layers", "2 of 2 block outputs + residual fused into the next block's input_norm; the last into norm")
    ]
    x = torch.randn(3, 4, N, dtype=torch.float64, requires_grad=True)
    out, expected = _replayed(fused, model, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # RMSNorm in fp32, as transformers'
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (ex,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-6)
    links = _links(fused)
    assert len(links) == 3 and all(link.alive and link.stash is None for link in links)


@pytest.mark.parametrize("hook", ["replace", "inplace"])
def test_carry_stands_aside_when_the_next_norm_gets_something_else(hook):
    """A forward hook replacing layer 0's output, or editing it in place, reaches layer 1: the
    link sees it, runs layer 1's norm as before from then on, and the result is the original's."""
    torch.manual_seed(0)
    model = Stack().eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    for m in (model, fused):
        if hook == "replace":
            m.layers[0].register_forward_hook(lambda mod, args, out: out * 0.5)
        else:
            m.layers[0].register_forward_hook(lambda mod, args, out: out.mul_(0.5))
    x = torch.randn(3, 4, N)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    assert [link.alive for link in _links(fused)] == [False, True, True]


def test_carry_is_off_under_compile_and_unfuse_removes_the_links():
    torch.manual_seed(0)
    model = Stack().eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    x = torch.randn(3, 4, N)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # and back in eager
    assert all(link.alive for link in _links(fused))
    fusedres.unfuse(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()] and not _links(fused)


def test_a_copied_model_carries_on_its_own():
    fused = fusedres.fuse(Stack().eval())
    twin = copy.deepcopy(fused)
    x = torch.randn(2, 3, N)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), fused(x))
    assert all(link.alive for link in _links(twin)) and all(link.alive for link in _links(fused))
    assert not {id(link) for link in _links(twin)} & {id(link) for link in _links(fused)}


# --- issue 23's features ---------------------------------------------------------------------------


_NO_FEATURES = dict(dropout_p=0.0, rowscale=None, colscale=None, weight_offset=0.0)


def _recorder(op, calls: list):
    def call(*args, **kwargs):
        calls.append({k: kwargs.get(k, d) for k, d in _NO_FEATURES.items()})
        return op(*args, **kwargs)

    return call


@pytest.fixture
def issue23(monkeypatch):
    """The fused ops, every call's feature keywords recorded."""
    from fusedres.ops import add_norm

    calls = []
    monkeypatch.setattr(add_norm, "add_layer_norm", _recorder(add_norm.add_layer_norm, calls))
    monkeypatch.setattr(add_norm, "add_rms_norm", _recorder(add_norm.add_rms_norm, calls))
    assert features.available(torch.device("cpu")) == features.ALL
    return calls


def test_features_are_asked_in_one_place():
    assert {f: features.supported(f) for f in features.FEATURES} == {
        f: f in __import__("inspect").signature(fusedres.add_layer_norm).parameters for f in features.FEATURES
    }
    assert features.available(torch.device("cpu")) == features.ALL  # the CPU kernels and the reference


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=N, depth=2, num_heads=4, init_values=0.5, drop_path_rate=0.5
    )


@pytest.mark.parametrize(
    "build,shape,lacking",
    [(_timm_vit, (4, 3, 16, 16), features.ALL), (Stack, (2, 5, N), frozenset({features.DROPOUT}))],
    ids=["vit-none", "stack-no-dropout"],
)
def test_a_backend_without_the_features_gets_them_from_torch(monkeypatch, issue23, build, shape, lacking):
    """On a backend whose kernels lack a feature, the op it stands for runs in torch in front of
    the fused call, the rest still folds: the result is the original's, random draws included."""
    from fusedres.backends import resolve_backend

    torch.manual_seed(0)
    model = build().double().train()
    fused = fusedres.fuse(copy.deepcopy(model))
    monkeypatch.setitem(features._AVAILABLE, resolve_backend(torch.device("cpu")), features.ALL - lacking)
    x = torch.randn(shape, dtype=torch.float64)
    tol = 1e-10 if build is _timm_vit else 1e-5  # the stand-in RMSNorm computes in fp32
    torch.testing.assert_close(_seeded(fused, x, seed=3), _seeded(model, x, seed=3), rtol=tol, atol=tol)
    assert not any(c["dropout_p"] for c in issue23)
    if lacking == features.ALL:
        assert not issue23  # no call with a feature


def test_a_one_plus_w_norm_without_weight_offset_runs_the_original(monkeypatch, issue23):
    from fusedres.backends import resolve_backend

    torch.manual_seed(0)
    model = Stack(norm=lambda n: RMSNorm(n, offset=1.0)).double().eval()
    fused, report = fusedres.fuse(copy.deepcopy(model), report=True)
    assert report.sites == 6 and "(1+w)*xhat" in str(report)
    monkeypatch.setitem(features._AVAILABLE, resolve_backend(torch.device("cpu")), features.ALL - {"weight_offset"})
    x = torch.randn(2, 5, N, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6)
    assert not issue23


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_layer_scale_and_drop_path_fold_into_the_fused_call(issue23, train):
    """timm's ViT block: ls (LayerScale) becomes colscale and drop_path (drawn by the module
    itself, as eager draws it) rowscale; the result is the original's, masks included."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=N, depth=2, num_heads=4, init_values=0.5, drop_path_rate=0.5
    ).double()
    model.train(train)
    fused, report = fusedres.fuse(copy.deepcopy(model), report=True)
    assert "+self.drop_path1 +self.ls1 folded" in report.replaced[1][1]
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(_seeded(fused, x, seed=3), _seeded(model, x, seed=3), rtol=1e-10, atol=1e-10)
    site_calls = [c for c in issue23 if c["colscale"] is not None]
    assert site_calls and all(c["colscale"] is not None for c in site_calls)
    drawn = [c["rowscale"] for c in issue23 if c["rowscale"] is not None]
    assert bool(drawn) == train  # block 1's drop path draws in training; block 0's rate is 0


def test_residual_multiplier_and_dropout_fold(issue23):
    """Granite's `x * residual_multiplier` becomes a colscale; Phi-3's residual dropout becomes
    dropout_p in training (eval: the plain add, exactly)."""
    transformers = pytest.importorskip("transformers")
    from fuse_families import BY_NAME

    torch.manual_seed(0)
    granite = BY_NAME["granite"].build().double().eval()
    fused = fusedres.fuse(copy.deepcopy(granite))
    ids = torch.randint(3, 99, (2, 7))
    torch.testing.assert_close(fused(ids).last_hidden_state, granite(ids).last_hidden_state, rtol=1e-5, atol=1e-6)
    assert {round(float(c["colscale"][0]), 6) for c in issue23 if c["colscale"] is not None} == {0.5}

    torch.manual_seed(0)
    phi3 = transformers.Phi3Model(BY_NAME["phi3"].build().config).double()
    fused = fusedres.fuse(copy.deepcopy(phi3))
    issue23.clear()
    fused.eval()
    torch.testing.assert_close(fused(ids).last_hidden_state, phi3.eval()(ids).last_hidden_state, rtol=1e-5, atol=1e-6)
    assert not any(c["dropout_p"] for c in issue23)  # eval: dropout_p 0, the plain fused op
    fused.train()
    fused(ids)
    assert [c["dropout_p"] for c in issue23] == [0.1] * 4  # both adds of both layers


def test_gemma_fuses_with_weight_offset(issue23):
    """Gemma 2's sandwich: the norm after each sublayer stays; the add goes into the next norm,
    computed as (1 + w) * x_hat through weight_offset."""
    pytest.importorskip("transformers")
    from fuse_families import BY_NAME

    torch.manual_seed(0)
    model = BY_NAME["gemma2"].build().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # Gemma's norms start at w = 0: make (1 + w) tell
    fused, report = fusedres.fuse(copy.deepcopy(model), report=True)
    assert report.sites == 4 and not report.skipped
    assert "residual + hidden_states -> self.pre_feedforward_layernorm (RMSNorm (1+w)*xhat" in report.replaced[0][1]
    ids = torch.randint(3, 99, (2, 7))
    torch.testing.assert_close(fused(ids).last_hidden_state, model(ids).last_hidden_state, rtol=1e-5, atol=1e-6)
    assert {c["weight_offset"] for c in issue23} == {1.0}


def test_autocast_gives_eager_dtypes_and_values():
    """bf16 autocast: a bf16 branch meets the fp32 residual stream; every output keeps eager's dtype."""
    torch.manual_seed(0)
    model = Stack().eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    x = torch.randn(3, 4, N)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused(x), model(x)
        layer_out, layer_expected = fused.layers[0](x), model.layers[0](x)
    assert out.dtype == expected.dtype and layer_out.dtype == layer_expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer_out, layer_expected, rtol=2e-2, atol=2e-2)


def test_carry_needs_the_same_grad_mode_and_no_inference_mode():
    """Layer 0 under no_grad, the rest with grad (frozen lower layers): the carried y, made
    without grad, must not stand in; under inference_mode nothing is carried at all."""
    torch.manual_seed(0)
    model = Stack()
    fused = fusedres.fuse(copy.deepcopy(model))
    x = torch.randn(2, 3, N)

    def run(m):
        with torch.no_grad():
            h = m.layers[0](x)
        for layer in m.layers[1:]:
            h = layer(h)
        out = m.norm(h)
        out.sum().backward()
        return out

    torch.testing.assert_close(*_replayed(lambda: run(fused), lambda: run(model)), rtol=1e-5, atol=1e-5)
    for p, q in zip(fused.parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(*_replayed(fused, model, x), rtol=1e-5, atol=1e-5)
    assert all(link.stash is None for link in _links(fused))
