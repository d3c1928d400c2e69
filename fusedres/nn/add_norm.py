"""AddLayerNorm / AddRMSNorm: nn.LayerNorm / nn.RMSNorm applied to x + residual, in one kernel."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fusedres.convert.probe import NormSpec, probe_norm
from fusedres.ops.add_norm import _add_norm, _features


def _as_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


class _AddNorm(nn.Module):
    rms_norm: bool

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, options: dict, factory: dict):
        """options: the subclass's prenorm, residual_in_fp32, dropout_p and weight_offset."""
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.prenorm = options["prenorm"]
        self.residual_in_fp32 = options["residual_in_fp32"]
        dropout_p, weight_offset = options["dropout_p"], options["weight_offset"]
        if not (isinstance(dropout_p, int | float) and 0.0 <= dropout_p < 1.0):
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
        if weight_offset and not elementwise_affine:
            raise ValueError("weight_offset needs a weight (elementwise_affine=True)")
        self.dropout_p = float(dropout_p)
        self.weight_offset = float(weight_offset)
        ones = nn.Parameter(torch.ones(self.normalized_shape, **factory)) if elementwise_affine else None
        zeros = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if elementwise_affine and bias else None
        # As in nn.LayerNorm, absent parameters are registered as None.
        self.register_parameter("weight", ones)
        self.register_parameter("bias", zeros)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        shape = self.normalized_shape
        k = len(shape)
        if x.shape[-k:] != shape:
            raise ValueError(f"x must end with normalized_shape {shape}, got x of shape {tuple(x.shape)}")
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        # Dropout in training only: eval() (and p = 0) is exactly the plain op.
        p = self.dropout_p if self.training else 0.0
        features = _features(p, None, None, self.weight_offset, False)
        if k == 1:
            return _add_norm(
                x, residual, self.weight, self.bias, eps, self.rms_norm, self.prenorm, self.residual_in_fp32, features
            )
        # Several trailing dims are normalized together: the activations are flattened into one
        # (a view when possible); the parameters keep their shape (the kernels read them as N
        # contiguous elements, and their grads come back in that shape).
        flat_x = x.flatten(-k)
        flat_residual = residual.flatten(-k) if residual is not None else None
        out = _add_norm(
            flat_x,
            flat_residual,
            self.weight,
            self.bias,
            eps,
            self.rms_norm,
            self.prenorm,
            self.residual_in_fp32,
            features,
            param_shape=shape,
        )
        if self.prenorm:
            return out[0].view(x.shape), out[1].view(x.shape)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if not self.rms_norm:
            text += f", bias={self.bias is not None}"
        text += f", prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}"
        if self.dropout_p:
            text += f", dropout_p={self.dropout_p}"
        if self.weight_offset:
            text += f", weight_offset={self.weight_offset}"
        return text

    def _adopt(self, module: nn.Module) -> _AddNorm:
        # Share the Parameter objects, so optimizers and tied weights keep pointing at them.
        self.weight = module.weight
        if not self.rms_norm:
            self.bias = module.bias
        return self


class AddLayerNorm(_AddNorm):
    """``nn.LayerNorm(normalized_shape)(x + residual)`` in one kernel (fusedres.add_layer_norm).

    Parameters, buffers and state_dict keys are nn.LayerNorm's, so checkpoints load either way.

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as nn.LayerNorm.
        prenorm: forward returns (y, h), h = x + residual being the next block's residual.
        residual_in_fp32: keep h in float32 (a low-precision model with an fp32 residual stream).
        dropout_p: dropout on x before the add, in training only (BERT's hidden dropout); eval()
            gives exactly the plain op.
        weight_offset: added to the weight (in fp32) when normalizing.

    Shape:
        forward(x, residual=None): x and residual (..., *normalized_shape); y and h likewise.

    Example::

        >>> norm = fusedres.nn.AddLayerNorm(768)
        >>> y = norm(torch.randn(2, 16, 768), torch.randn(2, 16, 768))
        >>> norm = fusedres.nn.AddLayerNorm.from_module(torch.nn.LayerNorm(768), prenorm=True)
    """

    rms_norm = False

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        dropout_p: float = 0.0,
        weight_offset: float = 0.0,
        device=None,
        dtype=None,
    ):
        options = dict(prenorm=prenorm, residual_in_fp32=residual_in_fp32, dropout_p=dropout_p)
        options.update(weight_offset=weight_offset)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, options, dict(device=device, dtype=dtype))

    @classmethod
    def from_module(
        cls, module: nn.LayerNorm, *, prenorm: bool = False, residual_in_fp32: bool = False, dropout_p: float = 0.0
    ):
        """An AddLayerNorm sharing `module`'s parameters (dropout_p: the branch's dropout)."""
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(f"module must be an nn.LayerNorm, got {type(module).__name__}")
        new = cls(
            module.normalized_shape,
            module.eps,
            module.elementwise_affine,
            module.bias is not None,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            dropout_p=dropout_p,
            device="meta",
        )
        return new._adopt(module)


