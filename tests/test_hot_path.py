"""The hot path: what one fused call dispatches, and that nothing per call is re-derived.

Every op dispatched around a kernel is a kernel launch on a GPU (and a dispatcher round trip on
any device), so the fused ops must dispatch no more than their kernels: counted here with a
TorchDispatchMode over CPU tensors. Allocations and views are not launches and are not counted
(the C++ ops allocate inside the kernel call, the Triton launchers in Python).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from helpers import skip_if_unusable
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres import backends

NOT_LAUNCHES = {
    "aten.empty.memory_format",
    "aten.empty_strided.default",
    "aten.empty_like.default",
    "aten.new_empty.default",
    "aten.new_empty_strided.default",
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.alias.default",
    "aten.detach.default",
    "aten.as_strided.default",
}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in NOT_LAUNCHES:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count(fn):
    with CountOps() as counter:
        out = fn()
    return counter, out


BACKENDS = ["cpu", "triton"]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
@pytest.mark.parametrize("rms_norm", [False, True], ids=["ln", "rms"])
def test_add_norm_dispatches_one_op_each_way(backend, prenorm, rms_norm, autograd_path):
    skip_if_unusable("cpu", backend)
    torch.manual_seed(0)
    x, r, w, b = _leaves(torch.randn(3, 5, 33), torch.randn(3, 5, 33), torch.randn(33), torch.randn(33))
    bias = None if rms_norm else b
    with fusedres.use_backend(backend):
        fused = lambda: fusedres.add_norm(x, r, w, bias, 1e-5, rms_norm=rms_norm, prenorm=prenorm)
        fusedres.add_norm(x, r, w, bias, 1e-5, rms_norm=rms_norm, prenorm=prenorm)  # resolve outside the count
        fwd, out = count(fused)
        outputs = out if prenorm else (out,)
        grads = [torch.randn_like(o) for o in outputs]
        params = [t for t in (x, r, w, bias) if t is not None]
        bwd, _ = count(lambda: torch.autograd.grad(outputs, params, grads))
    assert fwd.total == 1, fwd.ops
    assert bwd.total <= 2, bwd.ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_norm_without_grad_dispatches_one_op(backend, autograd_path):
    skip_if_unusable("cpu", backend)
    x, r, w, b = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64), torch.randn(64)
    with fusedres.use_backend(backend), torch.no_grad():
        fusedres.add_layer_norm(x, r, w, b)
        ops, _ = count(lambda: fusedres.add_layer_norm(x, r, w, b))
    assert ops.total == 1, ops.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_batch_norm_train_dispatches_at_most_three_ops_each_way(backend, memory_format, autograd_path):
    skip_if_unusable("cpu", backend)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=memory_format).requires_grad_()
    r = torch.randn(2, 8, 4, 4).contiguous(memory_format=memory_format).requires_grad_()
    w, b = _leaves(torch.rand(8) + 0.5, torch.randn(8))
    rm, rv = torch.zeros(8), torch.ones(8)
    with fusedres.use_backend(backend):
        fusedres.batch_norm_add_relu(x, r, rm, rv, w, b, True)
        fwd, out = count(lambda: fusedres.batch_norm_add_relu(x, r, rm, rv, w, b, True))
        grad = torch.randn_like(out)
        bwd, _ = count(lambda: torch.autograd.grad(out, (x, r, w, b), grad))
    assert fwd.total <= 3, fwd.ops
    assert bwd.total <= 3, bwd.ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_eval_dispatches_one_op(backend, autograd_path):
    skip_if_unusable("cpu", backend)
    module = fusedres.nn.BatchNormAddReLU2d(8).eval()
    x, r = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with fusedres.use_backend(backend), torch.no_grad():
        module(x, r)
        ops, _ = count(lambda: module(x, r))
    assert ops.total == 1, ops.ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_the_kernels_directly(backend, monkeypatch):
    """The Python Function path: without a dispatch mode, functorch transform or tensor subclass
    in play, eager calls the kernels themselves; the registered operators (torch.compile's) are
    not touched. A dispatch mode sends the call through the registered operator instead, so the
    mode sees it."""
    skip_if_unusable("cpu", backend)
    from fusedres.ops import add_norm as module

    monkeypatch.setattr(module, "_fastpath", None)

    kernels = module._KERNELS[backend]
    calls = []

    def spy(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    monkeypatch.setitem(
        module._KERNELS,
        backend,
        module._Kernels(*(spy(name, fn) for name, fn in zip(module._Kernels._fields, kernels))),
    )
    x, r, w = _leaves(torch.randn(3, 16), torch.randn(3, 16), torch.randn(16))
    with fusedres.use_backend(backend):
        y = fusedres.add_rms_norm(x, r, w)
        torch.autograd.grad(y, (x, r, w), torch.randn_like(y))
        with torch.no_grad():
            fusedres.add_rms_norm(x, r, w)
        assert calls == ["fwd", "bwd", "fwd"]
        with CountOps():
            fusedres.add_rms_norm(x.detach(), r.detach(), w.detach())
        assert calls[-1] == "fwd_op"


def test_fastpath_runs_no_python_per_kernel(monkeypatch):
    """With fusedres._fastpath, an eager add_norm call (forward, backward, no_grad) is one
    crossing into C++: neither the Python kernels nor the registered operators are called from
    Python, and the grads are the Python path's, bit for bit."""
    from fusedres.ops import add_norm as module

    if module._fastpath is None:
        pytest.skip(f"fusedres._fastpath: {fusedres._extension.FASTPATH_ERROR}")
    kernels = module._KERNELS["cpu"]
    calls = []
    monkeypatch.setitem(
        module._KERNELS,
        "cpu",
        module._Kernels(*(lambda *a, fn=fn: calls.append(fn) or fn(*a) for fn in kernels)),
    )
    torch.manual_seed(0)
    x, r, w = _leaves(torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(16))
    with fusedres.use_backend("cpu"):
        y, h = fusedres.add_rms_norm(x, r, w, prenorm=True)
        grads = torch.autograd.grad((y, h), (x, r, w), (torch.ones_like(y), torch.full_like(h, 0.5)))
        with torch.no_grad():
            fusedres.add_rms_norm(x, r, w)
        assert calls == []
        monkeypatch.setattr(module, "_fastpath", None)
        y2, h2 = fusedres.add_rms_norm(x, r, w, prenorm=True)
        grads2 = torch.autograd.grad((y2, h2), (x, r, w), (torch.ones_like(y), torch.full_like(h, 0.5)))
    assert calls  # the Python path did call them
    assert y.grad_fn.name() != y2.grad_fn.name()
    for a, b in zip((y, h, *grads), (y2, h2, *grads2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_fastpath_runs_no_python_per_kernel(monkeypatch, training, memory_format):
    """With fusedres._fastpath, an eager batch_norm_add_relu call (forward, backward) is one crossing
    into C++: the Python kernels are not called, and outputs, grads and running stats are the
    Python path's, bit for bit."""
    from fusedres.ops import batch_norm as module

    if module._fastpath is None:
        pytest.skip(f"fusedres._fastpath: {fusedres._extension.FASTPATH_ERROR}")
    kernels = module._KERNELS["cpu"]
    calls = []
    spied = tuple(module._Kernels(*(lambda *a, fn=fn: calls.append(fn) or fn(*a) for fn in k)) for k in kernels)
    monkeypatch.setitem(module._KERNELS, "cpu", spied)
    torch.manual_seed(0)
    x, r = (t.contiguous(memory_format=memory_format) for t in (torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)))
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(module, "_fastpath", None)
        leaves = _leaves(x, r, w, b)
        rm, rv = torch.zeros(5), torch.ones(5)
        with fusedres.use_backend("cpu"):
            out = fusedres.batch_norm_add_relu(leaves[0], leaves[1], rm, rv, leaves[2], leaves[3], training)
            grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out, *grads, rm, rv))
        if fast:
            assert calls == [] and "CppNode" in out.grad_fn.name()
    assert calls  # the Python path did call them
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fastpath_loads_under_the_torch_it_was_built_for():
    """fusedres._fastpath is built for one torch (version and commit) and CPython: there it must
    load (a silent fallback would hide a broken build), anywhere else it must not."""
    import sys

    from fusedres import _extension

    info = _extension.BUILD_INFO
    if not _extension.EXTENSION_LOADED or not info.get("fastpath"):
        pytest.skip("no fusedres._C, or built with FUSEDRES_FASTPATH=0")
    matches = (
        torch.__version__ == info["torch"]
        and torch.version.git_version == info["torch_git"]
        and info["fastpath"] == f"cpython-{sys.version_info[0]}{sys.version_info[1]}"
    )
    if os.environ.get("FUSEDRES_FASTPATH") == "0":
        assert _extension.FASTPATH is None and "FUSEDRES_FASTPATH=0" in _extension.FASTPATH_ERROR
    elif matches:
        assert _extension.FASTPATH is not None, _extension.FASTPATH_ERROR
    else:
        assert _extension.FASTPATH is None and "built for" in _extension.FASTPATH_ERROR


