// Transparent huge pages for large CPU outputs, where a huge-page fault cannot be the slow one.
//
// Every call's multi-megabyte output is fresh memory (glibc serves large blocks with mmap and
// unmaps them on free), so each of its 4 KiB pages faults on first write, and on a memory-bound op
// those faults cost as much as the kernel: add_layer_norm 8192x1024 fp32 fwd+bwd on a 2-core EPYC
// VM takes 16k faults a step at ~1.9 us each. Advising huge pages on the output (MADV_HUGEPAGE on
// its 2 MiB-aligned interior) before the kernel first touches it cuts the faults 512-fold and,
// when free huge pages are at hand, took that op from ~28 ms to 14-19 ms (eager: 43-57). But a
// huge-page fault has two slow paths, and on either the op loses to eager:
//
// - Free page reporting (a virtio-balloon or Hyper-V guest): the guest hands its free blocks of
//   2 MiB and up back to the host, which has to back them again when they are next touched, and
//   that is where huge-page faults land (a free 2 MiB block is taken before a larger one is
//   split, and most larger free blocks have been reported too): ~2.5-3 ms per huge page, not
//   ~0.15-0.2 (a C loop over fresh 32 MiB mappings: 38-50 ms for the first, 2-3 ms once its own
//   freed pages came back round; with 4 KiB pages 13-17 ms after the first). A fresh process
//   works through those blocks (the order-9 column of /proc/buddyinfo, 20-600 at the start of the
//   runs measured, fell by ~16 a step) before it gets its own back, so its first 3-10 steps took
//   75-115 ms, nearly all of it sys time in clear_page: over 10 steps after 2 warm-up ones, the
//   fused op measured 0.6-1.1x eager in 7 of 10 fresh processes, 1.9-3.8x in the rest. No
//   compaction was involved (compact_stall and thp_fault_fallback stayed 0).
// - defrag "always", "madvise" or "defer+madvise": a madvised fault that finds no free huge page
//   compacts memory synchronously (vmstat compact_stall) for as long as that takes.
//
// So huge pages are asked for only where THP is enabled, defrag is "defer" or "never" and no page
// reporting is registered, checked once per process. Elsewhere outputs keep 4 KiB pages (that op:
// 27-38 ms, 1.2-2.0x eager, in every fresh process). Prefaulting those with MADV_POPULATE_WRITE,
// split over the thread pool, was measured as well: ~1.7 ms faster on that op, but 1.5-2 ms slower
// on BatchNorm 32x64x56x56 (medians 12.5 -> 14.0 ms NCHW, 8.1 -> 10.1 ms channels_last), so no.
//
// Since torch 2.11 the output pool (output_pool.h) hands a freed output's faulted pages to the
// next output, so the advice only ever matters for a block's first use, or under torch 2.10.
//
// FUSEDRES_CPU_HUGEPAGES=0 never advises; FUSEDRES_CPU_HUGEPAGES=1 always does, for hosts known to
// have neither slow path. Advice is only a hint: it changes speed, never results.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedres::cpu {

namespace detail {

// The first line of a sysfs file, "" when it cannot be read.
inline std::string read_first_line(const char* path) {
  std::string line;
  if (std::FILE* f = std::fopen(path, "r")) {
    char buf[256];
    if (std::fgets(buf, sizeof buf, f) != nullptr) {
      line = buf;
    }
    std::fclose(f);
  }
  return line;
}

// The selected word of a THP setting: "madvise" from "always [madvise] never".
inline std::string thp_setting(const std::string& name) {
  const std::string line = read_first_line(("/sys/kernel/mm/transparent_hugepage/" + name).c_str());
  const auto open = line.find('['), close = line.find(']');
  return open != std::string::npos && close > open ? line.substr(open + 1, close - open - 1) : "";
}

// A reporting device sets page_reporting_order to the smallest order it reports (9 on x86, the
// huge-page order); with none registered it reads -1 (older kernels: an order past the largest,
// 11 or more). No such file: a kernel built without page reporting.
inline bool free_page_reporting() {
  const std::string v = read_first_line("/sys/module/page_reporting/parameters/page_reporting_order");
  if (v.empty()) {
    return false;
  }
  const long order = std::strtol(v.c_str(), nullptr, 10);
  return order >= 0 && order <= 10;
}

inline bool huge_page_faults_are_safe() {
  const std::string enabled = thp_setting("enabled"), defrag = thp_setting("defrag");
  return (enabled == "always" || enabled == "madvise") && (defrag == "defer" || defrag == "never") &&
         !free_page_reporting();
}

}  // namespace detail

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FUSEDRES_CPU_HUGEPAGES");
    if (v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0)) {
      return v[0] == '1';
    }
    return detail::huge_page_faults_are_safe();
  }();
  return enabled;
}

// Advises the 2 MiB-aligned interior of t's storage; the unaligned ends keep normal pages.
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

}  // namespace fusedres::cpu
