// BatchNorm (+ residual) (+ ReLU): declarations shared by the CPU and CUDA backends; the schema
// is in ops.cpp. Activations are (N, C, *) tensors, dense in NCHW or channels_last order,
// addressed as (N, C, S) with S the product of the spatial sizes.
#pragma once

#include "tensors.h"

#include <optional>

namespace fusedres {

struct ChannelsView {
  int64_t batch = 0;           // N
  int64_t channels = 0;        // C
  int64_t spatial = 0;         // S = prod(spatial dims), 1 for (N, C) input
  bool channels_last = false;  // element (n, c, s) at n*S*C + s*C + c rather than n*C*S + c*S + s

  int64_t per_channel() const { return batch * spatial; }
};

// Memory-safety checks shared by the C++ backends (the user-facing errors are raised in Python,
// by fusedres/_checks.py).
ChannelsView check_bn_activation(const Tensor& t, const char* name);
void check_bn_same_layout(const Tensor& t, const char* name, const Tensor& input);
void check_bn_channel_vector(const std::optional<Tensor>& t, const char* name, const Tensor& input, int64_t c);
// rowscale: N (input's batch) contiguous float elements on input's device, or none.
void check_bn_rowscale(const std::optional<Tensor>& rowscale, const Tensor& input);

// The statistics dtype: fp64 for fp64 input, else fp32.
inline ScalarType bn_stats_dtype(const Tensor& input) { return stats_dtype(input.scalar_type()); }

// Argument checks of each op, shared by CPU and CUDA; each returns the activation's view.
ChannelsView check_bn_stats_args(
    const Tensor& input, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var);
// stats (W, 2C + 1) of the stats dtype; returns C.
int64_t check_bn_combine_args(
    const Tensor& stats, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var);
ChannelsView check_bn_fwd_args(const Tensor& input, const std::optional<Tensor>& residual,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& mean, const std::optional<Tensor>& var);
ChannelsView check_bn_bwd_args(const Tensor& grad, const std::optional<Tensor>& out, const Tensor& input,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& mean, const std::optional<Tensor>& var,
    const std::optional<Tensor>& weight);
// sum_dy / sum_dy_xhat of bwd_input: the stats dtype; required in training.
void check_bn_sums(const std::optional<Tensor>& sum_dy, const std::optional<Tensor>& sum_dy_xhat, const Tensor& input,
    int64_t c, bool training, int64_t count);

// The running-stat update of batch_norm_stats, per channel, in double:
// running = (1 - momentum) * running + momentum * batch (unbiased variance).
inline double unbiased_var(double var, double count) { return count > 1 ? var * count / (count - 1) : var; }

}  // namespace fusedres
