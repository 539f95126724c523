// Bindings for the Level Zero transport (dlopen'ed libze_loader). Filled in by csrc/level_zero/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_level_zero(py::module_& root) {
  py::module_ m = root.def_submodule("level_zero", "Level Zero transport (dlopen'ed loader)");
  m.def("available", []() { return false; });
}
