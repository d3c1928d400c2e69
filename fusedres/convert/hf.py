"""Hugging Face transformers blocks, patched per instance (transformers' code is not edited).

- BERT / RoBERTa (post-norm): `*SelfOutput` and `*Output` compute
  `LayerNorm(dropout(dense(h)) + input_tensor)`: one add_layer_norm.
- GPT-2 (pre-norm LayerNorm) and Llama / Mistral / Qwen2 (pre-norm RMSNorm): in the decoder layer,
  `h = residual + attn_out; y = post_norm(h)` becomes one add & norm with prenorm=True.

The pre-norm layers' forwards change between transformers releases (argument names, tuple or
tensor returns). Each pattern therefore states the forward signature it was written against; a
layer whose forward has another signature is skipped with that reason, never patched wrongly.
"""

from __future__ import annotations

import inspect

from torch import nn

from fusedres.convert.core import Pattern, register
from fusedres.convert.norms import check_layer_norms, norm_after_add

_HF = "transformers.models"


def _check_rms_norm(module: nn.Module, name: str) -> str | None:
    norm = getattr(module, name, None)
    # These classes compute weight * x * rsqrt(mean(x^2) + eps), as add_rms_norm does (Gemma's
    # (1 + weight) variant is deliberately not among them).
    if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"):
        return f"{name} is {type(norm).__name__}, not a Llama-style RMSNorm"
    return None


def _check_signature(module: nn.Module, expected: tuple[str, ...]) -> str | None:
    params = tuple(inspect.signature(type(module).forward).parameters)
    if params != expected:
        import transformers

        return (
            f"forward{params} in transformers {transformers.__version__} is not the forward{expected} "
            "that fusedres patches"
        )
    return None


def _rms(norm: nn.Module, a, b=None, *, prenorm=False):
    return norm_after_add(a, b, norm.weight, None, norm.variance_epsilon, rms_norm=True, prenorm=prenorm)


def _ln(norm: nn.LayerNorm, a, b=None, *, prenorm=False):
    return norm_after_add(a, b, norm.weight, norm.bias, norm.eps, prenorm=prenorm)


# --- BERT / RoBERTa ----------------------------------------------------------------------------


def _bert_output_forward(self, hidden_states, input_tensor):
    # BertSelfOutput.forward / BertOutput.forward
    return _ln(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)


def _check_bert_output(module: nn.Module) -> str | None:
    for name in ("dense", "dropout"):
        if not isinstance(getattr(module, name, None), nn.Module):
            return f"has no {name} submodule"
    return check_layer_norms(module, ("LayerNorm",))


for _path in (
    "bert.modeling_bert.BertSelfOutput",
    "bert.modeling_bert.BertOutput",
    "roberta.modeling_roberta.RobertaSelfOutput",
    "roberta.modeling_roberta.RobertaOutput",
):
    register(
        Pattern(f"{_HF}.{_path}", "LayerNorm(dropout(dense(h)) + input)", _check_bert_output, _bert_output_forward)
    )


# --- GPT-2 -------------------------------------------------------------------------------------

_GPT2_SIGNATURE = (
    "self",
    "hidden_states",
    "cache",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "use_cache",
    "kwargs",
)


def _gpt2_block_forward(
    self,
    hidden_states,
    cache=None,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    use_cache=False,
    **kwargs,
):
    # GPT2Block.forward (transformers 5.x), with residual + sublayer output fused into the next LN.
    if "past_key_values" in kwargs:  # the deprecated name the original forward still accepts
        cache = kwargs.pop("past_key_values")
    residual = hidden_states
    attn_output, _ = self.attn(
        _ln(self.ln_1, hidden_states), cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs
    )
    if encoder_hidden_states is not None:
        if not hasattr(self, "crossattention"):
            raise ValueError(
                f"If `encoder_hidden_states` are passed, {self} has to be instantiated with "
                "cross-attention layers by setting `config.add_cross_attention=True`"
            )
        normed, residual = _ln(self.ln_cross_attn, attn_output, residual, prenorm=True)
        attn_output, _ = self.crossattention(
            normed,
            cache=cache,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )
    normed, residual = _ln(self.ln_2, attn_output, residual, prenorm=True)
    return residual + self.mlp(normed)


def _check_gpt2_block(module: nn.Module) -> str | None:
    names = ("ln_1", "ln_2") + (("ln_cross_attn",) if hasattr(module, "crossattention") else ())
    return check_layer_norms(module, names) or _check_signature(module, _GPT2_SIGNATURE)


register(
    Pattern(
        f"{_HF}.gpt2.modeling_gpt2.GPT2Block",
        "ln_1, and attn output + residual with ln_2 (and ln_cross_attn)",
        _check_gpt2_block,
        _gpt2_block_forward,
    )
)


# --- Llama / Mistral / Qwen2 -------------------------------------------------------------------

_LLAMA_SIGNATURE = (
    "self",
    "hidden_states",
    "attention_mask",
    "position_ids",
    "cache",
    "use_cache",
    "position_embeddings",
    "kwargs",
)


def _llama_layer_forward(
    self,
    hidden_states,
    attention_mask=None,
    position_ids=None,
    cache=None,
    use_cache=False,
    position_embeddings=None,
    **kwargs,
):
    # LlamaDecoderLayer.forward (transformers 5.x; Mistral's and Qwen2's are the same), with
    # residual + attention output fused into post_attention_layernorm.
    if "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    residual = hidden_states
    attn_output, _ = self.self_attn(
        hidden_states=_rms(self.input_layernorm, hidden_states),
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    normed, residual = _rms(self.post_attention_layernorm, attn_output, residual, prenorm=True)
    return residual + self.mlp(normed)


def _check_llama_layer(module: nn.Module) -> str | None:
    for name in ("input_layernorm", "post_attention_layernorm"):
        reason = _check_rms_norm(module, name)
        if reason:
            return reason
    return _check_signature(module, _LLAMA_SIGNATURE)


for _path in (
    "llama.modeling_llama.LlamaDecoderLayer",
    "mistral.modeling_mistral.MistralDecoderLayer",
    "qwen2.modeling_qwen2.Qwen2DecoderLayer",
):
    register(
        Pattern(
            f"{_HF}.{_path}",
            "input_layernorm, and attention output + residual with post_attention_layernorm",
            _check_llama_layer,
            _llama_layer_forward,
        )
    )
