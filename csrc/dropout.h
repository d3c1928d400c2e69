// The dropout mask operator: which elements of an (M, N) input a fused dropout keeps, by the
// Philox counter layout of csrc/philox.h. Declarations shared by the CPU and CUDA kernels; the
// operator is declared in fusedres/spec/dropout.py.
#pragma once

#include "tensors.h"

#include <cstdint>

namespace fusedres {

// Memory-safety checks shared by every C++ backend: seed_offset is a contiguous (2,) int64 tensor, rows and
// cols are >= 0 with rows * cols in int64, 0 <= p < 1. The user-facing errors (naming the
// argument) come first, from fusedres/_rng.py.
void check_dropout_mask_args(const Tensor& seed_offset, int64_t rows, int64_t cols, double p);

// The (rows, cols) bool output on seed_offset's device.
Tensor alloc_dropout_mask(const Tensor& seed_offset, int64_t rows, int64_t cols);

}  // namespace fusedres
