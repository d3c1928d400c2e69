"""Timing: medians and quantiles with warm-up; CUDA events on GPU, perf_counter on CPU."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantiles(samples_ms: list[float]) -> Timing:
    s = sorted(samples_ms)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]
    return Timing(statistics.median(s), q(0.2), q(0.8), len(s))


def measure(fn, device: torch.device | str, *, warmup: int = 3, reps: int = 20, max_seconds: float = 5.0) -> Timing:
    """Runs fn() `warmup` times, then up to `reps` timed runs (fewer if they exceed max_seconds)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        # Each rep writes a buffer larger than L2 first, so inputs are read from HBM, not cache.
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        torch.cuda.synchronize(device)
        start_all = time.perf_counter()
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
            if time.perf_counter() - start_all > max_seconds:
                break
    else:
        start_all = time.perf_counter()
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - start_all > max_seconds:
                break
    return _quantiles(samples)


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 256 * 2**20) -> float:
    """The device's achievable memory bandwidth, measured as a large tensor copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9
