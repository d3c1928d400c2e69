// Every fusedres operator is declared here, once. Each backend registers kernels for it
// (csrc/cpu, csrc/cuda); fusedres/triton defines the same schemas for its Triton kernels
// (tests/test_schemas.py checks that they agree); Python adds fake (meta) kernels and autograd
// (fusedres/ops).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(fusedres, m) {
  // h = x + residual (in fp32, rounded to h_dtype), y = norm(h) * weight + bias over the last
  // dimension. x, residual: (..., N) with unit stride along N and leading dimensions that
  // collapse into rows of one stride (any contiguous tensor, or a row-strided slice of one);
  // M = numel / N rows. weight, bias: N contiguous elements. Returns (y, h, mean, rstd): y has
  // x's shape (contiguous) and dtype; h has x's shape when store_h, else it is an empty (0,)
  // tensor; mean is (M,), or (0,) for RMSNorm; rstd is (M,).
  m.def(
      "add_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "bool rms_norm, ScalarType h_dtype, bool store_h) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of add_norm_fwd. h is the tensor that was normalized, or, when residual is given,
  // x: h = x + residual (rounded to h_dtype) is then recomputed rather than read, which lets a
  // forward skip writing h (the CPU backend's choice). dh (prenorm: the grad of h) is added to
  // dx. Returns (dx, dresidual, dweight, dbias): dx has h's shape and dy's dtype, dresidual is
  // written only when dresidual_dtype is given (a residual whose dtype differs from x's;
  // otherwise dresidual equals dx), dweight/dbias have weight's/bias's shape and dtype, or are
  // (0,) when weight/bias are None. The reduction over rows is deterministic.
  m.def(
      "add_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? residual, ScalarType h_dtype, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor rstd, bool rms_norm, ScalarType? dresidual_dtype) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // BatchNorm (+ residual) (+ ReLU). Every activation argument (input, residual, out, grad*)
  // is an (N, C, *) tensor, dense in NCHW (contiguous) or channels_last order; outputs keep
  // the input's strides. Per-channel vectors have C contiguous elements. Statistics are in
  // fp32 (fp64 for fp64 input); mean/var arguments may have any float dtype (running stats).
  //
  // Per-channel batch mean and biased variance over N and the spatial dims. When running
  // stats are given they are updated in place, as F.batch_norm does: running = (1 - momentum)
  // * running + momentum * batch, with the unbiased variance var * count / (count - 1).
  m.def(
      "batch_norm_stats(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum) "
      "-> (Tensor mean, Tensor var)");
  // Synchronized BatchNorm: stats is (W, 2C + 1), one row per process: its mean (C), biased
  // var (C) and count. Returns the global (mean, biased var), combined in fp64 in row order,
  // and updates the running stats (if given) with the total count, as batch_norm_stats does.
  m.def(
      "batch_norm_combine_stats(Tensor stats, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum) -> (Tensor mean, Tensor var)");
  // out = relu(xhat * weight + bias + residual), xhat = (input - mean) * rsqrt(var + eps), one
  // pass. mean and var come together or not at all (then xhat = input: the tail of a conv with
  // BN folded in). residual has input's dtype and strides. training/count only tell the
  // autograd formula how mean/var were obtained: from this batch of `count` values per channel
  // (grads flow through them) or constants (eval).
  m.def(
      "batch_norm_add_relu_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? mean, "
      "Tensor? var, float eps, bool relu, bool training, int count) -> Tensor");
  // Backward, first pass: g = grad_out, zeroed where out <= 0 (when relu, as threshold_backward);
  // per-channel sum_dy = sum g and sum_dy_xhat = sum g * xhat (stats dtype); g itself is
  // written as grad_residual when asked (else (0,)).
  m.def(
      "batch_norm_add_relu_bwd_reduce(Tensor grad_out, Tensor out, Tensor input, Tensor? mean, Tensor? var, "
      "float eps, bool relu, bool write_grad_residual) -> (Tensor, Tensor, Tensor)");
  // Backward, second pass: grad_input. `grad` is grad_out masked by out (as above) when `out`
  // is given and relu, or the already-masked g (grad_residual) when out is None. With
  // invstd = rsqrt(var + eps) (1 without mean/var), training:
  // grad_input = weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count);
  // eval: weight * invstd * g (sum_dy and sum_dy_xhat may then be None; input is not read).
  m.def(
      "batch_norm_add_relu_bwd_input(Tensor grad, Tensor? out, Tensor input, Tensor? mean, Tensor? var, "
      "float eps, Tensor? weight, Tensor? sum_dy, Tensor? sum_dy_xhat, int count, bool training, bool relu) "
      "-> Tensor");
}

// `import fusedres._C` loads this library and so registers the ops above. The module's own
// functions are the CPU output pool's controls (csrc/cpu/output_pool.h; fusedres/memory.py).
// Python's limited API keeps the binary valid for every CPython >= 3.10 (abi3).
#include <Python.h>

#include "cpu/output_pool.h"

namespace {

PyObject* cpu_pool_release(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fusedres::cpu::release_pool());
}

PyObject* cpu_pool_stats(PyObject*, PyObject*) {
  return Py_BuildValue("(LL)", static_cast<long long>(fusedres::cpu::pool_capacity()),
      static_cast<long long>(fusedres::cpu::pool_cached_bytes()));
}

PyMethodDef methods[] = {
    {"cpu_pool_release", cpu_pool_release, METH_NOARGS, "Frees the CPU output pool's blocks; returns the bytes."},
    {"cpu_pool_stats", cpu_pool_stats, METH_NOARGS, "(capacity, cached bytes) of the CPU output pool."},
    {nullptr, nullptr, 0, nullptr},
};

} // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fusedres C++/CUDA kernels", -1, methods};
  return PyModule_Create(&module_def);
}
