"""AddLayerNorm / AddRMSNorm as drop-in replacements for nn.LayerNorm / nn.RMSNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedres.nn import AddLayerNorm, AddRMSNorm

PAIRS = [
    pytest.param(AddLayerNorm, nn.LayerNorm, {}, id="layernorm"),
    pytest.param(AddLayerNorm, nn.LayerNorm, {"bias": False}, id="layernorm-nobias"),
    pytest.param(AddLayerNorm, nn.LayerNorm, {"elementwise_affine": False}, id="layernorm-noaffine"),
    pytest.param(AddRMSNorm, nn.RMSNorm, {}, id="rmsnorm"),
    pytest.param(AddRMSNorm, nn.RMSNorm, {"eps": 1e-6}, id="rmsnorm-eps"),
    pytest.param(AddRMSNorm, nn.RMSNorm, {"elementwise_affine": False}, id="rmsnorm-noaffine"),
]


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("normalized_shape", [24, (24,), (3, 8)], ids=["int", "tuple1", "tuple2"])
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS)
def test_state_dict_and_outputs_match_torch(ours_cls, torch_cls, kwargs, normalized_shape):
    torch.manual_seed(0)
    theirs = randomize(torch_cls(normalized_shape, **kwargs))
    ours = ours_cls(normalized_shape, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())

    shape = (2, 5) + ((normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape))
    x = torch.randn(shape, requires_grad=True)
    residual = torch.randn(shape, requires_grad=True)
    y = ours(x, residual)
    expected = theirs(x + residual)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, residual, *ours.parameters()], grad)
    want = torch.autograd.grad(expected, [x, residual, *theirs.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS)
def test_from_module_shares_parameters(ours_cls, torch_cls, kwargs):
    theirs = randomize(torch_cls(16, **kwargs))
    ours = ours_cls.from_module(theirs)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert ours.eps == theirs.eps
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), theirs(x))


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="module must be an nn.LayerNorm"):
        AddLayerNorm.from_module(nn.RMSNorm(4))
    with pytest.raises(TypeError, match="module must be an nn.RMSNorm"):
        AddRMSNorm.from_module(nn.LayerNorm(4))


def test_prenorm_returns_h():
    m = AddRMSNorm(32, prenorm=True, residual_in_fp32=True, dtype=torch.bfloat16)
    x, residual = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(4, 32, dtype=torch.bfloat16)
    y, h = m(x, residual)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(h, x.float() + residual.float())


def test_rmsnorm_default_eps_follows_dtype():
    m = AddRMSNorm(8)
    x = torch.randn(2, 8, dtype=torch.float64) * 1e-9
    torch.testing.assert_close(m(x), nn.RMSNorm(8).double()(x))


def test_wrong_trailing_shape_is_named():
    with pytest.raises(ValueError, match=r"x must end with normalized_shape \(3, 8\)"):
        AddLayerNorm((3, 8))(torch.randn(2, 8, 3))


def test_extra_repr_says_what_it_fuses():
    text = repr(AddLayerNorm(768, prenorm=True))
    assert "(768,)" in text and "prenorm=True" in text and "bias=True" in text
    assert "residual_in_fp32=False" in repr(AddRMSNorm(64))
