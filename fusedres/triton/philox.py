"""Philox4x32-10 and the counter layout of fused dropout for Triton kernels.

The same function and layout as csrc/philox.h (the C++ CPU and CUDA kernels); the spec is
fusedres/reference/philox.py, whose docstring states the layout: element e = row * N + col takes
lane e % 4 of the block at counter offset + e // 4 (mod 2**64) under key = seed, and is kept iff
that uint32 >= threshold(p).

The round function is written out here rather than taken from ``tl.randint4x``: that one has the
same round, constants and (c0, c1) = (low, high) word order of a 64-bit counter (triton 3.x), but
this module then states the layout without depending on Triton's choice, and the known-answer
test can feed all four counter words.

How a kernel gets its elements' keep bits (SO: the seed_offset pointer; threshold: the host's
``dropout_threshold(p)``, an int kernel argument)::

    k0, k1, offset = philox_key_offset(SO)
    # elements e0 .. e0 + BLOCK - 1 with e0 % 4 == 0 (and BLOCK % 4 == 0): one block per 4 lanes
    bits = philox_bits_aligned(k0, k1, offset, e0, BLOCK)
    # any elements (a row whose start e0 = row * N is not a multiple of 4): one block per element
    bits = philox_bits(k0, k1, offset, e)
    keep = bits >= threshold.to(tl.uint32)

GPU cost: Philox4x32-10 is ~80 integer instructions per block (40 of them multiplies). Per
element with all 4 lanes used that is ~20 instructions, a fraction of what a memory-bound Add &
Norm's bytes allow on an H100 (~3 TB/s against ~15 T integer ops/s); per element with one lane
(``philox_bits``) it is ~80, which can make the kernel ALU-bound. So kernels take the aligned path
whenever N % 4 == 0 (a constexpr: every row start row * N is then aligned) and the per-element
one only for other N. The aligned path interleaves the four lanes with ``tl.join`` + ``reshape``:
each thread then holds 4 consecutive elements of one block, the same register layout as a
16-byte fp32 load.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counter words (c0, c1, c2, c3) under uint32 key (k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = tl.mul(c0, 0xD2511F53, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = tl.mul(c2, 0xCD9E8D57, sanitize_overflow=False)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def philox_key_offset(SO):
    """(k0, k1, offset) from the seed_offset tensor [seed, offset] (int64): the key words as uint32
    and the offset as uint64."""
    seed = tl.load(SO).to(tl.uint64, bitcast=True)
    offset = tl.load(SO + 1).to(tl.uint64, bitcast=True)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32), offset


@triton.jit
def philox_block(k0, k1, counter):
    """The four lanes of the blocks at uint64 counters (the layout's c2 = c3 = 0)."""
    zero = (counter * 0).to(tl.uint32)
    return philox4x32_10(counter.to(tl.uint32), (counter >> 32).to(tl.uint32), zero, zero, k0, k1)


@triton.jit
def philox_bits(k0, k1, offset, e):
    """bits(e) for a tensor of element indices e (any int type, >= 0): one block per element."""
    e = e.to(tl.uint64)
    r0, r1, r2, r3 = philox_block(k0, k1, offset + (e >> 2))
    lane = e & 3
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))


@triton.jit
def philox_bits_aligned(k0, k1, offset, e0, BLOCK: tl.constexpr):
    """bits(e0 + i) for i < BLOCK, as a [BLOCK] tensor, when e0 % 4 == 0 and BLOCK % 4 == 0: one
    block per 4 elements."""
    q = (e0 >> 2).to(tl.uint64) + tl.arange(0, BLOCK // 4).to(tl.uint64)
    r0, r1, r2, r3 = philox_block(k0, k1, offset + q)
    # join(join(r0, r2), join(r1, r3))[i, k, j] is lane 2k + j of block i: row-major, element 4i + 2k + j.
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))
