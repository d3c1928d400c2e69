// fusedres._fastpath's module definition (see csrc/fastpath/add_norm.cpp for why the module
// exists and where it loads).
#include "fastpath/module.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedres's eager fast path (built for one torch and CPython; see csrc/fastpath/add_norm.cpp)";
  fusedres::register_add_norm(m);
  fusedres::register_batch_norm(m);
  fusedres::register_conv_epilogue(m);
}
