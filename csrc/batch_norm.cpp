// Memory-safety checks shared by the CPU and CUDA BatchNorm + add + ReLU kernels.
#include "batch_norm.h"

namespace fusedres {

ChannelsView check_bn_activation(const Tensor& t, const char* name) {
  const int64_t dim = t.dim();
  STD_TORCH_CHECK(dim >= 2, "fusedres: ", name, " must be (N, C, ...), got ", dim, " dims");
  STD_TORCH_CHECK(
      is_supported_float(t.scalar_type()), "fusedres: ", name, " must be float32, float64, float16 or bfloat16");
  ChannelsView v{t.size(0), t.size(1), 1, false};
  STD_TORCH_CHECK(v.channels > 0, "fusedres: ", name, " must have at least one channel");
  // Size-1 dims may carry any stride; only the strides that are stepped through matter.
  auto stride_ok = [&](int64_t d, int64_t expected) { return t.size(d) <= 1 || t.stride(d) == expected; };
  bool nchw = true;
  bool nhwc = true;
  int64_t step_nchw = 1;
  int64_t step_nhwc = v.channels;
  for (int64_t d = dim - 1; d >= 2; --d) {
    nchw = nchw && stride_ok(d, step_nchw);
    nhwc = nhwc && stride_ok(d, step_nhwc);
    step_nchw *= t.size(d);
    step_nhwc *= t.size(d);
    v.spatial *= t.size(d);
  }
  nchw = nchw && stride_ok(1, v.spatial) && stride_ok(0, v.channels * v.spatial);
  nhwc = nhwc && stride_ok(1, 1) && stride_ok(0, v.channels * v.spatial);
  STD_TORCH_CHECK(nchw || nhwc, "fusedres: ", name, " must be dense in NCHW or channels_last layout");
  // When both hold (S == 1 or C == 1) the two layouts address memory identically.
  v.channels_last = !nchw;
  return v;
}

void check_bn_same_layout(const Tensor& t, const char* name, const Tensor& input) {
  bool same = t.dim() == input.dim();
  for (int64_t d = 0; same && d < t.dim(); ++d) {
    same = t.size(d) == input.size(d);
  }
  STD_TORCH_CHECK(same, "fusedres: ", name, " must have input's shape");
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
  STD_TORCH_CHECK(t->numel() == c && (c <= 1 || t->is_contiguous()), "fusedres: ", name, " must have shape (", c,
      ",) (or ", c, " contiguous elements)");
  STD_TORCH_CHECK(
      is_supported_float(t->scalar_type()), "fusedres: ", name, " must be float32, float64, float16 or bfloat16");
  STD_TORCH_CHECK(t->device() == input.device(), "fusedres: ", name, " must be on input's device");
}

void check_bn_rowscale(const std::optional<Tensor>& rowscale, const Tensor& input) {
  if (!rowscale.has_value()) {
    return;
  }
  const int64_t n = input.size(0);
  STD_TORCH_CHECK(rowscale->numel() == n && (n <= 1 || rowscale->is_contiguous()), "fusedres: rowscale must have ", n,
      " contiguous elements (one per sample of input)");
  STD_TORCH_CHECK(
      is_supported_float(rowscale->scalar_type()), "fusedres: rowscale must be float32, float64, float16 or bfloat16");
  STD_TORCH_CHECK(rowscale->device() == input.device(), "fusedres: rowscale must be on input's device");
}

namespace {

void check_mean_var(
    const std::optional<Tensor>& mean, const std::optional<Tensor>& var, const Tensor& input, int64_t c) {
  STD_TORCH_CHECK(mean.has_value() == var.has_value(), "fusedres: mean and var must be given together");
  check_bn_channel_vector(mean, "mean", input, c);
  check_bn_channel_vector(var, "var", input, c);
}

void check_stats_vector(const std::optional<Tensor>& t, const char* name, const Tensor& input, int64_t c) {
  check_bn_channel_vector(t, name, input, c);
  STD_TORCH_CHECK(!t.has_value() || t->scalar_type() == bn_stats_dtype(input), "fusedres: ", name,
      " must have the statistics dtype (float32; float64 for float64 input)");
}

}  // namespace

ChannelsView check_bn_stats_args(
    const Tensor& input, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var) {
  const ChannelsView v = check_bn_activation(input, "input");
  STD_TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
      "fusedres: running_mean and running_var must be given together");
  check_bn_channel_vector(running_mean, "running_mean", input, v.channels);
  check_bn_channel_vector(running_var, "running_var", input, v.channels);
  return v;
}

int64_t check_bn_combine_args(
    const Tensor& stats, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var) {
  STD_TORCH_CHECK(stats.dim() == 2 && stats.size(0) > 0 && stats.size(1) >= 3 && stats.size(1) % 2 == 1,
      "fusedres: stats must be (W, 2C + 1) with W >= 1");
  STD_TORCH_CHECK(stats.is_contiguous(), "fusedres: stats must be contiguous");
  STD_TORCH_CHECK(stats.scalar_type() == ScalarType::Float || stats.scalar_type() == ScalarType::Double,
      "fusedres: stats must be float32 or float64");
  const int64_t c = (stats.size(1) - 1) / 2;
  STD_TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
      "fusedres: running_mean and running_var must be given together");
  check_bn_channel_vector(running_mean, "running_mean", stats, c);
  check_bn_channel_vector(running_var, "running_var", stats, c);
  return c;
}

ChannelsView check_bn_fwd_args(const Tensor& input, const std::optional<Tensor>& residual,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& mean, const std::optional<Tensor>& var) {
  const ChannelsView v = check_bn_activation(input, "input");
  if (residual.has_value()) {
    check_bn_same_layout(*residual, "residual", input);
    STD_TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "fusedres: residual must have input's dtype");
  }
  check_bn_rowscale(rowscale, input);
  check_bn_channel_vector(weight, "weight", input, v.channels);
  check_bn_channel_vector(bias, "bias", input, v.channels);
  check_mean_var(mean, var, input, v.channels);
  return v;
}

ChannelsView check_bn_bwd_args(const Tensor& grad, const std::optional<Tensor>& out, const Tensor& input,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& mean, const std::optional<Tensor>& var,
    const std::optional<Tensor>& weight) {
  const ChannelsView v = check_bn_activation(input, "input");
  check_bn_same_layout(grad, "grad", input);
  if (out.has_value()) {
    check_bn_same_layout(*out, "out", input);
  }
  check_bn_rowscale(rowscale, input);
  check_mean_var(mean, var, input, v.channels);
  check_bn_channel_vector(weight, "weight", input, v.channels);
  STD_TORCH_CHECK(
      grad.scalar_type() == input.scalar_type() && (!out.has_value() || out->scalar_type() == input.scalar_type()),
      "fusedres: grads and out must have input's dtype");
  return v;
}

void check_bn_sums(const std::optional<Tensor>& sum_dy, const std::optional<Tensor>& sum_dy_xhat, const Tensor& input,
    int64_t c, bool training, int64_t count) {
  STD_TORCH_CHECK(!training || (sum_dy.has_value() && sum_dy_xhat.has_value()),
      "fusedres: sum_dy and sum_dy_xhat are required in training mode");
  STD_TORCH_CHECK(!training || count > 0, "fusedres: count must be positive in training mode");
  check_stats_vector(sum_dy, "sum_dy", input, c);
  check_stats_vector(sum_dy_xhat, "sum_dy_xhat", input, c);
}

}  // namespace fusedres
