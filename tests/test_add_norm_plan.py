"""Add & Norm's plan (fusedres/ops/add_norm.py): what a call's arguments decide, and the C++ fast
path's copy of it (csrc/fastpath/add_norm.cpp), compared for every combination of its inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusedres._extension import FASTPATH, FASTPATH_ERROR
from fusedres.ops.add_norm import plan

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FLAGS = ("residual_in_fp32", "prenorm", "needs_grad", "recompute_h", "transforms_x", "colscale_grad")


def combinations():
    for x_dtype, residual_dtype in itertools.product(DTYPES, (None, *DTYPES)):
        for flags in itertools.product((False, True), repeat=len(FLAGS)):
            yield x_dtype, residual_dtype, dict(zip(FLAGS, flags))


def python_plan(x_dtype, residual_dtype, flags):
    x = torch.empty(0, dtype=x_dtype)
    residual = None if residual_dtype is None else torch.empty(0, dtype=residual_dtype)
    return plan(x, residual, *flags.values())


@pytest.mark.skipif(FASTPATH is None, reason=f"fusedres._fastpath not loaded: {FASTPATH_ERROR}")
def test_fastpath_plan_is_the_python_plan():
    count = 0
    for x_dtype, residual_dtype, flags in combinations():
        expected = tuple(python_plan(x_dtype, residual_dtype, flags))
        assert FASTPATH.add_norm_plan(x_dtype, residual_dtype, *flags.values()) == expected, (
            x_dtype,
            residual_dtype,
            flags,
        )
        count += 1
    assert count == len(DTYPES) * (len(DTYPES) + 1) * 2 ** len(FLAGS)


def test_plan_rules():
    """The rules, stated apart from the code: h's dtype; h is written when prenorm returns it or a
    GPU backward reads it (unless h is x itself); the backward reads what was written, else x;
    the residual gets its own grad when dtypes differ or x's branch is transformed."""
    for x_dtype, residual_dtype, flags in combinations():
        check_rules(x_dtype, residual_dtype, flags, python_plan(x_dtype, residual_dtype, flags))


def check_rules(x_dtype, residual_dtype, flags, p):
    base = residual_dtype or x_dtype
    assert p.h_dtype == (torch.promote_types(base, torch.float32) if flags["residual_in_fp32"] else base)
    h_is_x = residual_dtype is None and not flags["transforms_x"]
    gpu_backward_reads_h = flags["needs_grad"] and not flags["recompute_h"] and not h_is_x
    assert p.store_h == (flags["prenorm"] or gpu_backward_reads_h)
    assert p.saves_h == p.store_h
    assert p.colscale_grad == (flags["colscale_grad"] and flags["needs_grad"])
    assert p.saves_x == (not p.store_h or p.colscale_grad)
    own = residual_dtype is not None and (residual_dtype != x_dtype or flags["transforms_x"])
    assert p.dresidual_dtype == (residual_dtype if own else None)
