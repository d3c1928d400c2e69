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
  // Backward of add_norm_fwd with h the tensor that was normalized. dh (prenorm: the grad of
  // h) is added to dx. Returns (dx, dresidual, dweight, dbias): dx has dy's dtype, dresidual
  // is written only when dresidual_dtype is given (a residual whose dtype differs from x's;
  // otherwise dresidual equals dx), dweight/dbias are (0,) when weight/bias are None.
  m.def(
      "add_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor rstd, bool rms_norm, ScalarType? dresidual_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
}

// `import fusedres._C` loads this library and so registers the ops above; the module itself is
// empty. Python's limited API keeps the binary valid for every CPython >= 3.10 (abi3).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fusedres C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
