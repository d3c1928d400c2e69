// Dropout mask CUDA kernel: the counter layout of csrc/philox.h, walked as the Add & Norm row
// kernels walk rows: each thread owns a pack of 8 consecutive columns of a row, whose bits come
// from philox::bits_run<8> (2 Philox blocks, 3 when the row starts mid-block because N % 4 != 0).
// seed and offset are read from seed_offset in device memory by the kernel itself: no host sync,
// and a captured CUDA graph reads the values that the generator writes there on each replay.
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
constexpr int kPack = 8;

__global__ void dropout_mask_kernel(
    const int64_t* __restrict__ seed_offset, int64_t rows, int64_t cols, uint32_t threshold, bool* __restrict__ mask) {
  const philox::Key key = philox::key_of(static_cast<uint64_t>(seed_offset[0]));
  const uint64_t offset = static_cast<uint64_t>(seed_offset[1]);
  const int64_t packs_per_row = (cols + kPack - 1) / kPack;
  const int64_t packs = rows * packs_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += step) {
    const int64_t row = i / packs_per_row;
    const int64_t col = (i - row * packs_per_row) * kPack;
    const int64_t e = row * cols + col;
    uint32_t bits[kPack];
    philox::bits_run<kPack>(key, offset, static_cast<uint64_t>(e), bits);
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      if (col + j < cols) {
        mask[e + j] = bits[j] >= threshold;
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
  const int64_t packs = rows * ((cols + kPack - 1) / kPack);
  // Enough resident threads to hide latency; the grid-stride loop covers the rest.
  const int64_t grid = std::min<int64_t>((packs + kThreads - 1) / kThreads, 8LL * sm_count(device));
  dropout_mask_kernel<<<static_cast<unsigned int>(grid), kThreads, 0, current_stream(device)>>>(
      static_cast<const int64_t*>(seed_offset.const_data_ptr()), rows, cols, philox::threshold(p),
      static_cast<bool*>(mask.data_ptr()));
  check_launch("dropout_mask_kernel");
  return mask;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CUDA, m) { m.impl("dropout_mask", TORCH_BOX(&dropout_mask_cuda)); }

}  // namespace fusedres
