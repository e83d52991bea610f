// Operator schemas and the Python module stellar_kernels._C.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace {
bool cuda_built() {
#ifdef STELLAR_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(stellar_ext, m) {
  m.def("hungarian(Tensor cost, bool maximize) -> (Tensor index, Tensor status)");
  // Test-only: the CUDA kernel's lane decomposition emulated on the CPU, and the
  // CUDA kernel with a forced scratch placement (see ops.h).
  m.def("hungarian_emulated_warp(Tensor cost, bool maximize) -> (Tensor index, Tensor status)");
  m.def(
      "hungarian_cuda_scratch(Tensor cost, bool maximize, int scratch) -> (Tensor index, Tensor "
      "status)");
  m.def("cuda_built() -> bool", &cuda_built);
}

// Importing the module loads the library, which registers the operators above.
static PyModuleDef stellar_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&stellar_module); }
