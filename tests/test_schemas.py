"""One schema per operator, from the spec (fusedres/spec): the C++ operators (defined from the
header setup.py generates) and the Triton operators declare exactly what the spec says."""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres._extension import EXTENSION_LOADED
from fusedres.spec import add_norm, batch_norm, dropout
from fusedres.spec.cpp import _families, checks_header, spec_header

OPS = [op for family in (add_norm.FAMILY, batch_norm.FAMILY, dropout.FAMILY) for op in family.ops]
needs_extension = pytest.mark.skipif(not EXTENSION_LOADED, reason=f"fusedres._C not loaded: {fusedres.EXTENSION_ERROR}")


def _schema(overload: torch._ops.OpOverload) -> str:
    """The schema as torch prints it, without the namespace."""
    return str(overload._schema).split("::", 1)[1]


@needs_extension
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_cpp_operator_has_the_spec_schema(op):
    assert _schema(getattr(torch.ops.fusedres, op.name).default) == op.schema()


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_triton_operator_has_the_spec_schema(op):
    pytest.importorskip("triton")
    import fusedres.triton.add_norm  # noqa: F401  (registers the Triton operators)
    import fusedres.triton.batch_norm  # noqa: F401
    import fusedres.triton.dropout  # noqa: F401

    assert _schema(getattr(torch.ops.fusedres, f"{op.name}_triton").default) == op.schema(f"{op.name}_triton")


@needs_extension
def test_every_cpp_operator_is_in_the_spec():
    declared = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fusedres::") and not name.endswith("_triton")
    }
    assert declared == {op.name for op in OPS}


def test_generated_header_declares_every_operator():
    """The generated C++ names each operator's argument struct, entry point, typed call and
    checks; an argument added to the spec reaches all of them."""
    header = spec_header(_families())
    for op in OPS:
        assert f"struct {op.cpp_name}Args {{" in header
        assert f"{op.name}_entry(" in header and f"call_{op.name}(" in header
        for arg in op.args:
            assert f" {arg.name};" in header.split(f"struct {op.cpp_name}Args {{")[1].split("};")[0]
    checks = checks_header([("add_norm", add_norm.FAMILY)])
    for op in add_norm.FAMILY.ops:
        body = checks.split(f"check_{op.name}(")[1].split("\n}\n")[0]
        for arg in op.args:
            if arg.kind.cpp_check(f"a.{arg.name}", arg.name, "a.x"):
                assert f'"{arg.name}"' in body or f"a.{arg.name}" in body, arg.name
        for rule in op.rules:
            assert rule.cpp in body


def test_python_checks_and_cpp_checks_come_from_the_same_kinds():
    """Each argument kind renders both languages' check: a kind without a C++ check must be one
    that needs none (a bool) or whose family checks it itself."""
    from fusedres.spec import Flag, Opaque

    for op in OPS:
        for arg in op.args:
            if not arg.kind.cpp_check("v", arg.name, "a"):
                assert isinstance(arg.kind, Flag | Opaque), (op.name, arg.name)
