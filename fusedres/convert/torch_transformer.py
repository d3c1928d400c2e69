"""torch.nn.TransformerEncoderLayer / TransformerDecoderLayer (and so the encoder/decoder stacks
and nn.Transformer built from them), norm_first True and False.

Post-norm `norm(x + block(x))` becomes one add_layer_norm. Pre-norm `x = x + block(norm(x))`
carries h = x + block(...) out of the next norm (prenorm=True), so each add but the layer's last
shares a pass with a LayerNorm. The fused forward replaces torch's whole forward, eval-mode fast
path included: that path calls a native kernel with the norm weights directly, which would bypass
the fused ops. Nested-tensor inputs (the encoder stack's padding fast path) go to torch's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedres.convert.core import Pattern, register
from fusedres.convert.norms import check_layer_norms, norm_after_add


def _norm(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None = None, *, prenorm: bool = False):
    return norm_after_add(x, residual, norm.weight, norm.bias, norm.eps, prenorm=prenorm)


def _encoder_layer_forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    if src.is_nested:
        return type(self)._fusedres_original.forward(self, src, src_mask, src_key_padding_mask, is_causal)
    # As torch's forward does before either path.
    src_key_padding_mask = F._canonical_mask(
        mask=src_key_padding_mask,
        mask_name="src_key_padding_mask",
        other_type=F._none_or_dtype(src_mask),
        other_name="src_mask",
        target_type=src.dtype,
    )
    src_mask = F._canonical_mask(
        mask=src_mask, mask_name="src_mask", other_type=None, other_name="", target_type=src.dtype, check_other=False
    )
    x = src
    if self.norm_first:
        a = self._sa_block(_norm(self.norm1, x), src_mask, src_key_padding_mask, is_causal=is_causal)
        y, h = _norm(self.norm2, a, x, prenorm=True)
        return h + self._ff_block(y)
    x = _norm(self.norm1, self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal), x)
    return _norm(self.norm2, self._ff_block(x), x)


def _decoder_layer_forward(
    self,
    tgt,
    memory,
    tgt_mask=None,
    memory_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    tgt_is_causal=False,
    memory_is_causal=False,
):
    x = tgt
    if self.norm_first:
        y = _norm(self.norm1, x)
        a = self._sa_block(y, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        y, h = _norm(self.norm2, a, x, prenorm=True)
        b = self._mha_block(y, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        y, h = _norm(self.norm3, b, h, prenorm=True)
        return h + self._ff_block(y)
    x = _norm(self.norm1, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x)
    x = _norm(self.norm2, self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal), x)
    return _norm(self.norm3, self._ff_block(x), x)


register(
    Pattern(
        "torch.nn.modules.transformer.TransformerEncoderLayer",
        "norm1/norm2 with their residual adds",
        lambda m: check_layer_norms(m, ("norm1", "norm2")),
        _encoder_layer_forward,
    )
)
register(
    Pattern(
        "torch.nn.modules.transformer.TransformerDecoderLayer",
        "norm1/norm2/norm3 with their residual adds",
        lambda m: check_layer_norms(m, ("norm1", "norm2", "norm3")),
        _decoder_layer_forward,
    )
)
