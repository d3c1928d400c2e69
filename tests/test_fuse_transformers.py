"""fuse() on transformer stacks: torch.nn's Transformer layers and Hugging Face BERT, RoBERTa,
GPT-2, Llama, Mistral and Qwen2 built from tiny configs with random weights (nothing downloaded).

Each model runs three ways: fused, original, and the original in float64; the fused model's
output and every parameter grad must be within the tests' rule of the float64 run."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_checkpoints_load_both_ways, assert_model_parity, assert_within_rule
from torch import nn

import fusedres
from fusedres.convert.norms import norm_after_add

D, HEADS, FF, VOCAB = 32, 4, 37, 99


def three_copies(model: nn.Module, train: bool):
    model.train(train)
    return fusedres.fuse(copy.deepcopy(model)), model, copy.deepcopy(model).double()


def run_three(models, make_inputs, output=lambda out: out):
    """Forward + backward of sum(out * g) for each model; returns the outputs. Dropout masks are the
    same in all three runs (same seed, same call order)."""
    outs = []
    for model in models:
        dtype = next(model.parameters()).dtype
        torch.manual_seed(1234)
        out = output(model(*make_inputs(dtype)))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (out.double() * g).sum().backward()
        outs.append(out)
    return outs


# --- torch.nn -----------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["postnorm", "prenorm"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
def test_torch_transformer_layers(kind, norm_first, train):
    torch.manual_seed(0)
    common = dict(dim_feedforward=FF, dropout=0.1, batch_first=True, norm_first=norm_first)
    if kind == "encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, **common), 2, enable_nested_tensor=False)
        n_layers = 2
    elif kind == "decoder":
        model = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, HEADS, **common), 2)
        n_layers = 2
    else:
        model = nn.Transformer(D, HEADS, 1, 1, **common)
        n_layers = 2
    models = three_copies(model, train)
    assert sum(type(m).__name__.startswith("Fused_") for m in models[0].modules()) == n_layers
    src = torch.randn(3, 7, D, dtype=torch.float64)
    tgt = torch.randn(3, 5, D, dtype=torch.float64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    if kind == "encoder":
        inputs = lambda dt: (src.to(dt), None, pad)
    elif kind == "decoder":
        inputs = lambda dt: (tgt.to(dt), src.to(dt), nn.Transformer.generate_square_subsequent_mask(5, dtype=dt))
    else:
        inputs = lambda dt: (src.to(dt), tgt.to(dt), None, None, None, pad)
    outs = run_three(models, inputs)
    assert_within_rule("output", *outs, atol=1e-5)
    assert_model_parity(*models)


def test_torch_encoder_nested_fast_path_still_works():
    """In eval with a padding mask, the encoder stack may hand nested tensors to its layers: the
    fused layer passes them to torch's own forward."""
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    x = torch.randn(3, 7, D)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(fused(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad))


def test_torch_layer_with_another_norm_is_skipped():
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, batch_first=True)
    layer.norm2 = nn.RMSNorm(D)
    _, report = fusedres.fuse(nn.Sequential(layer), report=True)
    assert not report.replaced and "norm2 is RMSNorm, not nn.LayerNorm" in report.skipped[0][1]


# --- Hugging Face -------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def hf_model(name: str):
    torch.manual_seed(0)
    small = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF)
    llama_like = dict(small, num_key_value_heads=2, max_position_embeddings=64)
    # The hidden dropout becomes the fused ops' own (Philox) dropout, another mask than F.dropout's
    # for the same seed: tests/test_fuse_families.py compares it by replaying the fused masks.
    encoder = dict(small, hidden_dropout_prob=0.0)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, **encoder)
        return transformers.BertModel(cfg), 4
    if name == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=VOCAB, **encoder)
        return transformers.RobertaModel(cfg), 4
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=HEADS, n_positions=64)
        return transformers.GPT2Model(cfg), 2
    if name == "gpt2-cross":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=HEADS, n_positions=64, add_cross_attention=True
        )
        return transformers.GPT2Model(cfg), 2
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[name]
    cfg = getattr(transformers, f"{cls}Config")(vocab_size=VOCAB, **llama_like)
    return getattr(transformers, f"{cls}Model")(cfg), 2


