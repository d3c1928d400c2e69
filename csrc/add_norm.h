// Add & Norm: h = residual + dropout(x) * rowscale * colscale, y = norm(h) * (weight +
// weight_offset) + bias, LayerNorm or RMSNorm over the last dimension. What the CPU and CUDA
// backends share: the named parameters of a call and its outputs. The operators' arguments and
// outputs are declared in fusedres/spec/add_norm.py (AddNormFwdArgs / AddNormBwdArgs are
// generated from it).
#pragma once

#include "checks.h"

namespace fusedres {

using AddNormFwd = AddNormFwdArgs<Tensor>;
using AddNormBwd = AddNormBwdArgs<Tensor>;

// The residual features of a call, as kernels read them (absent ones are null / zero).
struct AddNormFeatures {
  double dropout_p = 0.0;
  const int64_t* seed_offset = nullptr;  // (seed, offset), in the call's device memory
  const void* rowscale = nullptr;        // M elements
  DtypeCode rowscale_dtype = kF32;
  const void* colscale = nullptr;  // N elements
  DtypeCode colscale_dtype = kF32;
  double weight_offset = 0.0;

  // Whether x's branch is transformed before the add (then dx differs from dh).
  bool transforms_x() const { return dropout_p > 0.0 || rowscale != nullptr || colscale != nullptr; }
  bool any() const { return transforms_x() || weight_offset != 0.0; }
};

// The named parameters of one call, returned by the checks; they feed the CPU and CUDA argument
// structs.
struct AddNormParams {
  RowsView shape;
  AddNormFeatures features;
};

AddNormParams check_add_norm(const AddNormFwd& a);
AddNormParams check_add_norm(const AddNormBwd& a);

// (y, h, mean, rstd, mask) as fusedres/spec/add_norm.py declares them.
AddNormFwdResult<Tensor> alloc_add_norm_outputs(const AddNormFwd& a, RowsView shape);
// (dx, dresidual, dweight, dbias, dcolscale): dresidual is (0,) unless dresidual_dtype is given;
// each parameter grad has its parameter's shape and dtype, or is (0,) when it is absent.
AddNormBwdResult<Tensor> alloc_add_norm_outputs(const AddNormBwd& a);

}  // namespace fusedres
