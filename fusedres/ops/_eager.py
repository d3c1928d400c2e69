"""How the eager path calls a kernel: straight to it when nothing else needs to see the call.

A C++ operator called from Python goes through torch's dispatcher: a `__torch_function__` scan of
every argument, the Autograd key (where `torch.library.register_autograd` puts a Python kernel),
then the backend's kernel. Our autograd.Function has already handled autograd, so the eager path
calls the backend kernel directly, with `redispatch_boxed` at the backend's dispatch key (~2 us a
call less than `with _AutoDispatchBelowAutograd(): op(...)` on a 2-core EPYC) - but only when no
other layer of the dispatcher has a say: no TorchDispatchMode (FakeTensorMode, profilers that
count ops), no functorch transform (vmap, grad, functionalize), and only plain tensors (no
`__torch_dispatch__` subclass). Otherwise the registered operator is called below Autograd and
the dispatcher routes it as usual. Triton launchers are plain Python: the same rule decides
between the launcher and the registered Triton operator.
"""

from __future__ import annotations

import contextlib
import functools

import torch

below_autograd = torch._C._AutoDispatchBelowAutograd
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_KEYS = {
    "cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
    "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA),
}


def direct(op: torch._ops.OpOverload, device_type: str):
    """op's kernel for `device_type`, called without the dispatcher's other layers."""
    return functools.partial(op._handle.redispatch_boxed, _KEYS[device_type])


def plain(a, b=None, c=None, d=None) -> bool:
    """Whether the kernels may be called directly for these tensors (None is fine)."""
    if _dispatch_modes():
        return False
    return plain_tensors(a, b, c, d)


def plain_tensors(a, b=None, c=None, d=None) -> bool:
    """No functorch transform and plain tensors (None is fine): what a C++ caller of the
    operators below Autograd needs (dispatch modes still see those calls)."""
    if _functorch_active():
        return False
    return (
        a.__class__ in _PLAIN
        and (b is None or b.__class__ in _PLAIN)
        and (c is None or c.__class__ in _PLAIN)
        and (d is None or d.__class__ in _PLAIN)
    )


def fastpath_switch(namespace: dict, name: str = "_fastpath"):
    """(has_fastpath, without_fastpath) for an op module whose eager call reads the C++ fast path
    from the module global `name` (a global: the cheapest lookup on the hot path), None where
    fusedres._fastpath did not load. without_fastpath() runs the enclosed calls on the Python path
    (what the tests and the bench compare it with; a process-wide switch, not thread-safe)."""

    def has_fastpath() -> bool:
        return namespace[name] is not None

    @contextlib.contextmanager
    def without_fastpath():
        saved, namespace[name] = namespace[name], None
        try:
            yield
        finally:
            namespace[name] = saved

    return has_fastpath, without_fastpath