class AddRMSNorm(_AddNorm):
    """``nn.RMSNorm(normalized_shape)(x + residual)`` in one kernel (fusedres.add_rms_norm).

    Parameters and state_dict keys are nn.RMSNorm's (a weight, no bias).

    Args:
        normalized_shape, elementwise_affine, device, dtype: as nn.RMSNorm.
        eps: None uses torch.finfo(x.dtype).eps, as nn.RMSNorm does.
        prenorm: forward returns (y, h): Llama's ``residual = hidden + attn_out`` and the norm of
            it, in one pass.
        residual_in_fp32: keep h in float32.
        dropout_p: dropout on x before the add, in training only (Phi-3's residual dropout).
        weight_offset: added to the weight in fp32: 1.0 for Gemma's ``x * (1 + w)``.

    Shape:
        forward(x, residual=None): x and residual (..., *normalized_shape); y and h likewise.

    Example::

        >>> norm = fusedres.nn.AddRMSNorm(4096, eps=1e-6, prenorm=True)
        >>> y, h = norm(torch.randn(1, 8, 4096), torch.randn(1, 8, 4096))
    """

    rms_norm = True

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        dropout_p: float = 0.0,
        weight_offset: float = 0.0,
        device=None,
        dtype=None,
    ):
        options = dict(prenorm=prenorm, residual_in_fp32=residual_in_fp32, dropout_p=dropout_p)
        options.update(weight_offset=weight_offset)
        super().__init__(normalized_shape, eps, elementwise_affine, False, options, dict(device=device, dtype=dtype))
        del self._parameters["bias"]  # nn.RMSNorm has no bias parameter at all
        self.bias = None

    @classmethod
    def from_module(
        cls, module: nn.Module, *, prenorm: bool = False, residual_in_fp32: bool = False, dropout_p: float = 0.0
    ):
        """An AddRMSNorm sharing `module`'s weight: an nn.RMSNorm, or an RMS norm of another library
        with a `weight` and an `eps` / `variance_epsilon` (transformers' Llama-style w * xhat, or
        Gemma's (1 + w) * xhat, told apart by what the module computes: `rms_norm_spec`)."""
        if isinstance(module, nn.RMSNorm):
            shape, eps, affine, offset = module.normalized_shape, module.eps, module.elementwise_affine, 0.0
        else:
            spec = rms_norm_spec(module)
            if spec is None:
                raise TypeError(
                    f"module must be an nn.RMSNorm or compute w * xhat or (1 + w) * xhat over its weight's "
                    f"size, got {type(module).__name__}"
                )
            shape, eps, affine, offset = (spec.size,), spec.eps, True, spec.offset
        new = cls(
            shape,
            eps,
            affine,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            dropout_p=dropout_p,
            weight_offset=offset,
            device="meta",
        )
        return new._adopt(module)


def rms_norm_spec(module: nn.Module) -> NormSpec | None:
    """What `module` computes, if it is rms_norm(x) * (weight + offset) over its 1-D `weight` with
    its own eps (offset 0: Llama-style w * xhat; 1: Gemma's (1 + w) * xhat), else None. Asked of
    the module by running it (fusedres.convert.probe, the probe fuse() uses too), so it holds
    whatever the module's class (a modular transformers copy)."""
    spec = probe_norm(module)
    if isinstance(spec, NormSpec) and spec.rms and spec.weight == "weight" and spec.bias is None:
        return spec
    return None


def rms_norm_offset(module: nn.Module) -> float | None:
    """0.0 if `module` computes rms_norm(x) * w, 1.0 if rms_norm(x) * (1 + w) (Gemma); None if neither."""
    spec = rms_norm_spec(module)
    return None if spec is None else spec.offset
