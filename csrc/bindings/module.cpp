// The one extension module ccl._C. Each area registers its bindings from its own file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_host(py::module_& m);
void register_cuda(py::module_& m);
void register_level_zero(py::module_& m);
void register_gemv(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "mailbox-ccl native core: host shared-memory mailboxes and CPU kernels, "
            "CUDA and Level Zero transports (dlopen'ed, optional)";
  register_host(m);
  register_cuda(m);
  register_level_zero(m);
  register_gemv(m);
}
