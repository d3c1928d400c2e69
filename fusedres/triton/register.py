"""Registers a Triton launcher as the operator ``fusedres::<op>_triton``, from the op's spec.

Both Triton op families use it: the schema, the Python signature torch.library wants and the
fake outputs all come from the spec (fusedres/spec), as the C++ operators' do.
"""

from __future__ import annotations

import inspect

import torch
import triton
from torch.library import triton_op, wrap_triton

from fusedres.spec import Op
from fusedres.spec.python import allocate, empty_like_device

# Whether @triton.jit produces interpreted kernels (Triton reads TRITON_INTERPRET when a kernel
# is defined, i.e. at import of the kernel modules).
INTERPRETED = bool(triton.knobs.runtime.interpret)

_ANNOTATIONS = {
    "Tensor": torch.Tensor,
    "Tensor?": torch.Tensor | None,
    "float": float,
    "bool": bool,
    "int": int,
    "ScalarType": torch.dtype,
    "ScalarType?": torch.dtype | None,
}


def signature(op: Op) -> inspect.Signature:
    """The Python signature that torch.library's schema inference turns back into op's schema."""
    params = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=_ANNOTATIONS[a.kind.schema_type + ("?" if a.optional else "")],
        )
        for a in op.args
    ]
    n_out = len(op.outputs)
    result = None if n_out == 0 else torch.Tensor if n_out == 1 else tuple[(torch.Tensor,) * n_out]
    return inspect.Signature(params, return_annotation=result)


def register_op(op: Op, launcher, check, kernels):
    """Registers fusedres::<op.name>_triton: the arguments are checked with `check`, then
    `launcher(*args)` runs. Arguments the spec marks mutable are declared mutated.

    Compiled Triton: ``torch.library.triton_op`` (launcher(..., launch=wrap_triton)), so
    torch.compile and export trace into the kernels, and fake tensors run the launcher itself
    (wrap_triton launches nothing on them). `kernels` are recorded for AOTAutograd's cache key,
    which triton_op finds by reading source for literal wrap_triton(kernel) calls.

    Interpreter: ``torch.library.custom_op`` running the launcher as is (wrap_triton does not take
    interpreted kernels), with the spec's outputs as the fake."""
    qualname = f"fusedres::{op.name}_triton"
    schema = op.schema(f"{op.name}_triton")
    schema = schema[schema.index("(") :]
    mutates_args = tuple(a.name for a in op.args if a.mutable)

    if INTERPRETED:

        def run(*args):
            check(*args)
            return launcher(*args)

        registered = torch.library.custom_op(qualname, run, mutates_args=mutates_args, schema=schema)
        registered.register_fake(lambda *args: allocate(op, args, empty_like_device))
        return registered

    def run_traced(*args):
        check(*args)
        return launcher(*args, launch=wrap_triton)

    # torch 2.11's triton_op infers the schema from the function even when given one: give it
    # the signature the schema spells.
    run_traced.__signature__ = signature(op)
    registered = triton_op(qualname, run_traced, mutates_args=mutates_args, schema=schema)
    kernel_table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
    if isinstance(kernel_table, dict):
        kernel_table[qualname] = list(kernels)
    return registered
