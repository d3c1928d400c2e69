"""The CPU output pool: large CPU outputs of the C++ kernels reuse the blocks of freed ones.

A fresh multi-megabyte CPU tensor costs a page fault per 4 KiB page on first write (glibc maps
blocks of 32 MiB and up anew for every allocation and unmaps them on free); on a memory-bound op
those faults take longer than the kernel, and smaller fresh outputs measured slower than reused
ones too (csrc/cpu/output_pool.h). So outputs of 1 MiB and more come from a pool of freed
blocks that stay mapped (csrc/cpu/output_pool.h), capped at FUSEDRES_CPU_POOL_MB megabytes of
freed blocks (default 1024; 0 turns the pool off), read once per process. It needs torch >= 2.11
(the stable ABI's from_blob with a deleter); under torch 2.10 outputs come from torch's allocator.
A pooled tensor's storage cannot be resized in place.
"""

from __future__ import annotations

from fusedres._extension import EXTENSION_LOADED


def cpu_pool_stats() -> dict[str, int]:
    """{"capacity_bytes": the most freed bytes kept (0: the pool is off or unavailable),
    "cached_bytes": freed bytes held for reuse now}."""
    capacity = cached = 0
    if EXTENSION_LOADED:
        from fusedres import _C

        capacity, cached = _C.cpu_pool_stats()
    return {"capacity_bytes": capacity, "cached_bytes": cached}


def cpu_pool_release() -> int:
    """Frees every block the pool holds (the memory goes back to the system); returns the bytes.
    Outputs still alive are not affected: their blocks return to the pool when they are freed."""
    if not EXTENSION_LOADED:
        return 0
    from fusedres import _C

    return _C.cpu_pool_release()
