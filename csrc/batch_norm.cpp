// Argument checks and allocation shared by the CPU and CUDA BatchNorm + add + ReLU kernels.
#include "batch_norm.h"

#include <torch/headeronly/util/Exception.h>

namespace fusedres {

ChannelsView check_bn_activation(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 3, "fusedres: ", name, " must be a 3-D (N, C, S) view, got ", t.dim(), " dims");
  STD_TORCH_CHECK(is_supported_float(t.scalar_type()), "fusedres: ", name,
                  " must be float32, float64, float16 or bfloat16");
  ChannelsView v{t.size(0), t.size(1), t.size(2), false};
  STD_TORCH_CHECK(v.channels > 0, "fusedres: ", name, " must have at least one channel");
  // Size-1 dims may carry any stride; only the strides that are stepped through matter.
  auto stride_ok = [&](int64_t dim, int64_t expected) { return t.size(dim) <= 1 || t.stride(dim) == expected; };
  const bool nchw = stride_ok(2, 1) && stride_ok(1, v.spatial) && stride_ok(0, v.channels * v.spatial);
  const bool nhwc = stride_ok(1, 1) && stride_ok(2, v.channels) && stride_ok(0, v.channels * v.spatial);
  STD_TORCH_CHECK(nchw || nhwc, "fusedres: ", name, " must be dense in NCHW or channels_last layout");
  // When both hold (S == 1 or C == 1) the two layouts address memory identically.
  v.channels_last = !nchw;
  return v;
}

void check_bn_same_layout(const Tensor& t, const char* name, const Tensor& input) {
  STD_TORCH_CHECK(t.dim() == 3 && t.size(0) == input.size(0) && t.size(1) == input.size(1) &&
                      t.size(2) == input.size(2),
                  "fusedres: ", name, " must have input's shape");
  STD_TORCH_CHECK(t.device() == input.device(), "fusedres: ", name, " must be on input's device");
  const ChannelsView a = check_bn_activation(t, name);
  const ChannelsView b = check_bn_activation(input, "input");
  STD_TORCH_CHECK(a.channels_last == b.channels_last || a.spatial == 1 || a.channels == 1, "fusedres: ", name,
                  " must have input's memory format");
}

void check_bn_channel_vector(const std::optional<Tensor>& t, const char* name, const Tensor& input, int64_t c) {
  if (!t.has_value()) {
    return;
  }
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == c, "fusedres: ", name, " must have shape (", c, ")");
  STD_TORCH_CHECK(c <= 1 || t->stride(0) == 1, "fusedres: ", name, " must be contiguous");
  STD_TORCH_CHECK(is_supported_float(t->scalar_type()), "fusedres: ", name,
                  " must be float32, float64, float16 or bfloat16");
  STD_TORCH_CHECK(t->device() == input.device(), "fusedres: ", name, " must be on input's device");
}

Tensor empty_like_layout(const Tensor& input, std::optional<ScalarType> dtype) {
  // empty_like keeps the strides of a dense tensor, so channels_last stays channels_last.
  Tensor out = torch::stable::empty_like(input);
  return dtype.has_value() && *dtype != input.scalar_type() ? torch::stable::to(out, *dtype) : out;
}

namespace {

void check_bn_stats(const Tensor& t, const char* name, const Tensor& input, int64_t c) {
  check_bn_channel_vector(t, name, input, c);
  STD_TORCH_CHECK(t.scalar_type() == bn_stats_dtype(input), "fusedres: ", name,
                  " must have the statistics dtype (float32; float64 for float64 input)");
}

} // namespace

ChannelsView check_bn_fwd_args(const Tensor& input, const std::optional<Tensor>& residual,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               const Tensor& mean, const Tensor& invstd) {
  const ChannelsView v = check_bn_activation(input, "input");
  if (residual.has_value()) {
    check_bn_same_layout(*residual, "residual", input);
    STD_TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "fusedres: residual must have input's dtype");
  }
  check_bn_channel_vector(weight, "weight", input, v.channels);
  check_bn_channel_vector(bias, "bias", input, v.channels);
  check_bn_stats(mean, "mean", input, v.channels);
  check_bn_stats(invstd, "invstd", input, v.channels);
  return v;
}

ChannelsView check_bn_bwd_args(const Tensor& grad, const std::optional<Tensor>& out, const Tensor& input,
                               const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight) {
  const ChannelsView v = check_bn_activation(input, "input");
  check_bn_same_layout(grad, "grad", input);
  if (out.has_value()) {
    check_bn_same_layout(*out, "out", input);
  }
  check_bn_stats(mean, "mean", input, v.channels);
  check_bn_stats(invstd, "invstd", input, v.channels);
  check_bn_channel_vector(weight, "weight", input, v.channels);
  STD_TORCH_CHECK(grad.scalar_type() == input.scalar_type() && (!out.has_value() || out->scalar_type() == input.scalar_type()),
                  "fusedres: grads and out must have input's dtype");
  return v;
}

} // namespace fusedres
