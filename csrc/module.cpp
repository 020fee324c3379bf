// Makes ptp_ext._C importable as a Python module. Importing it loads this shared library, whose
// static TORCH_LIBRARY registrars (registration.cpp) put the ops under torch.ops.ptp_ext.
// Only the Python build compiles this file; the CMake build is a plain shared library that C++
// programs link or load with torch.ops.load_library.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "ptp_ext kernels (ops are registered under torch.ops.ptp_ext)";
#ifdef PTP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
