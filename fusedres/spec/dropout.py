"""Fused dropout's keep-mask as an operator of its own: the mask a fused dropout with this
seed_offset applies to an (rows, cols) input (csrc/philox.h states the counter layout; the spec is
fusedres/reference/philox.py). Its checks are the family's own (csrc/dropout.cpp, fusedres/_rng.py):
the kinds here are `Opaque`.
"""

from __future__ import annotations

from . import Arg, Family, Op, Opaque, Out

DROPOUT_MASK = Op(
    "dropout_mask",
    args=(
        Arg("seed_offset", Opaque("Tensor"), doc="[seed, offset]: a contiguous (2,) int64 tensor on the mask's device"),
        Arg("rows", Opaque("int")),
        Arg("cols", Opaque("int")),
        Arg("p", Opaque("float"), doc="the dropout probability, in [0, 1)"),
    ),
    outputs=(Out("mask", "matrix:rows,cols", "bool"),),
    doc="The keep-mask (bool (rows, cols), True = kept) of fused dropout for an input of rows x cols "
    "elements; every backend returns the same mask for the same seed_offset.",
)

FAMILY = Family("dropout", (DROPOUT_MASK,))
