// Every fusedres operator is defined here, from its spec: fusedres/spec/ declares each op
// family's arguments and outputs once, and setup.py generates the schemas (fusedres/spec.h) from
// it. Each backend registers kernels for them (csrc/cpu, csrc/cuda); fusedres/triton registers
// the same schemas for its Triton kernels; Python adds fake kernels and autograd (fusedres/ops).
#include <fusedres/spec.h>

#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(fusedres, m) { fusedres::define_ops(m); }

// `import fusedres._C` loads this library and so registers the ops above. The module's own
// functions are the CPU output pool's controls (csrc/cpu/output_pool.h; fusedres/memory.py).
// Python's limited API keeps the binary valid for every CPython >= 3.10 (abi3).
#include <Python.h>

#include "cpu/output_pool.h"

namespace {

PyObject* cpu_pool_release(PyObject*, PyObject*) { return PyLong_FromLongLong(fusedres::cpu::release_pool()); }

PyObject* cpu_pool_stats(PyObject*, PyObject*) {
  return Py_BuildValue("(LL)", static_cast<long long>(fusedres::cpu::pool_capacity()),
      static_cast<long long>(fusedres::cpu::pool_cached_bytes()));
}

PyMethodDef methods[] = {
    {"cpu_pool_release", cpu_pool_release, METH_NOARGS, "Frees the CPU output pool's blocks; returns the bytes."},
    {"cpu_pool_stats", cpu_pool_stats, METH_NOARGS, "(capacity, cached bytes) of the CPU output pool."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fusedres C++/CUDA kernels", -1, methods};
  return PyModule_Create(&module_def);
}
