"""Philox4x32-10 and the dropout counter layout: one mask for one seed_offset on every backend.

The spec is fusedres/reference/philox.py; it is held to Random123's published known answers,
and csrc/philox.h (on its own and through the CPU operator) and fusedres/triton/philox.py to it.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess

import pytest
import torch

import fusedres
from fusedres._extension import EXTENSION_LOADED
from fusedres.reference.philox import dropout_mask_reference, dropout_threshold, philox4x32_10, philox_bits

try:
    import triton
    import triton.language as tl

    from fusedres.triton.philox import philox4x32_10 as triton_philox4x32_10
except ImportError:  # no triton on this platform: its tests skip
    triton = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Random123's known-answer vectors for philox4x32 with 10 rounds: counter (c0, c1, c2, c3), key
# (k0, k1) -> output. From the kat_vectors file of D. E. Shaw Research's Random123 distribution
# (github.com/DEShawResearch/random123, tests/kat_vectors), as reproduced in
# github.com/DEShawResearch/fs123, core123/ut/ut_philox.cpp (test_kat_philox4x32).
KAT_LINES = [
    "00000000 00000000 00000000 00000000  00000000 00000000  6627e8d5 e169c58d bc57ac4c 9b00dbd8",
    "ffffffff ffffffff ffffffff ffffffff  ffffffff ffffffff  408f276d 41c83b0e a20bc7c6 6d5451fd",
    "243f6a88 85a308d3 13198a2e 03707344  a4093822 299f31d0  d16cfe09 94fdcceb 5001e420 24126ea1",
]
KAT = [(tuple(w[:4]), tuple(w[4:6]), tuple(w[6:])) for w in ([int(v, 16) for v in line.split()] for line in KAT_LINES)]

U64 = 2**64
# [seed, offset] as uint64: an all-ones key, offsets whose counters cross 2**32 (the carry into
# c1) and wrap past 2**64 within a few blocks.
SEED_OFFSETS = [
    (0, 0),
    (0x0123456789ABCDEF, 2**32 - 3),
    (U64 - 1, U64 - 2),
    (2**63 + 5, 2**63 - 1),
]
# (rows, cols): N = 1, 3, 1000; rows * cols not a multiple of 4; rows starting mid-block.
SHAPES = [(1, 1), (5, 1), (7, 3), (3, 13), (2, 1000), (33, 31), (4, 8)]
PS = [0.0, 0.1, 0.5, 0.93]

needs_extension = pytest.mark.skipif(not EXTENSION_LOADED, reason=f"fusedres._C: {fusedres.EXTENSION_ERROR}")


def seed_offset(seed: int, offset: int, device="cpu") -> torch.Tensor:
    """[seed, offset] given as uint64 values, stored as int64 (two's complement)."""
    signed = [v - U64 if v >= 2**63 else v for v in (seed, offset)]
    return torch.tensor(signed, dtype=torch.int64, device=device)


def describe(ours: torch.Tensor, ref: torch.Tensor) -> str:
    bad = torch.nonzero(ours.cpu() != ref.cpu())
    return f"{len(bad)} of {ref.numel()} keep bits differ, first at {bad[:5].tolist()}"


def triton_device() -> str:
    """Where the Triton kernels run here: the GPU, or the CPU under TRITON_INTERPRET=1."""
    if triton is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if "triton" not in fusedres.available_backends("cpu"):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    return "cpu"


# --- known answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_reference_known_answers(counter, key, expected):
    words = philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


if triton is not None:

    @triton.jit
    def _philox_block_kernel(IN, OUT):
        # IN: the counter words, then the key (int64); OUT: the block.
        i = tl.arange(0, 4)
        w = tl.load(IN + i).to(tl.uint32)
        c0 = tl.sum(tl.where(i == 0, w, 0))
        c1 = tl.sum(tl.where(i == 1, w, 0))
        c2 = tl.sum(tl.where(i == 2, w, 0))
        c3 = tl.sum(tl.where(i == 3, w, 0))
        j = tl.arange(0, 2)
        key = tl.load(IN + 4 + j).to(tl.uint32)
        k0 = tl.sum(tl.where(j == 0, key, 0))
        k1 = tl.sum(tl.where(j == 1, key, 0))
        r0, r1, r2, r3 = triton_philox4x32_10(c0, c1, c2, c3, k0, k1)
        out = tl.where(i == 0, r0, tl.where(i == 1, r1, tl.where(i == 2, r2, r3)))
        tl.store(OUT + i, out.to(tl.int64))


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_triton_known_answers(counter, key, expected):
    device = triton_device()
    words = torch.tensor([*counter, *key], dtype=torch.int64, device=device)
    out = torch.empty(4, dtype=torch.int64, device=device)
    _philox_block_kernel[(1,)](words, out)
    assert tuple(out.tolist()) == expected


@functools.cache
def _header_program(tmp_dir: str) -> str:
    """tests/cpp/philox_bits.cpp (csrc/philox.h alone) compiled with the host C++ compiler."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build tests/cpp/philox_bits.cpp")
    exe = os.path.join(tmp_dir, "philox_bits")
    src = os.path.join(ROOT, "tests", "cpp", "philox_bits.cpp")
    cmd = [compiler, "-O2", "-std=c++17", "-fopenmp-simd", "-I", os.path.join(ROOT, "csrc"), src, "-o", exe]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    """Runs requests through the header program: a list of lines in, a list of word lists out."""
    exe = _header_program(str(tmp_path_factory.mktemp("philox")))

    def run(requests: list[str]) -> list[list[int]]:
        done = subprocess.run([exe], input="\n".join(requests) + "\n", capture_output=True, text=True, check=True)
        return [[int(w, 16) for w in line.split()] for line in done.stdout.splitlines()]

    return run


def test_header_known_answers(header):
    requests = [f"block {' '.join(f'{w:x}' for w in (*c, *k))}" for c, k, _ in KAT]
    assert [tuple(words) for words in header(requests)] == [expected for *_, expected in KAT]


@pytest.mark.parametrize("fn", ["at", "fill", "fill_avx2"])
@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_header_bits_match_reference(header, fn, seed, offset):
    """fill_bits from both ISA builds (its AVX2 path where the CPU has it, its plain loop for the
    remainder) and bits_at give the reference's bits, for starts inside a block and runs that
    end inside one."""
    runs = [(0, 1), (1, 2), (3, 6), (2, 37), (5, 133), (4, 256), (1, 1029)]
    got = header([f"{fn} {seed} {offset} {start} {n}" for start, n in runs])
    ref = philox_bits(seed_offset(seed, offset), 1100).tolist()
    for (start, n), words in zip(runs, got):
        assert words == ref[start : start + n], f"{fn}: elements [{start}, {start + n})"


@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_header_runs_match_reference(header, seed, offset):
    """bits_run<8>, a GPU thread's pack of 8 elements of a row, from every start within a block."""
    got = header([f"run8 {seed} {offset} {start} 64" for start in range(5)])
    ref = philox_bits(seed_offset(seed, offset), 80).tolist()
    for start, words in enumerate(got):
        assert words == ref[start : start + 64], f"run from element {start}"


@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_header_plain_loop_matches_reference(header, seed, offset):
    """The plain loop, which CPUs without AVX2 run for whole blocks."""
    (words,) = header([f"plain {seed} {offset} 8 512"])
    assert words == philox_bits(seed_offset(seed, offset), 520).tolist()[8:]


@needs_extension
def test_cpu_operator_known_answer():
    """The layout puts the first known answer (zero counter and key) in elements 0..3 of
    seed_offset [0, 0]: bits(e) == t exactly iff e is kept at threshold t and dropped at t + 1
    (p = t / 2**32 is exact in double)."""
    so = seed_offset(0, 0)
    expected = KAT[0][2]
    for e, t in enumerate(expected):
        kept = torch.ops.fusedres.dropout_mask(so, 1, 4, t / 2**32)[0, e]
        dropped = not torch.ops.fusedres.dropout_mask(so, 1, 4, (t + 1) / 2**32)[0, e]
        assert kept and dropped, f"element {e}: bits != {t:#010x}"


# --- one mask on every backend ------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
@pytest.mark.parametrize("rows, cols", SHAPES)
def test_cpu_mask_matches_reference(seed, offset, rows, cols):
    so = seed_offset(seed, offset)
    for p in PS:
        ours = torch.ops.fusedres.dropout_mask(so, rows, cols, p)
        ref = dropout_mask_reference((rows, cols), p, so)
        assert ours.dtype == torch.bool and ours.shape == (rows, cols)
        assert torch.equal(ours, ref), f"p={p}: {describe(ours, ref)}"


@needs_extension
def test_cpu_mask_across_threads():
    """Tasks split the elements at block boundaries: a mask spanning many tasks, with a
    partial last block, is the reference's."""
    so = seed_offset(7, 2**64 - 1000)
    rows, cols = 1001, 333
    ref = dropout_mask_reference((rows, cols), 0.3, so)
    assert torch.equal(torch.ops.fusedres.dropout_mask(so, rows, cols, 0.3), ref)


# Under the interpreter each program costs milliseconds: a few shapes that cover both paths
# (cols % 4 == 0: aligned blocks; else one block per element) and several column blocks.
TRITON_SHAPES = [(1, 1), (7, 3), (3, 13), (4, 8), (2, 1030), (3, 1028)]


@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
@pytest.mark.parametrize("rows, cols", TRITON_SHAPES)
def test_triton_mask_matches_reference(seed, offset, rows, cols):
    device = triton_device()
    from fusedres.triton.dropout import dropout_mask as triton_dropout_mask

    so = seed_offset(seed, offset, device)
    for p in (0.1, 0.5):
        ours = triton_dropout_mask(so, rows, cols, p)
        ref = dropout_mask_reference((rows, cols), p, so)
        assert ours.device == so.device and ours.dtype == torch.bool
        assert torch.equal(ours, ref), f"p={p}: {describe(ours, ref)}"


@pytest.mark.parametrize("backend", fusedres.available_backends("cpu"))
def test_public_function_on_every_backend(backend):
    """fusedres.dropout_mask: x's shape, any rank; the same mask from every backend."""
    so = seed_offset(2**40 + 3, 2**32 - 1)
    shape = (2, 3, 5)
    ref = dropout_mask_reference(shape, 0.25, so)
    with fusedres.use_backend(backend):
        mask = fusedres.dropout_mask(torch.Size(shape), 0.25, so)
    assert mask.shape == shape and torch.equal(mask, ref)


# --- statistics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_dropped_fraction(p):
    so = fusedres.philox_seed_offset(torch.device("cpu"))
    mask = fusedres.dropout_mask((512, 256), p, so)
    dropped = 1.0 - mask.double().mean().item()
    assert abs(dropped - p) < 0.01, f"dropped {dropped:.4f} of the elements for p={p}"


def test_p_zero_keeps_everything():
    so = seed_offset(U64 - 1, 12345)
    assert fusedres.dropout_mask((64, 33), 0.0, so).all()


def test_threshold():
    """An integer threshold floor(p * 2**32): p = t / 2**32 drops exactly the bits below t."""
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    assert dropout_threshold(0.1) == math.floor(0.1 * 2**32)
    assert dropout_threshold(1 - 2**-53) == 2**32 - 1


def test_lanes_are_independent_streams():
    """Every lane of a block is used: the four lanes, and neighbouring blocks, keep independently
    (a layout bug that repeated one lane would show as correlation)."""
    mask = fusedres.dropout_mask((1, 1 << 16), 0.5, seed_offset(99, 0)).reshape(-1, 4).double()
    kept = mask.mean(dim=0)
    assert torch.all((kept - 0.5).abs() < 0.02), kept
    both = (mask[:, 0] * mask[:, 1]).mean().item()
    assert abs(both - 0.25) < 0.02


# --- the generator state ----------------------------------------------------------------------------


def test_manual_seed_reproduces_and_draws_differ():
    cpu = torch.device("cpu")
    torch.manual_seed(1234)
    first = fusedres.philox_seed_offset(cpu)
    second = fusedres.philox_seed_offset(cpu)
    torch.manual_seed(1234)
    again = fusedres.philox_seed_offset(cpu)
    assert first.dtype == torch.int64 and first.shape == (2,)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    shape = (64, 96)
    assert torch.equal(fusedres.dropout_mask(shape, 0.2, first), fusedres.dropout_mask(shape, 0.2, again))
    assert not torch.equal(fusedres.dropout_mask(shape, 0.2, first), fusedres.dropout_mask(shape, 0.2, second))


# --- the operator for torch.compile ---------------------------------------------------------------


@needs_extension
def test_opcheck_cpu():
    so = seed_offset(5, 2**32 - 2)
    torch.library.opcheck(torch.ops.fusedres.dropout_mask.default, (so, 7, 13, 0.3))


def test_opcheck_triton():
    device = triton_device()
    pytest.importorskip("triton")
    import fusedres.triton.dropout  # noqa: F401

    so = seed_offset(5, 2**32 - 2, device)
    torch.library.opcheck(torch.ops.fusedres.dropout_mask_triton.default, (so, 3, 13, 0.3))


@needs_extension
def test_compile_fullgraph():
    """The public function compiles without graph breaks and gives eager's mask; drawing the
    seed_offset inside the compiled function is reproducible and fresh per call."""

    @torch.compile(fullgraph=True)
    def mask_of(x, so):
        return fusedres.dropout_mask(x.shape, 0.3, so)

    x = torch.randn(9, 31)
    so = seed_offset(11, U64 - 3)
    assert torch.equal(mask_of(x, so), dropout_mask_reference(x.shape, 0.3, so))

    @torch.compile(fullgraph=True)
    def dropout(x):
        so = fusedres.philox_seed_offset(x.device)
        return x * fusedres.dropout_mask(x.shape, 0.5, so) * 2.0

    torch.manual_seed(0)
    a, b = dropout(x), dropout(x)
    torch.manual_seed(0)
    again = dropout(x)
    assert torch.equal(a, again) and not torch.equal(a, b)


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, error, match",
    [
        (1.0, ValueError, r"p \(the dropout probability\) must be in \[0, 1\)"),
        (-0.1, ValueError, r"must be in \[0, 1\)"),
        (float("nan"), ValueError, r"must be in \[0, 1\)"),
        ("0.1", TypeError, "p .* must be a real number"),
        (True, TypeError, "p .* must be a real number"),
    ],
)
def test_bad_p(p, error, match):
    with pytest.raises(error, match=match):
        fusedres.dropout_mask((4, 4), p, seed_offset(1, 2))


