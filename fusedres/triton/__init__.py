"""Triton kernels, one module per op family (add_norm.py, batch_norm.py).

Each module offers the same two ways in: eager launchers (plain functions that launch the kernels
directly; fusedres/ops calls them from its autograd Functions) and the ``fusedres::<op>_triton``
operators with the spec's schemas (fusedres/spec), registered on import (torch.compile and opcheck use them).
Nothing is imported here: importing a module imports triton and registers its operators.
"""
