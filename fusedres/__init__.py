"""fusedres: fused residual kernels for PyTorch."""

from fusedres._version import __version__

__all__ = ["__version__"]