@pytest.mark.parametrize(
    "so, error, match",
    [
        ([1, 2], TypeError, "seed_offset must be a torch.Tensor"),
        (torch.tensor([1.0, 2.0]), TypeError, "seed_offset must be an int64 tensor"),
        (torch.tensor([1, 2], dtype=torch.int32), TypeError, "seed_offset must be an int64 tensor"),
        (torch.tensor([1, 2, 3]), ValueError, r"seed_offset must be a contiguous tensor of shape \(2,\)"),
        (torch.tensor([[1, 2]]), ValueError, r"of shape \(2,\)"),
        (torch.tensor([1, 0, 2, 0])[::2], ValueError, "not contiguous"),
    ],
)
def test_bad_seed_offset(so, error, match):
    with pytest.raises(error, match=match):
        fusedres.dropout_mask((4, 4), 0.1, so)


def test_seed_offset_on_the_wrong_device():
    with pytest.raises(ValueError, match="seed_offset is on cpu but device is on meta"):
        fusedres.dropout_mask((4, 4), 0.1, seed_offset(1, 2), device=torch.device("meta"))


@pytest.mark.parametrize("shape", [(), (-1, 4), (2.0, 3), 5])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="shape must be"):
        fusedres.dropout_mask(shape, 0.1, seed_offset(1, 2))


