// Dropout mask CUDA kernel: the counter layout of csrc/philox.h, one thread per Philox block (4
// consecutive elements, one 4-byte store). seed and offset are read from seed_offset in device
// memory by the kernel itself: no host sync, and a captured CUDA graph reads the values that the
// generator writes there on each replay.
#include "cuda/common.cuh"
#include "dropout.h"
#include "philox.h"

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>

namespace fusedres {
namespace {

using namespace fusedres::cuda;

constexpr int kThreads = 256;

__global__ void dropout_mask_kernel(const int64_t* __restrict__ seed_offset, int64_t numel, uint32_t threshold,
                                    uint8_t* __restrict__ mask) {
  const philox::Key key = philox::key_of(static_cast<uint64_t>(seed_offset[0]));
  const uint64_t offset = static_cast<uint64_t>(seed_offset[1]);
  const int64_t blocks = (numel + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < blocks; q += step) {
    const philox::Block b = philox::block_at(key, offset + static_cast<uint64_t>(q));
    const int64_t e = 4 * q;
    if (e + 4 <= numel) {  // the mask's allocation is 16-byte aligned, so element e is 4-byte aligned
      reinterpret_cast<uchar4*>(mask)[q] =
          make_uchar4(b.v[0] >= threshold, b.v[1] >= threshold, b.v[2] >= threshold, b.v[3] >= threshold);
    } else {
      for (int lane = 0; e + lane < numel; ++lane) {
        mask[e + lane] = b.v[lane] >= threshold;
      }
    }
  }
}

Tensor dropout_mask_cuda(const Tensor& seed_offset, int64_t rows, int64_t cols, double p) {
  check_dropout_mask_args(seed_offset, rows, cols, p);
  const int32_t device = seed_offset.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor mask = alloc_dropout_mask(seed_offset, rows, cols);
  const int64_t numel = rows * cols;
  if (numel == 0) {
    return mask;
  }
  const int64_t blocks = (numel + 3) / 4;
  // Enough resident threads to hide latency; the grid-stride loop covers the rest.
  const int64_t grid = std::min<int64_t>((blocks + kThreads - 1) / kThreads, 8LL * sm_count(device));
  dropout_mask_kernel<<<static_cast<unsigned int>(grid), kThreads, 0, current_stream(device)>>>(
      static_cast<const int64_t*>(seed_offset.const_data_ptr()), numel, philox::threshold(p),
      static_cast<uint8_t*>(mask.data_ptr()));
  check_launch("dropout_mask_kernel");
  return mask;
}

} // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("dropout_mask", TORCH_BOX(&dropout_mask_cuda));
}

} // namespace fusedres
