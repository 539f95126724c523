// Bindings for the CUDA transport (driver API through dlopen). Filled in by csrc/cuda/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_cuda(py::module_& root) {
  py::module_ m = root.def_submodule("cuda", "CUDA driver-API transport (dlopen'ed libcuda)");
  m.def("available", []() { return false; });
}
