"""One schema per operator: the Triton operators declare exactly what csrc/ops.cpp declares."""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres._extension import EXTENSION_LOADED

OPS = [
    "add_norm_fwd",
    "add_norm_bwd",
    "batch_norm_stats",
    "batch_norm_combine_stats",
    "batch_norm_add_relu_fwd",
    "batch_norm_add_relu_bwd_reduce",
    "batch_norm_add_relu_bwd_input",
    "dropout_mask",
]


def _signature(op: torch._ops.OpOverload) -> str:
    """The schema without the operator's name: arguments (names, types, mutation) and returns."""
    schema = str(op._schema)
    return schema[schema.index("(") :]


@pytest.mark.skipif(not EXTENSION_LOADED, reason=f"fusedres._C not loaded: {fusedres.EXTENSION_ERROR}")
@pytest.mark.parametrize("name", OPS)
def test_triton_schema_equals_cpp_schema(name):
    pytest.importorskip("triton")
    import fusedres.triton.add_norm  # noqa: F401  (registers the Triton operators)
    import fusedres.triton.batch_norm  # noqa: F401
    import fusedres.triton.dropout  # noqa: F401

    cpp = getattr(torch.ops.fusedres, name).default
    triton = getattr(torch.ops.fusedres, f"{name}_triton").default
    assert _signature(triton) == _signature(cpp)


@pytest.mark.skipif(not EXTENSION_LOADED, reason=f"fusedres._C not loaded: {fusedres.EXTENSION_ERROR}")
def test_every_cpp_operator_is_listed():
    """A new operator in csrc/ops.cpp must be added above (and to the Triton backend)."""
    declared = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fusedres::") and not name.endswith("_triton")
    }
    assert declared == set(OPS)
