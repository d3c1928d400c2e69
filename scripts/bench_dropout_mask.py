"""Dropout mask generation on the CPU: fusedres::dropout_mask against torch's own mask generation
on the same shape, per thread count, and the host cost of a call's [seed, offset] draw.

    quiet python scripts/bench_dropout_mask.py [--shape 4096 768] [--threads 1 2] [--p 0.1]

torch's side: ``bernoulli_`` of a bool and of a float32 tensor (F.dropout's mask: it draws a
float mask of x's dtype, then multiplies), ``aten.native_dropout`` (the whole F.dropout in
training: mask and masked x), and ``torch.rand(...) >= p`` compiled by Inductor. Times are
medians of 15 repeats; ns per element and masks per second of the shape.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

import fusedres


def median_seconds(fn, repeats: int = 15) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mask_providers(rows: int, cols: int, p: float) -> dict:
    so = fusedres.philox_seed_offset(torch.device("cpu"))
    x = torch.randn(rows, cols)
    keep_bool = torch.empty(rows, cols, dtype=torch.bool)
    keep_float = torch.empty(rows, cols)
    compiled = torch.compile(lambda t: torch.rand_like(t) >= p)
    return {
        "fusedres::dropout_mask (bool)": lambda: torch.ops.fusedres.dropout_mask(so, rows, cols, p),
        "fusedres: seed draw + mask": lambda: torch.ops.fusedres.dropout_mask(
            fusedres.philox_seed_offset(torch.device("cpu")), rows, cols, p
        ),
        "torch bool.bernoulli_(1-p)": lambda: keep_bool.bernoulli_(1 - p),
        "torch float32.bernoulli_(1-p)": lambda: keep_float.bernoulli_(1 - p),
        "torch aten.native_dropout (mask + x*mask)": lambda: torch.ops.aten.native_dropout(x, p, True),
        "torch.compile(rand_like(x) >= p)": lambda: compiled(x),
    }


def host_costs() -> dict:
    cpu = torch.device("cpu")
    so = fusedres.philox_seed_offset(cpu)
    return {
        "fusedres.philox_seed_offset(cpu)": lambda: fusedres.philox_seed_offset(cpu),
        "fusedres.dropout_mask((1, 4), 0.1, so)": lambda: fusedres.dropout_mask((1, 4), 0.1, so),
        "torch.empty(2, dtype=int64) (allocation alone)": lambda: torch.empty(2, dtype=torch.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 768))
    parser.add_argument("--threads", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--p", type=float, default=0.1)
    args = parser.parse_args()
    rows, cols = args.shape
    numel = rows * cols
    print(f"dropout mask of {rows}x{cols}, p={args.p}; torch {torch.__version__}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, fn in mask_providers(rows, cols, args.p).items():
            t = median_seconds(fn)
            per_elem = t / numel * 1e9
            print(f"  {threads} thread(s)  {name:44s} {t * 1e3:8.3f} ms  {per_elem:6.3f} ns/elem  {1 / t:8.1f} masks/s")
    torch.set_num_threads(1)
    print("host cost per call (best of 5 x 20000 calls, 1 thread)")
    for name, fn in host_costs().items():
        fn()
        t = min(timeit.repeat(fn, number=20000, repeat=5)) / 20000
        print(f"  {name:50s} {t * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
