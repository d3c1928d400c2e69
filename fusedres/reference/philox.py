"""Philox4x32-10 and the counter layout of fused dropout, in torch int64 arithmetic: the spec.

Every backend computes the same function (csrc/philox.h for the C++ CPU and CUDA kernels,
fusedres/triton/philox.py for Triton); tests/test_philox.py holds them to this module, and this
module to Random123's published known answers.

Counter layout (also written in csrc/philox.h):

* ``seed_offset = [seed, offset]``: two int64 drawn from torch's generator per call
  (``fusedres._rng.philox_seed_offset``), read as uint64 (two's complement).
* Element ``e = row * N + col`` of the op's (M, N) input, in logical row-major order whatever its
  strides, takes lane ``e % 4`` of the Philox4x32-10 block at the 128-bit counter
  ``offset + e // 4 (mod 2**64)``: ``c0`` its low 32 bits, ``c1`` its high 32 bits, ``c2 = c3 = 0``;
  the key is the seed: ``k0`` its low 32 bits, ``k1`` its high 32 bits. Call that uint32 ``bits(e)``.
* Element e is kept iff ``bits(e) >= threshold(p)``, ``threshold(p) = min(floor(p * 2**32), 2**32 - 1)``
  computed in double: an integer compare, so no backend's float rounding can flip an element. An
  element is dropped with probability ``threshold(p) / 2**32``, within ``2**-32`` of p.
* Kept values are multiplied by ``scale(p) = 1 / (1 - p)`` (in double, rounded once to the kernel's
  accumulation type).

All four lanes of every block are used: one Philox evaluation per 4 elements.
"""

from __future__ import annotations

import math

import torch

# Random123's Philox4x32 constants: round multipliers and the Weyl sequence that bumps the key.
MUL0 = 0xD2511F53
MUL1 = 0xCD9E8D57
WEYL0 = 0x9E3779B9
WEYL1 = 0xBB67AE85
ROUNDS = 10
_M32 = 0xFFFFFFFF
_TWO32 = 2**32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m, for a holding uint32 values in int64 and m < 2**32.

    The full product would overflow int64, so m is split in 16-bit halves: every partial product
    stays below 2**49."""
    t = a * (m >> 16)
    u = a * (m & 0xFFFF)
    hi = (t + (u >> 16)) >> 16
    lo = (((t & 0xFFFF) << 16) + u) & _M32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 of counter words (c0, c1, c2, c3) (int64 tensors of uint32 values, any
    shape) under key (k0, k1) (ints < 2**32): four int64 tensors of uint32 values."""
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, MUL0)
        hi1, lo1 = _mulhilo(c2, MUL1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + WEYL0) & _M32
        k1 = (k1 + WEYL1) & _M32
    return c0, c1, c2, c3


def seed_offset_values(seed_offset: torch.Tensor) -> tuple[int, int]:
    """(seed, offset) as the unsigned 64-bit ints the layout reads."""
    seed, offset = (int(v) & (_TWO32**2 - 1) for v in seed_offset.tolist())
    return seed, offset


def philox_bits(seed_offset: torch.Tensor, numel: int) -> torch.Tensor:
    """bits(e) for e in [0, numel), as an int64 tensor of uint32 values on the CPU."""
    seed, offset = seed_offset_values(seed_offset)
    blocks = (numel + 3) // 4
    q = torch.arange(blocks, dtype=torch.int64)
    # counter = offset + q (mod 2**64) in 32-bit words, without int64 overflow: q < 2**62.
    low = (offset & _M32) + (q & _M32)
    c0 = low & _M32
    c1 = ((offset >> 32) + (q >> 32) + (low >> 32)) & _M32
    zero = torch.zeros_like(q)
    lanes = philox4x32_10(c0, c1, zero, zero, seed & _M32, seed >> 32)
    return torch.stack(lanes, dim=1).reshape(-1)[:numel]


def dropout_threshold(p: float) -> int:
    """Elements whose bits are >= this are kept."""
    return min(math.floor(p * _TWO32), _TWO32 - 1)


def dropout_scale(p: float) -> float:
    """The factor kept elements are multiplied by."""
    return 1.0 / (1.0 - p)


def dropout_mask_reference(shape, p: float, seed_offset: torch.Tensor) -> torch.Tensor:
    """The keep-mask (bool, True = kept) of fused dropout for an input of `shape`, on
    seed_offset's device: fusedres.dropout_mask's spec."""
    shape = tuple(shape)
    numel = math.prod(shape)
    keep = philox_bits(seed_offset, numel) >= dropout_threshold(p)
    return keep.reshape(shape).to(seed_offset.device)
