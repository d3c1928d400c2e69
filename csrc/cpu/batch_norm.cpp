// BatchNorm + add + ReLU on the CPU: torch's thread pool over NCHW planes or channels_last row
// chunks; the loops (batch_norm_kernel.h) are built for the baseline ISA and AVX2.
//
// Memory passes: training forward = stats (read x) + apply (read x, residual; write out);
// backward = reduce (read dy, out, x; write g = grad_residual when there is a residual) + input
// grad (read g or dy and out, x; write dx). Per-channel work between passes is O(C).
//
// rowscale (a per-sample scale of the normalized branch, drop path) is applied here, by the
// drivers, and the loops do not see it: rowscale[n] is constant over sample n's planes (NCHW) or
// rows (channels_last), so the work is cut at sample boundaries and each piece runs the plain
// loop with its sample's coefficients (forward: scale and bias times rowscale[n]; input grad: a
// times rowscale[n]), and the backward sums of a piece are scaled by rowscale[n] once, after
// its loop. O(C) extra work per piece.
#include "batch_norm.h"
#include "cpu/float_rows.h"
#include "cpu/huge_pages.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#define FUSEDRES_CPU_KERNELS "cpu/batch_norm_kernel.h"
#include "cpu/isa_dispatch.h"

namespace fusedres::cpu {
namespace {

constexpr int64_t kGrainElements = 16384;

int64_t plane_grain(const ChannelsView& v) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(v.spatial, 1));
}

// channels_last statistics are accumulated per fixed-size chunk of rows (a function of C only),
// so the partials and their fixed-order sum never depend on the thread count.
int64_t chunk_rows(const ChannelsView& v) { return std::max<int64_t>(1, kGrainElements / v.channels); }

// Planes (NCHW) or rows (channels_last) per sample: the units the loops walk.
int64_t units_per_sample(const ChannelsView& v) { return v.channels_last ? v.spatial : v.channels; }

// Calls piece(lo, hi, n) for the pieces of units [begin, end) that belong to one sample n each.
template <typename F>
void for_each_sample(int64_t begin, int64_t end, int64_t per_sample, F&& piece) {
  for (int64_t lo = begin; lo < end;) {
    const int64_t n = lo / per_sample;
    const int64_t hi = std::min(end, (n + 1) * per_sample);
    piece(lo, hi, n);
    lo = hi;
  }
}

// The channels a piece of units [lo, hi) of one sample touches: NCHW planes lo..hi-1 are the
// consecutive channels from lo % C; channels_last rows hold every channel.
std::pair<int64_t, int64_t> piece_channels(const ChannelsView& v, int64_t lo, int64_t hi) {
  if (v.channels_last) {
    return {0, v.channels};
  }
  return {lo % v.channels, lo % v.channels + (hi - lo)};
}

// dst[c] = src[c] * r over channels [c0, c1): a sample's copy of per-channel coefficients.
template <typename acc_t>
void scale_channels(const std::vector<acc_t>& src, acc_t r, std::pair<int64_t, int64_t> cs, std::vector<acc_t>& dst) {
  for (int64_t c = cs.first; c < cs.second; ++c) {
    dst[c] = src[c] * r;
  }
}

template <typename F>
void visit_input(const Tensor& input, F&& f) {
  visit_float(input.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
    f(TypeTag<T>{}, TypeTag<acc_t>{});
  });
}

// Per-channel mean and biased variance in double, from sums of x - shift_c (shift_c = the
// channel's first element, close enough to the mean that no precision is lost to it).
template <typename T, typename acc_t>
void batch_stats(const Tensor& input, const ChannelsView& v, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t c_total = v.channels, count = v.per_channel();
  mean.assign(c_total, std::numeric_limits<double>::quiet_NaN());
  var.assign(c_total, std::numeric_limits<double>::quiet_NaN());
  if (count == 0) {
    return;
  }
  const T* x = static_cast<const T*>(input.const_data_ptr());
  std::vector<acc_t> shift(c_total);
  for (int64_t c = 0; c < c_total; ++c) {
    shift[c] = static_cast<acc_t>(x[v.channels_last ? c : c * v.spatial]);
  }
  std::vector<double> s1(c_total, 0.0), s2(c_total, 0.0);
  if (!v.channels_last) {
    const int64_t planes = v.batch * c_total;
    std::vector<double> p1(planes), p2(planes);
    parallel_for(0, planes, plane_grain(v), [&](int64_t b, int64_t e) {
      FUSEDRES_ISA_CALL(bn_stats_planes<T, acc_t>(x, c_total, v.spatial, shift.data(), p1.data(), p2.data(), b, e));
    });
    for (int64_t p = 0; p < planes; ++p) {
      s1[p % c_total] += p1[p];
      s2[p % c_total] += p2[p];
    }
  } else {
    const int64_t rows = count, per_chunk = chunk_rows(v), chunks = (rows + per_chunk - 1) / per_chunk;
    std::vector<acc_t> p1(chunks * c_total, acc_t(0)), p2(chunks * c_total, acc_t(0));
    parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * per_chunk, r1 = std::min(rows, r0 + per_chunk);
        FUSEDRES_ISA_CALL(bn_stats_rows<T, acc_t>(
            x, c_total, shift.data(), p1.data() + k * c_total, p2.data() + k * c_total, r0, r1));
      }
    });
    for (int64_t k = 0; k < chunks; ++k) {
      for (int64_t c = 0; c < c_total; ++c) {
        s1[c] += p1[k * c_total + c];
        s2[c] += p2[k * c_total + c];
      }
    }
  }
  for (int64_t c = 0; c < c_total; ++c) {
    const double d = s1[c] / count;
    mean[c] = shift[c] + d;
    var[c] = std::max(0.0, s2[c] / count - d * d);
  }
}

