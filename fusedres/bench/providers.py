"""Who runs each case: eager PyTorch, torch.compile of it, each usable fusedres backend, and the
peer libraries that are installed.

"eager" is the code a user has now and the yardstick of every speedup; "compile" is what they
could have without fusedres. fusedres's Triton interpreter (CPU) and its reference backend are
test vehicles, not timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fusedres
from fusedres.bench.peers import available_peers


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "eager", "compile", "fusedres" or "peer"
    make: Callable[[object], Callable]  # case -> callable over the case's inputs
    skip_reason: Callable[[object], str | None] = lambda case: None


def _compiled(case):
    # Timing backward alone re-runs it on one graph (retain_graph), which donated buffers
    # forbid; they save memory, not time. dynamic=False: parity runs a smaller shape first, and
    # a second shape would otherwise recompile the timed shape as a dynamic-shape kernel.
    torch._functorch.config.donated_buffer = False
    return torch.compile(case.eager(), dynamic=False)


def _fusedres(backend: str) -> Callable:
    def make(case):
        fused = case.fused()

        def fn(*inputs):
            with fusedres.use_backend(backend):
                return fused(*inputs)

        return fn

    return make


def fusedres_backends(device: torch.device) -> list[str]:
    usable = [b for b in fusedres.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        usable = [b for b in usable if b != "triton"]  # the interpreter is for tests, not timing
    return usable


def _selected(name: str, names: list[str] | None) -> bool:
    """`names` entries match exactly or as a prefix before a dash ("fusedres" selects every
    fusedres-<backend>)."""
    return not names or any(name == n or name.startswith(n + "-") for n in names)


def providers(
    device: torch.device,
    backends: list[str] | None = None,
    names: list[str] | None = None,
    peers: bool = True,
) -> tuple[list[Provider], list[str]]:
    """The providers to run and notes on peers left out (not installed, no CUDA)."""
    found = [Provider("eager", "eager", lambda case: case.eager()), Provider("compile", "compile", _compiled)]
    for b in fusedres_backends(device):
        if not backends or b in backends:
            found.append(Provider(f"fusedres-{b}", "fusedres", _fusedres(b)))
    notes = []
    if peers:
        usable, notes = available_peers(device)
        for name, (peer, api) in usable.items():
            found.append(Provider(name, "peer", lambda case, p=peer, a=api: p.build(a, case), peer.supports))
    notes = [n for n in notes if _selected(n.split(":")[0], names)]
    return [p for p in found if _selected(p.name, names)], notes