HF_MODELS = ["bert", "roberta", "gpt2", "gpt2-cross", "llama", "mistral", "qwen2"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_models_match_the_original(name, train):
    model, n_blocks = hf_model(name)
    keys = list(model.state_dict())
    models = three_copies(model, train)
    report = fusedres.fuse(models[0], report=True)[1]  # already fused: the second call finds nothing
    assert not report.replaced and not report.skipped
    assert sum(type(m).__name__.startswith("Fused_") for m in models[0].modules()) == n_blocks
    assert list(models[0].state_dict()) == keys
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    enc = torch.randn(2, 6, D, dtype=torch.float64)

    def call(model, dtype):
        if name == "gpt2-cross":
            return model(input_ids=ids, encoder_hidden_states=enc.to(dtype))
        return model(input_ids=ids, attention_mask=mask)

    outs = []
    for model in models:
        dtype = next(model.parameters()).dtype
        torch.manual_seed(1234)
        out = call(model, dtype).last_hidden_state
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (out.double() * g).sum().backward()
        outs.append(out)
    assert_within_rule("last_hidden_state", *outs, atol=1e-5)
    assert_model_parity(*models)


def test_hf_checkpoints_load_both_ways():
    fused = fusedres.fuse(hf_model("llama")[0])
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p))
    plain = hf_model("llama")[0]
    assert_checkpoints_load_both_ways(fused, plain)
    fusedres.unfuse(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]


def test_hf_layer_whose_sum_reaches_its_norm_otherwise_is_skipped(monkeypatch):
    """A layer's forward (here a stand-in for another transformers release) is read, not trusted
    by its class: an add whose sum reaches the norm through another op is not a site, and the
    layer is reported with what differed."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states, **kwargs):
        residual = hidden_states
        hidden_states = residual + self.mlp(self.input_layernorm(hidden_states))
        return self.post_attention_layernorm(hidden_states.clamp(-10, 10))

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", forward)
    model, _ = hf_model("llama")
    _, report = fusedres.fuse(model, report=True)
    assert not report.replaced and len(report.skipped) == 2
    reason = "LlamaDecoderLayer: residual + self.mlp(self.input_layernorm(hidden_states)) reaches "
    assert report.skipped[0] == (
        "layers.0",
        reason + "self.post_attention_layernorm only through hidden_states.clamp(-10, 10)",
    )


class _ScaledRMSNorm(nn.Module):
    """Not a norm the fused ops compute: RMSNorm times 2."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return 2 * nn.functional.rms_norm(x, x.shape[-1:], self.weight, self.variance_epsilon)


def test_hf_norm_is_recognised_by_what_it_computes():
    """An nn.LayerNorm in place of a Llama RMSNorm is fused as a LayerNorm; a norm computing
    something else is reported with what it computes."""
    model, _ = hf_model("llama")
    model.layers[0].post_attention_layernorm = nn.LayerNorm(D)
    model.layers[1].post_attention_layernorm = _ScaledRMSNorm(D)
    _, report = fusedres.fuse(model, report=True)
    assert [n for n, _ in report.replaced] == ["layers.0", "layers.1"]
    assert "-> self.post_attention_layernorm (LayerNorm w*xhat+b, eps=1e-05, prenorm)" in report.replaced[0][1]
    # layers.1's own site is not fused, its last add still is (carried into the final norm)
    assert report.replaced[1][1] == "LlamaDecoderLayer: its output + residual carried into norm"
    [(name, reason)] = report.skipped
    assert name == "layers.1" and "_ScaledRMSNorm): it computes neither LayerNorm nor RMSNorm" in reason


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hf_models_compile_fullgraph(name):
    model, _ = hf_model(name)
    model.eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = model(ids).last_hidden_state
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for n, p in fused.named_parameters() if "pooler" not in n)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_autocast_keeps_the_originals_dtypes(name):
    """Under bf16 autocast the residual stream stays as eager keeps it (fp32 after an fp32
    embedding), and the outputs agree within bf16 tolerance."""
    model, _ = hf_model(name)
    model.eval()
    fused = fusedres.fuse(copy.deepcopy(model))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused(ids).last_hidden_state, model(ids).last_hidden_state
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
@pytest.mark.parametrize(
    "a,b", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]
)
def test_norm_after_add_gives_eager_dtypes(a, b, prenorm):
    x, r = torch.randn(3, 16).to(a), torch.randn(3, 16).to(b)
    w, bias = torch.rand(16) + 0.5, torch.randn(16)
    out = norm_after_add(x, r, w, bias, 1e-5, prenorm=prenorm)
    h_eager = x + r
    y_eager = nn.functional.layer_norm(h_eager, (16,), w.to(h_eager.dtype), bias.to(h_eager.dtype))
    if prenorm:
        y, h = out
        # The pre-norm output only feeds a matmul: it stays in the narrower input dtype when the
        # sum's dtype is one of the two, else (fp16 + bf16) everything is fp32.
        narrow = a if b == h_eager.dtype else b if a == h_eager.dtype else h_eager.dtype
        assert h.dtype == h_eager.dtype and y.dtype == narrow
        torch.testing.assert_close(h, h_eager, rtol=1e-2, atol=1e-2)
    else:
        y = out
        assert y.dtype == h_eager.dtype
    torch.testing.assert_close(y.float(), y_eager.float(), rtol=2e-2, atol=2e-2)
