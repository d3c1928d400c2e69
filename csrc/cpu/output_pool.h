// Reused memory for large CPU outputs.
//
// glibc serves a block of 32 MiB and up with a fresh mmap and unmaps it on free, so every such
// output's pages fault on first write: on add_layer_norm 8192x1024 fp32 forward + backward (2-core
// EPYC VM, 2 threads) 16k faults take ~19 of the step's ~28 ms; the kernels themselves take ~9.
// Smaller outputs pay too, for a reason not traced: the forward of a prenorm add_layer_norm at
// 1024 x 768 fp32 (3 MiB y and h, 1 thread) took 1.69 ms with torch's allocator and 0.33 ms on
// pooled blocks after other ops had allocated, 0.71 and 0.44 ms in a process that allocates
// nothing else, where getrusage counted no page faults. PyTorch's CPU tuning guide answers
// that with jemalloc or tcmalloc in LD_PRELOAD; this pool does it for fusedres's own outputs: a
// freed output's block is kept (its pages stay mapped) and handed to the next output of the same
// rounded size.
//
// - Outputs of at least 1 MiB; sizes round up to 1 MiB. The pool keeps at most
//   FUSEDRES_CPU_POOL_MB (default 1024; 0 turns it off) of freed blocks, dropping the least
//   recently freed first. Read once per process.
// - The tensor is made by torch_from_blob with a deleter that returns its block here. That entry
//   of the stable C shim exists from torch 2.11; it is looked up at run time, so the extension
//   still loads on 2.10, where outputs come from torch's allocator as before.
// - Thread-safe (a tensor may be freed on any thread), and never destroyed: a tensor freed while
//   the process exits still finds it. A child of fork() starts with an empty pool of its own.
// - Such a tensor's storage cannot be resized in place (resize_ past its size raises).
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <optional>

namespace fusedres::cpu {

// A tensor of these sizes and strides from the pool, or nullopt when the pool does not serve it
// (too small, turned off, no torch_from_blob): the caller allocates it the usual way.
std::optional<torch::stable::Tensor> pooled_empty_strided(
    const int64_t* sizes, const int64_t* strides, int64_t ndim, torch::headeronly::ScalarType dtype);

// Frees every block the pool holds; returns the bytes released.
int64_t release_pool();

// The most bytes of freed blocks the pool keeps (0: off, or torch has no torch_from_blob).
int64_t pool_capacity();

// Bytes the pool holds now (freed blocks waiting for reuse).
int64_t pool_cached_bytes();

}  // namespace fusedres::cpu