Tensor stats_tensor(const Tensor& like, const std::vector<double>& values, ScalarType dtype) {
  Tensor t = empty_on(like, {static_cast<int64_t>(values.size())}, dtype);
  store_acc_vector(values.data(), static_cast<int64_t>(values.size()), t);
  return t;
}

// running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance, as
// F.batch_norm updates them; in double, whatever the running stats' dtype.
void update_running_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::vector<double>& mean, const std::vector<double>& var, double count, double momentum) {
  if (!running_mean.has_value() || count <= 0) {
    return;
  }
  const int64_t c_total = static_cast<int64_t>(mean.size());
  std::vector<double> rm = to_acc_vector<double>(running_mean, c_total, 0.0);
  std::vector<double> rv = to_acc_vector<double>(running_var, c_total, 0.0);
  for (int64_t c = 0; c < c_total; ++c) {
    rm[c] = (1 - momentum) * rm[c] + momentum * mean[c];
    rv[c] = (1 - momentum) * rv[c] + momentum * unbiased_var(var[c], count);
  }
  Tensor rm_out = *running_mean;
  Tensor rv_out = *running_var;
  store_acc_vector(rm.data(), c_total, rm_out);
  store_acc_vector(rv.data(), c_total, rv_out);
}

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, double momentum) {
  const ChannelsView v = check_bn_stats_args(input, running_mean, running_var);
  std::vector<double> mean, var;
  visit_input(input, [&](auto t, auto a) {
    batch_stats<typename decltype(t)::type, typename decltype(a)::type>(input, v, mean, var);
  });
  update_running_stats(running_mean, running_var, mean, var, static_cast<double>(v.per_channel()), momentum);
  const ScalarType stats = bn_stats_dtype(input);
  return {stats_tensor(input, mean, stats), stats_tensor(input, var, stats)};
}

// Chan et al.'s pairwise combination of (count, mean, M2), process by process in row order.
std::tuple<Tensor, Tensor> batch_norm_combine_stats_cpu(const Tensor& stats, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, double momentum) {
  const int64_t c_total = check_bn_combine_args(stats, running_mean, running_var);
  const int64_t w_total = stats.size(0);
  const std::vector<double> rows = to_acc_vector<double>(stats, stats.numel(), 0.0);
  std::vector<double> mean(c_total, 0.0), var(c_total, 0.0);
  double count = 0;
  for (int64_t w = 0; w < w_total; ++w) {
    count += std::max(0.0, rows[w * (2 * c_total + 1) + 2 * c_total]);
  }
  for (int64_t c = 0; c < c_total; ++c) {
    double n = 0, m = 0, m2 = 0;
    for (int64_t w = 0; w < w_total; ++w) {
      const double* row = rows.data() + w * (2 * c_total + 1);
      const double nb = row[2 * c_total];
      if (nb <= 0) {
        continue;
      }
      const double delta = row[c] - m;
      const double total = n + nb;
      m += delta * nb / total;
      m2 += row[c_total + c] * nb + delta * delta * n * nb / total;
      n = total;
    }
    mean[c] = n > 0 ? m : std::numeric_limits<double>::quiet_NaN();
    var[c] = n > 0 ? m2 / n : std::numeric_limits<double>::quiet_NaN();
  }
  update_running_stats(running_mean, running_var, mean, var, count, momentum);
  return {stats_tensor(stats, mean, stats.scalar_type()), stats_tensor(stats, var, stats.scalar_type())};
}

