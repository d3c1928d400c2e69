// Transparent huge pages for large CPU outputs.
//
// A fresh multi-megabyte output is a fresh mmap: every 4 KiB page faults on first write, and on a
// memory-bound op those faults cost more than the kernel itself (a 32 MiB fp32 output: ~14 ms of
// faults against ~2 ms of stores on a 2-core EPYC). Asking for huge pages on the output before the
// kernel first touches it cuts the faults 512-fold. This is what torch's own allocator does behind
// THP_MEM_ALLOC_ENABLE=1, applied here to our outputs only. FUSEDRES_CPU_HUGEPAGES=0 turns it off.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedres::cpu {

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FUSEDRES_CPU_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Advises the 2 MiB-aligned interior of t's storage; the unaligned ends keep normal pages.
// Advice is only a hint, so a kernel without THP (or a refusal) changes speed, never results.
inline void advise_huge_pages(const torch::stable::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * static_cast<uintptr_t>(t.element_size());
  if (bytes < 2 * kHuge || !huge_pages_enabled()) {
    return;
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

} // namespace fusedres::cpu
