// BatchNorm (+ residual) (+ ReLU): declarations shared by the CPU and CUDA backends; the schema
// is in ops.cpp. Activations are (N, C, S) views, NCHW-dense or channels_last-dense.
#pragma once

#include "add_norm.h"

namespace fusedres {

struct ChannelsView {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 0;   // S = prod(spatial dims), 1 for (N, C) input
  bool channels_last = false;  // strides (S*C, 1, C) rather than (C*S, S, 1)

  int64_t per_channel() const { return batch * spatial; }
};

// Memory-safety checks shared by the C++ backends (the user-facing errors are raised in Python).
ChannelsView check_bn_activation(const Tensor& t, const char* name);
void check_bn_same_layout(const Tensor& t, const char* name, const Tensor& input);
void check_bn_channel_vector(const std::optional<Tensor>& t, const char* name, const Tensor& input, int64_t c);

// The statistics dtype: fp64 for fp64 input, else fp32.
inline ScalarType bn_stats_dtype(const Tensor& input) {
  return stats_dtype(input.scalar_type());
}

// A new tensor with input's shape and strides (so channels_last stays channels_last).
Tensor empty_like_layout(const Tensor& input, std::optional<ScalarType> dtype = std::nullopt);

// Argument checks of each op, shared by CPU and CUDA; each returns the activation's view.
ChannelsView check_bn_fwd_args(const Tensor& input, const std::optional<Tensor>& residual,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               const Tensor& mean, const Tensor& invstd);
ChannelsView check_bn_bwd_args(const Tensor& grad, const std::optional<Tensor>& out, const Tensor& input,
                               const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight);

} // namespace fusedres
