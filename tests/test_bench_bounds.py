"""The bound bench.models prints beside a transformer's fused row (fusedres.bench.bounds): which
sites it counts, and the arithmetic."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fusedres
from fusedres.bench import bounds, models

transformers = pytest.importorskip("transformers")


def tiny_llama() -> models.ModelCase:
    def build():
        cfg = transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return transformers.LlamaModel(cfg)

    return models.ModelCase("tiny-llama", "tokens", build, lambda dev: torch.randint(0, 50, (2, 9), device=dev), 18)


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_site_calls_counts_two_sites_per_layer(mode):
    case = tiny_llama()
    fused = fusedres.fuse(case.build())
    fused.train(mode == "train")
    batch = case.make_batch(torch.device("cpu"))
    with torch.set_grad_enabled(mode == "train"):
        calls, norms = bounds.site_calls(fused, lambda: case.loss(fused, batch))
    # per layer: the attention add inside, the MLP add carried into the next (or the final) norm
    assert sum(calls.values()) == 6
    assert {c.shape for c in calls} == {(2, 9, 32)} and all(c.prenorm for c in calls)
    assert all(type(norms[c]).__name__ == "LlamaRMSNorm" for c in calls)
    assert fusedres.fuse(case.build()) is not None  # recording left the fused class alone
    from fusedres.convert import sites

    assert sites._Fused.fused.__name__ == "fused"


def test_bound_is_the_step_without_the_sites():
    case = tiny_llama()
    fused = fusedres.fuse(case.build())
    batch = case.make_batch(torch.device("cpu"))
    result = bounds.bound(case, fused, batch, torch.device("cpu"), None, "train", step_ms=1000.0, reps=2)
    assert result["sites"] == 6 and result["sites_ms"] > 0
    assert result["share"] == pytest.approx(result["sites_ms"] / 1000.0)
    assert result["bound"] == pytest.approx(1000.0 / (1000.0 - result["sites_ms"]))


def test_a_model_without_sites_has_no_bound():
    from test_bench_models import tiny_case

    case = tiny_case()
    fused = fusedres.fuse(case.build())
    batch = case.make_batch(torch.device("cpu"))
    assert bounds.bound(case, fused, batch, torch.device("cpu"), None, "inference", 10.0, 1) is None


def test_bench_model_rows_carry_the_bound():
    rows = models.bench_model(tiny_llama(), torch.device("cpu"), None, reps=1)
    for r in rows:
        assert ("bound" in r) == (r["variant"] == "fused")
        if "bound" in r:
            assert r["bound"] >= 1.0 and 0 < r["share"] < 1
    text = models.format_rows(rows)
    assert "bound" in text.splitlines()[0] and "%" in text


def test_eager_site_runs_the_norm_module_forward_and_backward():
    case = tiny_llama()
    model = case.build()
    norm = model.layers[0].post_attention_layernorm
    call = bounds.SiteCall((2, 5, 32), torch.float32, torch.float32, True, "LlamaRMSNorm[float32]")
    fn = bounds.eager_site(call, norm, torch.device("cpu"), True, contextlib.nullcontext())
    fn()
    assert norm.weight.grad is None  # the model's own norm is left alone (a copy runs)
