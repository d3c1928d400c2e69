"""The fused ops: argument checks, backend dispatch, fake kernels and autograd."""

from fusedres.ops.add_norm import add_layer_norm, add_norm, add_rms_norm

__all__ = ["add_layer_norm", "add_norm", "add_rms_norm"]
