// Dropout mask on the CPU: torch's thread pool over runs of whole Philox blocks (so only the
// mask's last element can end in a partial block), csrc/philox.h for the bits.
#include "cpu/float_rows.h"
#include "dropout.h"
#include "philox.h"

#include <torch/csrc/stable/library.h>

#include <algorithm>

#define FUSEDRES_CPU_KERNELS "cpu/dropout_kernel.h"
#include "cpu/isa_dispatch.h"

namespace fusedres::cpu {
namespace {

// Philox blocks (4 elements each) per parallel task: ~20 us of work at 0.6 ns per element.
constexpr int64_t kGrainBlocks = 8192;

Tensor dropout_mask_cpu(const Tensor& seed_offset, int64_t rows, int64_t cols, double p) {
  check_dropout_mask_args(seed_offset, rows, cols, p);
  Tensor mask = alloc_dropout_mask(seed_offset, rows, cols);
  const int64_t numel = rows * cols;
  if (numel == 0) {
    return mask;
  }
  // The layout reads both as uint64 (two's complement).
  const auto* so = static_cast<const int64_t*>(seed_offset.const_data_ptr());
  const philox::Key key = philox::key_of(static_cast<uint64_t>(so[0]));
  const uint64_t offset = static_cast<uint64_t>(so[1]);
  const uint32_t threshold = philox::threshold(p);
  bool* out = static_cast<bool*>(mask.data_ptr());
  parallel_for(0, (numel + 3) / 4, kGrainBlocks, [&](int64_t begin, int64_t end) {
    FUSEDRES_ISA_CALL(dropout_mask_range(key, offset, threshold, 4 * begin, std::min(4 * end, numel), out));
  });
  return mask;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CPU, m) { m.impl("dropout_mask", TORCH_BOX(&dropout_mask_cpu)); }

}  // namespace fusedres::cpu
