// Every fusedres operator is declared here, once. Each backend registers kernels for it
// (csrc/cpu, csrc/cuda); Python adds fake (meta) kernels and autograd (fusedres/ops).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(fusedres, m) {
  // h = x + residual (in fp32, rounded to h_dtype), y = norm(h) * weight + bias.
  // Returns (y, h, mean, rstd): h is written only when store_h, else it is an empty (0,)
  // tensor; mean is (0,) for RMSNorm. x, residual: (M, N) with unit stride along N.
  m.def(
      "add_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "bool rms_norm, ScalarType h_dtype, bool store_h) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of add_norm_fwd. h is the tensor that was normalized, or, when residual is given,
  // x: h = x + residual (rounded to h_dtype) is then recomputed rather than read, which lets a
  // forward skip writing h (the CPU backend's choice). dh (prenorm: the grad of h) is added to
  // dx. Returns (dx, dresidual, dweight, dbias): dx has dy's dtype, dresidual is written only
  // when dresidual_dtype is given (a residual whose dtype differs from x's; otherwise dresidual
  // equals dx), dweight/dbias are (0,) when weight/bias are None.
  m.def(
      "add_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? residual, ScalarType h_dtype, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor rstd, bool rms_norm, ScalarType? dresidual_dtype) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // BatchNorm (+ residual) (+ ReLU). Every tensor argument named input/residual/out/grad* is a
  // 3-D view (N, C, S) of an (N, C, *) activation, either NCHW-dense (strides C*S, S, 1) or
  // channels_last-dense (strides S*C, 1, C); outputs of that shape keep the input's strides.
  // Statistics are per channel, in fp32 (fp64 for fp64 input).
  //
  // Per-channel mean and biased variance over N and S (sync BatchNorm all-reduces these).
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // out = relu(xhat * weight + bias + residual), xhat = (input - mean) * invstd, one pass.
  // training/count only tell the autograd formula how mean/invstd were obtained: from this
  // batch of `count` values per channel (grads flow through them) or constants (eval).
  // (Running statistics are updated by fusedres::batch_norm_update_running_stats, a Python op:
  // torch.library cannot attach autograd to an op that also mutates its arguments.)
  m.def(
      "batch_norm_add_relu_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, bool relu, bool training, int count) -> Tensor");
  // Backward, first pass: g = grad_out, zeroed where out <= 0 (when relu, as threshold_backward); per-channel sum_dy = sum g
  // and sum_dy_xhat = sum g * xhat; g itself is written as grad_residual when asked (else (0,)).
  m.def(
      "batch_norm_add_relu_bwd_reduce(Tensor grad_out, Tensor out, Tensor input, Tensor mean, "
      "Tensor invstd, bool relu, bool write_grad_residual) -> (Tensor, Tensor, Tensor)");
  // Backward, second pass: grad_input. `grad` is grad_out masked by out (as above) when `out` is given
  // and relu, or the already-masked g (grad_residual) when out is None. Training:
  // grad_input = weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count);
  // eval: weight * invstd * g.
  m.def(
      "batch_norm_add_relu_bwd_input(Tensor grad, Tensor? out, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor sum_dy, Tensor sum_dy_xhat, int count, bool training, bool relu) -> Tensor");
}

// `import fusedres._C` loads this library and so registers the ops above; the module itself is
// empty. Python's limited API keeps the binary valid for every CPython >= 3.10 (abi3).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fusedres C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
