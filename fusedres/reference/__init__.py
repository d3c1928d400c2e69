"""Eager PyTorch references: the executable specification of every fused op.

Tests compare each backend against these evaluated in float64, the benchmark reports errors
against them, and the "reference" backend runs them directly.
"""

from fusedres.reference.add_norm import add_norm_reference, h_dtype_for
from fusedres.reference.batch_norm import batch_norm_add_relu_reference

__all__ = ["add_norm_reference", "batch_norm_add_relu_reference", "h_dtype_for"]
