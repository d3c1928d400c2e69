// fusedres._fastpath: one Python module, one file per op family. Each family's file defines its
// eager calls and registers them here.
#pragma once

#include <torch/extension.h>

namespace fusedres {

void register_add_norm(py::module_& m);
void register_batch_norm(py::module_& m);
void register_conv_epilogue(py::module_& m);

}  // namespace fusedres
