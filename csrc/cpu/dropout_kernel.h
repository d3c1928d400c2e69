// Dropout mask CPU kernel. No include guard on purpose: cpu/dropout.cpp compiles this file once per
// instruction set (see cpu/isa_dispatch.h). The Philox blocks pick their own vector path
// (csrc/philox.h); the compare and byte store here vectorize for the build's ISA.

namespace fusedres::cpu::FUSEDRES_CPU_ISA {

// mask[e] = bits(e) >= threshold for e in [begin, end). The bits go through an L1-resident
// buffer, as a fused kernel's row would.
inline void dropout_mask_range(
    philox::Key key, uint64_t offset, uint32_t threshold, int64_t begin, int64_t end, bool* mask) {
  constexpr int64_t kChunk = 2048;
  alignas(64) uint32_t bits[kChunk];
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t n = std::min(end - start, kChunk);
    philox::fill_bits(key, offset, start, n, bits);
    bool* __restrict out = mask + start;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      out[i] = bits[i] >= threshold;
    }
  }
}

}  // namespace fusedres::cpu::FUSEDRES_CPU_ISA