@needs_extension
def test_cpu_operator_refuses_what_it_cannot_index():
    so = seed_offset(1, 2)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        torch.ops.fusedres.dropout_mask(so, 2, 2, 1.0)
    with pytest.raises(RuntimeError, match="rows >= 0 and cols >= 0"):
        torch.ops.fusedres.dropout_mask(so, -1, 2, 0.1)
    with pytest.raises(RuntimeError, match=r"seed_offset must be a contiguous \(2,\) int64 tensor"):
        torch.ops.fusedres.dropout_mask(so.int(), 2, 2, 0.1)


# --- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_gpu_mask_matches_cpu(backend, seed, offset):
    if backend not in fusedres.available_backends("cuda"):
        pytest.skip(f"{backend} is not usable on this GPU")
    so = seed_offset(seed, offset)
    for rows, cols in SHAPES + [(4096, 768), (1000, 1001)]:
        if EXTENSION_LOADED:  # the CPU operator, itself tested against the reference above
            ref = torch.ops.fusedres.dropout_mask(so, rows, cols, 0.1)
        else:
            ref = dropout_mask_reference((rows, cols), 0.1, so)
        with fusedres.use_backend(backend):
            ours = fusedres.dropout_mask((rows, cols), 0.1, so.cuda())
        assert ours.is_cuda and torch.equal(ours.cpu(), ref), f"{backend} {rows}x{cols}: {describe(ours, ref)}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync(backend):
    if backend not in fusedres.available_backends("cuda"):
        pytest.skip(f"{backend} is not usable on this GPU")
    device = torch.device("cuda")
    with fusedres.use_backend(backend):
        fusedres.dropout_mask((256, 768), 0.1, fusedres.philox_seed_offset(device))  # compiles, loads
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fusedres.dropout_mask((256, 768), 0.1, fusedres.philox_seed_offset(device))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replays_draw_fresh_masks(backend):
    """Captured: the seed_offset draw and the mask. Each replay reads a new [seed, offset] (the
    generator's philox offset advances per replay) and the mask is the layout's for it."""
    if backend not in fusedres.available_backends("cuda"):
        pytest.skip(f"{backend} is not usable on this GPU")
    device = torch.device("cuda")
    shape = (64, 1000)
    with fusedres.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture (Triton compiles)
            fusedres.dropout_mask(shape, 0.1, fusedres.philox_seed_offset(device))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            so = fusedres.philox_seed_offset(device)
            mask = fusedres.dropout_mask(shape, 0.1, so)
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append((so.clone().cpu(), mask.clone().cpu()))
    for so_cpu, mask_cpu in seen:
        assert torch.equal(mask_cpu, dropout_mask_reference(shape, 0.1, so_cpu))
    assert not torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[1][0], seen[2][0])
    assert not torch.equal(seen[0][1], seen[1][1])
