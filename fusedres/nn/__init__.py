"""Drop-in modules: same parameters, buffers and state_dict keys as the torch modules they replace."""

from fusedres.nn.add_norm import AddLayerNorm, AddRMSNorm

__all__ = ["AddLayerNorm", "AddRMSNorm"]