// invstd = 1 / sqrt(var + eps) per channel, in double; 1 without statistics.
std::vector<double> invstd_of(const std::optional<Tensor>& var, double eps, int64_t c_total) {
  std::vector<double> out = to_acc_vector<double>(var, c_total, 0.0);
  for (double& v : out) {
    v = var.has_value() ? 1.0 / std::sqrt(v + eps) : 1.0;
  }
  return out;
}

// rowscale: per sample, or empty (none).
template <typename T, typename acc_t>
void apply(const Tensor& input, const std::optional<Tensor>& residual, Tensor& out, const ChannelsView& v,
    const std::vector<acc_t>& mean, const std::vector<acc_t>& scale, const std::vector<acc_t>& bias, bool relu,
    const std::vector<acc_t>& rowscale) {
  const T* x = static_cast<const T*>(input.const_data_ptr());
  const T* res = residual.has_value() ? static_cast<const T*>(residual->const_data_ptr()) : nullptr;
  T* o = static_cast<T*>(out.mutable_data_ptr());
  auto run = [&](auto has_res, auto has_relu) {
    constexpr bool kRes = decltype(has_res)::value, kRelu = decltype(has_relu)::value;
    // Units [b, e) with the coefficients sc, bi.
    auto loop = [&](const acc_t* sc, const acc_t* bi, int64_t b, int64_t e) {
      if (!v.channels_last) {
        FUSEDRES_ISA_CALL(
            bn_apply_planes<kRes, kRelu, T, acc_t>(x, res, o, v.channels, v.spatial, mean.data(), sc, bi, b, e));
      } else {
        FUSEDRES_ISA_CALL(bn_apply_rows<kRes, kRelu, T, acc_t>(x, res, o, v.channels, mean.data(), sc, bi, b, e));
      }
    };
    const int64_t units = v.channels_last ? v.per_channel() : v.batch * v.channels;
    parallel_for(0, units, v.channels_last ? chunk_rows(v) : plane_grain(v), [&](int64_t b, int64_t e) {
      if (rowscale.empty()) {
        loop(scale.data(), bias.data(), b, e);
        return;
      }
      // (x - mean) * scale * r + bias * r: the sample's coefficients.
      std::vector<acc_t> sc(v.channels), bi(v.channels);
      for_each_sample(b, e, units_per_sample(v), [&](int64_t lo, int64_t hi, int64_t n) {
        const auto cs = piece_channels(v, lo, hi);
        scale_channels(scale, rowscale[n], cs, sc);
        scale_channels(bias, rowscale[n], cs, bi);
        loop(sc.data(), bi.data(), lo, hi);
      });
    });
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (res != nullptr) {
    relu ? run(Yes{}, Yes{}) : run(Yes{}, No{});
  } else {
    relu ? run(No{}, Yes{}) : run(No{}, No{});
  }
}

// The rowscale as accumulators (one per sample), or empty.
template <typename acc_t>
std::vector<acc_t> rowscale_vector(const std::optional<Tensor>& rowscale, const ChannelsView& v) {
  return rowscale.has_value() ? to_acc_vector<acc_t>(rowscale, v.batch, acc_t(1)) : std::vector<acc_t>();
}

Tensor batch_norm_add_relu_fwd_cpu(const Tensor& input, const std::optional<Tensor>& residual,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& mean, const std::optional<Tensor>& var, double eps, bool relu, bool /*training*/,
    int64_t /*count*/) {
  const ChannelsView v = check_bn_fwd_args(input, residual, rowscale, weight, bias, mean, var);
  const int64_t c_total = v.channels;
  Tensor out = empty_strided_like(input, input.scalar_type());
  advise_huge_pages(out);
  const std::vector<double> invstd = invstd_of(var, eps, c_total);
  const std::vector<double> w = to_acc_vector<double>(weight, c_total, 1.0);
  visit_input(input, [&](auto t, auto a) {
    using T = typename decltype(t)::type;
    using acc_t = typename decltype(a)::type;
    const std::vector<acc_t> m = to_acc_vector<acc_t>(mean, c_total, acc_t(0));
    std::vector<acc_t> scale(c_total);
    for (int64_t c = 0; c < c_total; ++c) {
      scale[c] = static_cast<acc_t>(invstd[c] * w[c]);
    }
    apply<T, acc_t>(input, residual, out, v, m, scale, to_acc_vector<acc_t>(bias, c_total, acc_t(0)), relu,
        rowscale_vector<acc_t>(rowscale, v));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_add_relu_bwd_reduce_cpu(const Tensor& grad_out, const Tensor& out,
    const Tensor& input, const std::optional<Tensor>& rowscale, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& var, double eps, bool relu, bool write_grad_residual) {
  const ChannelsView v = check_bn_bwd_args(grad_out, out, input, rowscale, mean, var, std::nullopt);
  const int64_t c_total = v.channels;
  Tensor g =
      write_grad_residual ? empty_strided_like(input, input.scalar_type()) : empty_on(input, {0}, input.scalar_type());
  advise_huge_pages(g);
  std::vector<double> sum_dy(c_total, 0.0), sum_dy_xmu(c_total, 0.0);
  visit_input(input, [&](auto t, auto a) {
    using T = typename decltype(t)::type;
    using acc_t = typename decltype(a)::type;
    const T* dy = static_cast<const T*>(grad_out.const_data_ptr());
    const T* o = static_cast<const T*>(out.const_data_ptr());
    const T* x = static_cast<const T*>(input.const_data_ptr());
    T* gp = write_grad_residual ? static_cast<T*>(g.mutable_data_ptr()) : nullptr;
    const std::vector<acc_t> m = to_acc_vector<acc_t>(mean, c_total, acc_t(0));
    const std::vector<acc_t> rs = rowscale_vector<acc_t>(rowscale, v);
    auto run = [&](auto mask, auto write) {
      constexpr bool kMask = decltype(mask)::value, kWrite = decltype(write)::value;
      if (!v.channels_last) {
        const int64_t planes = v.batch * c_total;
        std::vector<double> p1(planes), p2(planes);
        parallel_for(0, planes, plane_grain(v), [&](int64_t b, int64_t e) {
          FUSEDRES_ISA_CALL(bn_bwd_reduce_planes<kMask, kWrite, T, acc_t>(
              dy, o, x, gp, c_total, v.spatial, m.data(), p1.data(), p2.data(), b, e));
        });
        for (int64_t p = 0; p < planes; ++p) {
          // A plane is one sample's: its sums scale by that sample's rowscale.
          const double r = rs.empty() ? 1.0 : static_cast<double>(rs[p / c_total]);
          sum_dy[p % c_total] += r * p1[p];
          sum_dy_xmu[p % c_total] += r * p2[p];
        }
      } else {
        const int64_t rows = v.per_channel(), per_chunk = chunk_rows(v), chunks = (rows + per_chunk - 1) / per_chunk;
        std::vector<acc_t> p1(chunks * c_total, acc_t(0)), p2(chunks * c_total, acc_t(0));
        auto loop = [&](acc_t* s1, acc_t* s2, int64_t r0, int64_t r1) {
          FUSEDRES_ISA_CALL(
              bn_bwd_reduce_rows<kMask, kWrite, T, acc_t>(dy, o, x, gp, c_total, m.data(), s1, s2, r0, r1));
        };
        parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
          std::vector<acc_t> t1(rs.empty() ? 0 : c_total), t2(t1.size());
          for (int64_t k = b; k < e; ++k) {
            acc_t* s1 = p1.data() + k * c_total;
            acc_t* s2 = p2.data() + k * c_total;
            const int64_t r0 = k * per_chunk, r1 = std::min(rows, r0 + per_chunk);
            if (rs.empty()) {
              loop(s1, s2, r0, r1);
              continue;
            }
            // Each sample's rows summed apart, then scaled into the chunk's partial.
            for_each_sample(r0, r1, v.spatial, [&](int64_t lo, int64_t hi, int64_t n) {
              std::fill(t1.begin(), t1.end(), acc_t(0));
              std::fill(t2.begin(), t2.end(), acc_t(0));
              loop(t1.data(), t2.data(), lo, hi);
              for (int64_t c = 0; c < c_total; ++c) {
                s1[c] += rs[n] * t1[c];
                s2[c] += rs[n] * t2[c];
              }
            });
          }
        });
        for (int64_t k = 0; k < chunks; ++k) {
          for (int64_t c = 0; c < c_total; ++c) {
            sum_dy[c] += p1[k * c_total + c];
            sum_dy_xmu[c] += p2[k * c_total + c];
          }
        }
      }
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (relu) {
      write_grad_residual ? run(Yes{}, Yes{}) : run(Yes{}, No{});
    } else {
      write_grad_residual ? run(No{}, Yes{}) : run(No{}, No{});
    }
  });
  const std::vector<double> istd = invstd_of(var, eps, c_total);
  for (int64_t c = 0; c < c_total; ++c) {
    sum_dy_xmu[c] *= istd[c];  // now sum of g * xhat
  }
  const ScalarType stats = bn_stats_dtype(input);
  return {stats_tensor(input, sum_dy, stats), stats_tensor(input, sum_dy_xmu, stats), g};
}

Tensor batch_norm_add_relu_bwd_input_cpu(const Tensor& grad, const std::optional<Tensor>& out, const Tensor& input,
    const std::optional<Tensor>& rowscale, const std::optional<Tensor>& mean, const std::optional<Tensor>& var,
    double eps, const std::optional<Tensor>& weight, const std::optional<Tensor>& sum_dy,
    const std::optional<Tensor>& sum_dy_xhat, int64_t count, bool training, bool relu) {
  const ChannelsView v = check_bn_bwd_args(grad, out, input, rowscale, mean, var, weight);
  const int64_t c_total = v.channels;
  check_bn_sums(sum_dy, sum_dy_xhat, input, c_total, training, count);
  Tensor dx = empty_strided_like(input, input.scalar_type());
  advise_huge_pages(dx);
  if (v.per_channel() == 0) {
    return dx;
  }
  visit_input(input, [&](auto t, auto acc_tag) {
    using T = typename decltype(t)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const std::vector<acc_t> m = to_acc_vector<acc_t>(mean, c_total, acc_t(0));
    const std::vector<double> istd = invstd_of(var, eps, c_total);
    const std::vector<double> w = to_acc_vector<double>(weight, c_total, 1.0);
    const std::vector<double> sdy = to_acc_vector<double>(sum_dy, c_total, 0.0);
    const std::vector<double> sdx = to_acc_vector<double>(sum_dy_xhat, c_total, 0.0);
    // dx = a * g - k * (x - mean) + b with a = weight * invstd and, in training,
    // k = a * invstd * sum_dy_xhat / count, b = -a * sum_dy / count.
    std::vector<acc_t> a(c_total), k(c_total, acc_t(0)), b(c_total, acc_t(0));
    for (int64_t c = 0; c < c_total; ++c) {
      const double ac = w[c] * istd[c];
      a[c] = static_cast<acc_t>(ac);
      if (training) {
        k[c] = static_cast<acc_t>(ac * istd[c] * sdx[c] / count);
        b[c] = static_cast<acc_t>(-ac * sdy[c] / count);
      }
    }
    const T* gp = static_cast<const T*>(grad.const_data_ptr());
    const T* o = out.has_value() ? static_cast<const T*>(out->const_data_ptr()) : nullptr;
    const T* x = static_cast<const T*>(input.const_data_ptr());
    T* d = static_cast<T*>(dx.mutable_data_ptr());
    const std::vector<acc_t> rs = rowscale_vector<acc_t>(rowscale, v);
    auto run = [&](auto mask) {
      constexpr bool kMask = decltype(mask)::value;
      // Units [lo, hi) with the coefficient a_ (a, or a sample's a * rowscale[n]).
      auto loop = [&](const acc_t* a_, int64_t lo, int64_t hi) {
        if (!v.channels_last) {
          FUSEDRES_ISA_CALL(bn_bwd_input_planes<kMask, T, acc_t>(
              gp, o, x, d, c_total, v.spatial, m.data(), a_, k.data(), b.data(), lo, hi));
        } else {
          FUSEDRES_ISA_CALL(
              bn_bwd_input_rows<kMask, T, acc_t>(gp, o, x, d, c_total, m.data(), a_, k.data(), b.data(), lo, hi));
        }
      };
      const int64_t units = v.channels_last ? v.per_channel() : v.batch * c_total;
      parallel_for(0, units, v.channels_last ? chunk_rows(v) : plane_grain(v), [&](int64_t lo, int64_t hi) {
        if (rs.empty()) {
          loop(a.data(), lo, hi);
          return;
        }
        std::vector<acc_t> an(c_total);
        for_each_sample(lo, hi, units_per_sample(v), [&](int64_t p0, int64_t p1, int64_t n) {
          scale_channels(a, rs[n], piece_channels(v, p0, p1), an);
          loop(an.data(), p0, p1);
        });
      });
    };
    (relu && o != nullptr) ? run(std::true_type{}) : run(std::false_type{});
  });
  return dx;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("batch_norm_stats", TORCH_BOX(&batch_norm_stats_cpu));
  m.impl("batch_norm_combine_stats", TORCH_BOX(&batch_norm_combine_stats_cpu));
  m.impl("batch_norm_add_relu_fwd", TORCH_BOX(&batch_norm_add_relu_fwd_cpu));
  m.impl("batch_norm_add_relu_bwd_reduce", TORCH_BOX(&batch_norm_add_relu_bwd_reduce_cpu));
  m.impl("batch_norm_add_relu_bwd_input", TORCH_BOX(&batch_norm_add_relu_bwd_input_cpu));
}

}  // namespace fusedres::cpu
