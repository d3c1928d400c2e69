"""Every model family fuse() covers, built from a tiny config with random weights (nothing is
downloaded), with the inputs to run it and what fuse() should report for it.

`sites` is the number of add -> norm sites fused per model (two layers / blocks each): the adds
inside the blocks plus the block outputs carried into the next block's first norm (or the final
norm). A pre-norm decoder layer has two: its attention add inside, its MLP add carried.
`fp32_norms`: the family's own norms compute in fp32 even in an fp64 model (transformers' RMS
norms), so an fp64 comparison holds to fp32's precision only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F

D, HEADS, FF, VOCAB = 32, 4, 37, 99


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: str  # "ids", "ids+mask", "seq2seq", "pixels", "audio", "image"
    sites: int
    fp32_norms: bool = False
    skipped: str | None = None  # a reason every skipped entry has (without issue 23's features)

    def make_inputs(self, dtype: torch.dtype = torch.float32) -> dict:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(3, VOCAB, (2, 11), generator=g)
        if self.inputs == "ids":
            return {"input_ids": ids}
        if self.inputs == "ids+mask":
            mask = torch.ones(2, 11, dtype=torch.long)
            mask[1, 8:] = 0
            return {"input_ids": ids, "attention_mask": mask}
        if self.inputs == "seq2seq":
            return {"input_ids": ids, "decoder_input_ids": ids[:, :7]}
        if self.inputs == "audio":
            feats = torch.randn(2, 8, 32, generator=g, dtype=torch.float64).to(dtype)
            return {"input_features": feats, "decoder_input_ids": ids[:, :7]}
        size = 32 if self.inputs == "image32" else 16
        pixels = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64).to(dtype)
        return {"pixel_values": pixels} if self.inputs == "pixels" else {"x": pixels}

    def output(self, out) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, tuple):
            return out[0]
        return out.last_hidden_state


def _hf(config: str, model: str, **kwargs):
    def build():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kwargs))

    return build


_SMALL = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF, vocab_size=VOCAB)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA = dict(_SMALL, num_key_value_heads=2, max_position_embeddings=64, **_TOKENS)
_MOE = dict(experts_implementation="eager")  # the grouped-mm experts take no fp64
_VISION = dict(
    hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF, image_size=16, patch_size=8
)
_SEQ2SEQ = dict(
    vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF, decoder_start_token_id=1, **_TOKENS,
)  # fmt: skip


def _timm(path: str, **kwargs):
    def build():
        import importlib

        module, cls = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)(num_classes=5, **kwargs)

    return build


def _torchvision_swin(v2: bool):
    def build():
        from torchvision.models import swin_transformer as swin

        extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
        return swin.SwinTransformer(
            [4, 4], 16, [2, 2], [2, 2], [4, 4], stochastic_depth_prob=0.2, num_classes=5, **extra
        )

    return build


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=D, mlp_dim=FF, num_classes=5
    )


_VIT_KW = dict(img_size=16, patch_size=8, embed_dim=D, depth=2, num_heads=HEADS, mlp_ratio=1.0)


def _gemma(config: str, model: str):
    """A Gemma model whose norm weights are not all zero (Gemma starts them at w = 0, where
    (1 + w) and w cannot be told apart by the outputs)."""
    make = _hf(config, model, **_LLAMA, head_dim=8)

    def build():
        m = make()
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
        return m

    return build


FAMILIES = [
    # decoders: one add inside each layer, one carried into the next layer's (or the final) norm
    Family("llama", _hf("LlamaConfig", "LlamaModel", **_LLAMA), "ids", 4, fp32_norms=True),
    Family("mistral", _hf("MistralConfig", "MistralModel", **_LLAMA), "ids", 4, fp32_norms=True),
    Family("qwen2", _hf("Qwen2Config", "Qwen2Model", **_LLAMA), "ids", 4, fp32_norms=True),
    Family("qwen3", _hf("Qwen3Config", "Qwen3Model", **_LLAMA, head_dim=8), "ids", 4, fp32_norms=True),
    Family(
        "qwen3_moe",
        _hf(
            "Qwen3MoeConfig",
            "Qwen3MoeModel",
            **_LLAMA,
            **_MOE,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
        ),
        "ids",
        4,
        fp32_norms=True,
    ),  # fmt: skip
    Family(
        "qwen2_moe",
        _hf(
            "Qwen2MoeConfig",
            "Qwen2MoeModel",
            **_LLAMA,
            **_MOE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),
        "ids",
        4,
        fp32_norms=True,
    ),  # fmt: skip
    Family(
        "mixtral",
        _hf("MixtralConfig", "MixtralModel", **_LLAMA, **_MOE, num_local_experts=4, num_experts_per_tok=2),
        "ids",
        4,
        fp32_norms=True,
    ),  # fmt: skip
    # (1 + w) norms, through weight_offset; Gemma 2/3's sandwich: the norm after each sublayer
    # stays, the add goes into the next norm
    Family("gemma", _gemma("GemmaConfig", "GemmaModel"), "ids", 4, fp32_norms=True),
    Family("gemma2", _gemma("Gemma2Config", "Gemma2Model"), "ids", 4, fp32_norms=True),
    Family("gemma3", _gemma("Gemma3TextConfig", "Gemma3TextModel"), "ids", 4, fp32_norms=True),
    Family("phi3", _hf("Phi3Config", "Phi3Model", **_LLAMA, resid_pdrop=0.1), "ids", 4, fp32_norms=True),
    Family("granite", _hf("GraniteConfig", "GraniteModel", **_LLAMA, residual_multiplier=0.5), "ids", 4, True),
    Family("smollm3", _hf("SmolLM3Config", "SmolLM3Model", **_LLAMA), "ids", 4, fp32_norms=True),
    Family("starcoder2", _hf("Starcoder2Config", "Starcoder2Model", **_LLAMA, residual_dropout=0.1), "ids", 4),
    Family(
        "gpt2",
        _hf("GPT2Config", "GPT2Model", vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=HEADS, n_positions=64),
        "ids",
        4,
    ),  # fmt: skip
    Family(
        "opt",
        _hf(
            "OPTConfig",
            "OPTModel",
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=2,
            ffn_dim=FF,
            num_attention_heads=HEADS,
            max_position_embeddings=64,
            word_embed_proj_dim=D,
            **_TOKENS,
        ),
        "ids",
        4,
    ),  # fmt: skip
    Family(
        "gpt_neox",
        _hf(
            "GPTNeoXConfig",
            "GPTNeoXModel",
            **_SMALL,
            use_parallel_residual=False,
            max_position_embeddings=64,
            **_TOKENS,
        ),
        "ids",
        4,
    ),  # fmt: skip
    # encoders (post-norm: every add sits in front of a norm)
    Family("bert", _hf("BertConfig", "BertModel", **_SMALL), "ids+mask", 4),
    Family("xlm_roberta", _hf("XLMRobertaConfig", "XLMRobertaModel", **_SMALL), "ids+mask", 4),
    Family("camembert", _hf("CamembertConfig", "CamembertModel", **_SMALL), "ids+mask", 4),
    Family("electra", _hf("ElectraConfig", "ElectraModel", **_SMALL, embedding_size=D), "ids+mask", 4),
    Family(
        "distilbert",
        _hf("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=D, n_layers=2, n_heads=HEADS, hidden_dim=FF),
        "ids+mask",
        4,
    ),  # fmt: skip
    Family(
        "albert", _hf("AlbertConfig", "AlbertModel", **_SMALL, embedding_size=16), "ids+mask", 2
    ),  # one shared layer
    Family("deberta_v2", _hf("DebertaV2Config", "DebertaV2Model", **_SMALL), "ids+mask", 4),
    Family(
        "modernbert",
        _hf("ModernBertConfig", "ModernBertModel", **_SMALL, **_TOKENS, cls_token_id=1, sep_token_id=2),
        "ids+mask",
        4,
    ),  # fmt: skip
    # encoder-decoders
    Family(
        "t5",
        _hf(
            "T5Config",
            "T5Model",
            vocab_size=VOCAB,
            d_model=D,
            d_kv=8,
            d_ff=FF,
            num_layers=2,
            num_heads=HEADS,
            decoder_start_token_id=0,
        ),
        "seq2seq",
        10,
        fp32_norms=True,
    ),  # fmt: skip
    Family("bart", _hf("BartConfig", "BartModel", **_SEQ2SEQ, max_position_embeddings=64), "seq2seq", 10),
    Family(
        "whisper",
        _hf(
            "WhisperConfig",
            "WhisperModel",
            **_SEQ2SEQ,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
        ),
        "audio",
        10,
    ),  # fmt: skip
    # vision
    Family("vit", _hf("ViTConfig", "ViTModel", **_VISION), "pixels", 4),
    Family("clip_text", _hf("CLIPTextConfig", "CLIPTextModel", **_SMALL, max_position_embeddings=64), "ids", 4),
    Family("clip_vision", _hf("CLIPVisionConfig", "CLIPVisionModel", **_VISION), "pixels", 3),  # pooled: no final norm
    Family(
        "dinov2",
        _hf(
            "Dinov2Config",
            "Dinov2Model",
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            mlp_ratio=1,
            image_size=16,
            patch_size=8,
            layerscale_value=0.5,
            drop_path_rate=0.2,
        ),
        "pixels",
        4,
    ),  # fmt: skip
    Family(
        "timm_vit",
        _timm("timm.models.vision_transformer.VisionTransformer", **_VIT_KW, init_values=0.5, drop_path_rate=0.2),
        "image",
        4,
    ),  # fmt: skip
    Family("timm_deit", _timm("timm.models.deit.VisionTransformerDistilled", **_VIT_KW), "image", 4),
    Family(
        "timm_swin",
        _timm(
            "timm.models.swin_transformer.SwinTransformer",
            img_size=32,
            patch_size=4,
            window_size=4,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(2, 2),
            drop_path_rate=0.2,
        ),
        "image32",
        7,
    ),  # fmt: skip
    Family("torchvision_vit", _torchvision_vit, "image", 4),
    Family("torchvision_swin", _torchvision_swin(False), "image32", 7),
    # Swin V2 normalizes the branch before the add (res-post-norm): only the last block's add
    # meets a norm (the final one); the other blocks are reported.
    Family(
        "torchvision_swin_v2",
        _torchvision_swin(True),
        "image32",
        1,
        skipped="none of its residual adds feeds one of its norms",
    ),
]

BY_NAME = {f.name: f for f in FAMILIES}


# --- the fused dropout's masks, replayed in the original model ----------------------------------


@contextlib.contextmanager
def recording(masks: list):
    """The fused ops keep each dropout call's (p, x, mask) in `masks`, in call order."""
    from fusedres.ops import add_norm

    def spy(op):
        def call(*args, dropout_p=0.0, **kwargs):
            if not dropout_p:
                return op(*args, **kwargs)
            *out, mask = op(*args, dropout_p=dropout_p, return_dropout_mask=True, **kwargs)
            masks.append((dropout_p, args[0].detach().clone(), mask))
            return out[0] if len(out) == 1 else tuple(out)

        return call

    with mock.patch.object(add_norm, "add_layer_norm", spy(add_norm.add_layer_norm)):
        with mock.patch.object(add_norm, "add_rms_norm", spy(add_norm.add_rms_norm)):
            yield


@contextlib.contextmanager
def replaying(masks: list | None):
    """torch's dropout replays the next kept mask when its call matches it (same p, the same
    input up to rounding: not the embeddings' dropout of the same size), drawing the seed the
    fused call drew, so that the random stream goes on alike."""
    import fusedres

    dropout = F.dropout

    def replay(input, p=0.5, training=True, inplace=False):
        if masks and training and masks[0][0] == p and _same(masks[0][1], input):
            mask = masks.pop(0)[2]
            fusedres.philox_seed_offset(input.device)  # what the fused call drew
            return input * (mask.view(input.shape).to(input.dtype) * (1.0 / (1.0 - p)))
        return dropout(input, p, training, inplace)

    with mock.patch.object(F, "dropout", replay):
        yield


def _same(x: torch.Tensor, t: torch.Tensor) -> bool:
    if x.numel() != t.numel():
        return False
    x, t = x.double().reshape(-1), t.detach().double().reshape(-1)
    return bool(((x - t).abs() <= 1e-5 * (1 + t.abs())).all())
