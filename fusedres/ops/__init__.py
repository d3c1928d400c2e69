"""The fused ops: argument checks, backend dispatch, fake kernels and autograd."""

from fusedres.ops.add_norm import add_layer_norm, add_norm, add_rms_norm
from fusedres.ops.batch_norm import batch_norm_add_relu

__all__ = ["add_layer_norm", "add_norm", "add_rms_norm", "batch_norm_add_relu"]
