"""Timing: medians and quantiles after warm-up.

CPU: time.perf_counter around each call.
GPU: CUDA events around each call, rotating among input copies whose total size exceeds L2, so
every call reads its inputs from HBM as it would in a model (see rotation_copies). Calls short
enough for CPU launch and autograd overhead to rival the GPU time are captured in a CUDA graph,
one call per input copy, and timed by replaying it (method "cuda-graph"); when capture fails
(an op that synchronizes, say) they fall back to events per call and say so in `method`.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Without a reported L2 size, assume the largest current one (H100's 50 MB).
DEFAULT_L2_BYTES = 50 * 2**20
MAX_COPIES = 64


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str = "perf_counter"


def quantiles(samples_ms: Sequence[float], method: str = "perf_counter") -> Timing:
    """Median and 20th/80th percentiles (nearest rank) of per-call times."""
    if not samples_ms:
        raise ValueError("no timing samples")
    s = sorted(samples_ms)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]
    return Timing(statistics.median(s), q(0.2), q(0.8), len(s), method)


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return size or DEFAULT_L2_BYTES


def rotation_copies(bytes_per_call: int | None, cache_bytes: int, max_copies: int = MAX_COPIES) -> int:
    """How many input copies to cycle through so that the bytes touched between two uses of the
    same copy are at least twice the cache: by then LRU-ish replacement has evicted it."""
    if not cache_bytes or not bytes_per_call:
        return 1
    return max(1, min(max_copies, math.ceil(2 * cache_bytes / bytes_per_call)))


def _as_list(fns) -> list[Callable]:
    return list(fns) if isinstance(fns, (list, tuple)) else [fns]


def measure(
    fns: Callable | Sequence[Callable],
    device: torch.device | str,
    *,
    warmup: int = 3,
    reps: int = 20,
    max_seconds: float = 5.0,
    cuda_graph: bool = False,
    stream: torch.cuda.Stream | None = None,
) -> Timing:
    """Times calls of fns (one callable, or equivalent callables over different input copies that
    are run in rotation): `warmup` untimed rounds over every copy, then up to `reps` timed calls
    (fewer when they exceed max_seconds).

    On CUDA everything runs on `stream` (default: the current one). Graph capture needs a side
    stream, and the autograd engine runs a backward on the stream of its forward: to capture a
    backward whose forward ran beforehand (direction "bwd"), run that forward on `stream` too."""
    device = torch.device(device)
    fns = _as_list(fns)
    if device.type != "cuda":
        _warm_up(fns, warmup)
        return _measure_cpu(fns, reps, max_seconds)
    if cuda_graph and stream is None:
        stream = torch.cuda.Stream(device)
    stream = stream or torch.cuda.current_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        _warm_up(fns, warmup)
        torch.cuda.synchronize(device)
        if not cuda_graph:
            return _measure_cuda_events(fns, device, reps, max_seconds)
        try:
            return _measure_cuda_graph(fns, device, stream, reps, max_seconds)
        except Exception as e:  # capture is strict: a host sync or an op on another stream refuses it
            torch.cuda.synchronize(device)
            timing = _measure_cuda_events(fns, device, reps, max_seconds)
            timing.method = f"cuda-events (graph capture failed: {type(e).__name__})"
            return timing


def _warm_up(fns, rounds: int) -> None:
    for _ in range(rounds):
        for fn in fns:
            fn()


def _measure_cpu(fns, reps, max_seconds) -> Timing:
    samples = []
    start_all = time.perf_counter()
    for fn in itertools.islice(itertools.cycle(fns), reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds:
            break
    return quantiles(samples, "perf_counter")


def _measure_cuda_events(fns, device, reps, max_seconds) -> Timing:
    # One event pair per call, read after the loop: reading an event synchronizes, which would
    # leave the GPU idle while the CPU queues the next call.
    events = []
    start_all = time.perf_counter()
    for fn in itertools.islice(itertools.cycle(fns), reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
        if time.perf_counter() - start_all > max_seconds:
            break
    torch.cuda.synchronize(device)
    return quantiles([s.elapsed_time(e) for s, e in events], "cuda-events")


def _measure_cuda_graph(fns, device, stream, reps, max_seconds) -> Timing:
    """One graph runs every copy once; a sample is one replay divided by the number of calls."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for fn in fns:
            fn()
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize(device)
    events = []
    start_all = time.perf_counter()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
        if time.perf_counter() - start_all > max_seconds:
            break
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) / len(fns) for s, e in events]
    del graph
    return quantiles(samples, "cuda-graph")


def peak_memory_mb(fn: Callable, device: torch.device) -> float | None:
    """Memory one call allocates beyond what was live before it, at its peak, in MiB. CUDA only:
    the CPU allocator keeps no statistics, so CPU runs report None ("n/a")."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 256 * 2**20) -> float:
    """The device's achievable memory bandwidth, measured as a large tensor copy (read + write).
    256 MiB is several times any L2 (on GPUs two copies rotate besides, so neither is cached)."""
    device = torch.device(device)
    n = nbytes // 4
    pairs = [(torch.empty(n, device=device).normal_(), torch.empty(n, device=device))]
    if device.type == "cuda":
        pairs.append((torch.empty(n, device=device).normal_(), torch.empty(n, device=device)))
    fns = [lambda s=s, d=d: d.copy_(s) for s, d in pairs]
    t = measure(fns, device, warmup=2, reps=10)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9