def test_fastpath_mismatch_names_what_differs():
    from fusedres._extension import fastpath_mismatch

    info = {"torch": "2.14.1+cu130", "torch_git": "abc", "fastpath": "cpython-311"}
    assert fastpath_mismatch(info, "2.14.1+cu130", "abc", "cpython-311") is None
    assert "running torch 2.11.0" in fastpath_mismatch(info, "2.11.0", "def", "cpython-311")
    assert "running torch 2.14.1+cu130" in fastpath_mismatch(info, "2.14.1+cu130", "def", "cpython-311")
    assert "running cpython-312" in fastpath_mismatch(info, "2.14.1+cu130", "abc", "cpython-312")
    assert "not built" in fastpath_mismatch({"torch": "2.14.1"}, "2.14.1", "abc", "cpython-311")


def test_training_running_stat_update_bumps_versions():
    """The stats kernel updates the running stats in place; autograd and the eval-mode fold
    cache (keyed by tensor versions) must see it."""
    if "cpu" not in fusedres.available_backends("cpu"):
        pytest.skip("fusedres._C not loaded")
    rm, rv = torch.zeros(4), torch.ones(4)
    before = (rm._version, rv._version)
    with fusedres.use_backend("cpu"):
        fusedres.batch_norm_add_relu(torch.randn(2, 4, 3, 3), None, rm, rv, training=True)
    assert rm._version > before[0] and rv._version > before[1]
    assert not torch.equal(rm, torch.zeros(4))


def test_backend_choice_is_cached_until_the_selection_changes(monkeypatch):
    calls = []
    real = backends._resolve
    monkeypatch.setattr(backends, "_resolve", lambda device: calls.append(device) or real(device))
    with fusedres.use_backend("reference"):
        for _ in range(3):
            fusedres.add_layer_norm(torch.randn(2, 8))
        assert len(calls) == 1
        with fusedres.use_backend("auto"):
            fusedres.add_layer_norm(torch.randn(2, 8))
        assert len(calls) == 2
    assert backends.resolve_backend(torch.device("cpu")) in fusedres.available_backends("cpu")
