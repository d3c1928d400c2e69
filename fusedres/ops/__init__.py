"""The fused ops: one module per op family (add_norm, batch_norm), each with its fake kernels,
one autograd formula and the public functions. `fusedres.add_norm` (the function) lives in the
package's namespace; here `fusedres.ops.add_norm` is the module."""

from fusedres.ops.add_norm import add_layer_norm, add_layer_norm_, add_rms_norm, add_rms_norm_
from fusedres.ops.batch_norm import batch_norm_add_relu

__all__ = ["add_layer_norm", "add_layer_norm_", "add_rms_norm", "add_rms_norm_", "batch_norm_add_relu"]
