"""AddLayerNorm / AddRMSNorm: nn.LayerNorm / nn.RMSNorm applied to x + residual, in one kernel."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fusedres.ops.add_norm import _add_norm


def _as_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


class _AddNorm(nn.Module):
    rms_norm: bool

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, prenorm, residual_in_fp32, device, dtype):
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        factory = {"device": device, "dtype": dtype}
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
        if k == 1:
            return _add_norm(
                x, residual, self.weight, self.bias, eps, self.rms_norm, self.prenorm, self.residual_in_fp32
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
            param_shape=shape,
        )
        if self.prenorm:
            return out[0].view(x.shape), out[1].view(x.shape)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if not self.rms_norm:
            text += f", bias={self.bias is not None}"
        return text + f", prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}"

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
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, prenorm, residual_in_fp32, device, dtype)

    @classmethod
    def from_module(cls, module: nn.LayerNorm, *, prenorm: bool = False, residual_in_fp32: bool = False):
        """An AddLayerNorm sharing `module`'s parameters."""
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(f"module must be an nn.LayerNorm, got {type(module).__name__}")
        new = cls(
            module.normalized_shape,
            module.eps,
            module.elementwise_affine,
            module.bias is not None,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
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
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, False, prenorm, residual_in_fp32, device, dtype)
        del self._parameters["bias"]  # nn.RMSNorm has no bias parameter at all
        self.bias = None

    @classmethod
    def from_module(cls, module: nn.RMSNorm, *, prenorm: bool = False, residual_in_fp32: bool = False):
        """An AddRMSNorm sharing `module`'s weight."""
        if not isinstance(module, nn.RMSNorm):
            raise TypeError(f"module must be an nn.RMSNorm, got {type(module).__name__}")
        new = cls(
            module.normalized_shape,
            module.eps,
            module.elementwise_affine,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            device="meta",
        )
        return new._adopt(module)
