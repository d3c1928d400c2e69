"""fusedres: fused residual kernels for PyTorch.

import fusedres
y = fusedres.add_layer_norm(x, residual, weight, bias)           # LayerNorm(x + residual)
y, h = fusedres.add_rms_norm(x, residual, weight, prenorm=True)  # pre-norm block: h goes on
model = fusedres.fuse(model)                                     # a ResNet / Transformer, in place
"""

from fusedres import nn  # noqa: E402  (modules use the ops above)
from fusedres._extension import EXTENSION_ERROR, EXTENSION_LOADED
from fusedres._version import __version__
from fusedres.backends import available_backends, get_backend, set_backend, use_backend
from fusedres.convert import FuseReport, fuse, unfuse
from fusedres.memory import cpu_pool_release, cpu_pool_stats
from fusedres.ops import add_layer_norm, add_layer_norm_, add_rms_norm, add_rms_norm_, batch_norm_add_relu
from fusedres.ops.add_norm import add_norm
from fusedres.ops.dropout import dropout_mask, philox_seed_offset

__all__ = [
    "EXTENSION_ERROR",
    "EXTENSION_LOADED",
    "FuseReport",
    "__version__",
    "add_layer_norm",
    "add_layer_norm_",
    "add_norm",
    "add_rms_norm",
    "add_rms_norm_",
    "available_backends",
    "batch_norm_add_relu",
    "cpu_pool_release",
    "cpu_pool_stats",
    "dropout_mask",
    "fuse",
    "get_backend",
    "nn",
    "philox_seed_offset",
    "set_backend",
    "unfuse",
    "use_backend",
]
