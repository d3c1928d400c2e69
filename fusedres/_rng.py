"""The random state of fused dropout: one [seed, offset] tensor per call, and its checks.

Every fused dropout reads its mask from ``seed_offset = philox_seed_offset(x.device)``, a (2,)
int64 tensor [seed, offset] on x's device, by the Philox counter layout of csrc/philox.h (spec:
fusedres/reference/philox.py); the backward regenerates the mask from the same tensor.

Why a tensor of two random 64-bit values drawn by ``torch.randint`` on the device:

* torch's default generator for the device draws them, so ``torch.manual_seed`` reproduces a call
  and each call advances the generator: consecutive calls get independent masks (a fresh Philox
  key each; two keys' streams are independent, which is what Inductor relies on too).
* The values stay on the device and kernels read them from there (a pointer argument): no host
  sync, and under CUDA graph capture ``randint`` is itself capture-safe (the captured kernel reads
  the generator's seed and offset from device memory that every replay advances), so each replay
  gets new masks. Inductor draws its random seeds the same way (``inductor_seeds``: one
  ``aten.randint.low_out`` into an int64 tensor); torch.compile traces the call as a random op.
* The alternative, torch's own fused dropouts' scheme (read the generator's seed and philox
  offset on the host and advance the offset by the elements used), is out of reach from here:
  Python has no capture-aware access to a CUDA generator's philox state (that is
  ``at::cuda::philox::unpack`` in C++, outside the stable ABI), and the CPU generator is a
  Mersenne Twister without one. With a fresh key per call, the offset need not count elements
  either: it is a second random word, and a call's counters offset + e // 4 wrap mod 2**64.

Cost: one ``torch.randint`` per call, ~2.5 us of host time on a 2-core EPYC (CPU tensors), and
one tiny kernel on a GPU.
"""

from __future__ import annotations

import numbers

import torch

_TENSOR = torch.Tensor
_INT64 = torch.int64
_SHAPE = (2,)
_HIGH = 2**63 - 1  # randint's exclusive bound: seed and offset in [0, 2**63 - 1)
_randint = torch.randint


def philox_seed_offset(device: torch.device) -> torch.Tensor:
    """A fresh [seed, offset] (int64, shape (2,)) on `device`, from torch's default generator
    for that device: what one fused-dropout call reads its mask from."""
    return _randint(_HIGH, _SHAPE, dtype=_INT64, device=device)


def check_dropout_p(p, name: str = "p") -> float:
    """p as a float in [0, 1), else a TypeError / ValueError naming the argument."""
    if type(p) is float and 0.0 <= p < 1.0:  # NaN fails the compare
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} (the dropout probability) must be a real number, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} (the dropout probability) must be in [0, 1), got {p}")
    return float(p)


def check_seed_offset(seed_offset, device: torch.device | None = None, device_of: str = "x") -> None:
    """seed_offset must be a contiguous (2,) int64 tensor [seed, offset], on `device` (the device
    of the tensor named `device_of`) when given."""
    if not isinstance(seed_offset, _TENSOR):
        raise TypeError(
            f"seed_offset must be a torch.Tensor ([seed, offset], from fusedres.philox_seed_offset), "
            f"got {type(seed_offset).__name__}"
        )
    if seed_offset.dtype != _INT64:
        raise TypeError(f"seed_offset must be an int64 tensor [seed, offset], got {seed_offset.dtype}")
    if seed_offset.shape != _SHAPE or not seed_offset.is_contiguous():
        raise ValueError(
            f"seed_offset must be a contiguous tensor of shape (2,) ([seed, offset]), got shape "
            f"{tuple(seed_offset.shape)}" + ("" if seed_offset.is_contiguous() else ", not contiguous")
        )
    if device is not None and seed_offset.device != device:
        raise ValueError(
            f"seed_offset is on {seed_offset.device} but {device_of} is on {device}: the kernels read it on "
            f"{device_of}'s device (draw it with fusedres.philox_seed_offset(device))"
        )


def check_size(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def check_dropout_mask_op(seed_offset, rows, cols, p) -> None:
    """The dropout_mask operator's arguments (its Triton and fake kernels)."""
    check_seed_offset(seed_offset)
    check_size("rows", rows)
    check_size("cols", cols)
    check_dropout_p(p)
