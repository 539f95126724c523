// Bindings for the CUDA transport: driver-API VMM through dlopen'ed libcuda (csrc/cuda/).
// Python side: ccl/transport/cuda.py. Every driver failure surfaces as ccl._C.cuda.CudaError
// (a RuntimeError with .code, .name and .call), which the Python layer turns into
// ccl.TransportError; an absent driver surfaces as ccl._C.cuda.DriverUnavailable.
#include <pybind11/gil_safe_call_once.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cuda/driver.h"
#include "cuda/vmm.h"

namespace py = pybind11;
using namespace ccl::cuda;

void register_cuda(py::module_& root) {
  py::module_ m = root.def_submodule("cuda", "CUDA driver-API transport (dlopen'ed libcuda)");

  // Exception types, stored the way pybind11 recommends (never destroyed after the
  // interpreter). CudaError instances carry the CUresult as attributes.
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> cuda_error;
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> unavailable;
  cuda_error.call_once_and_store_result(
      [&]() { return py::exception<CudaError>(m, "CudaError", PyExc_RuntimeError); });
  unavailable.call_once_and_store_result([&]() {
    return py::exception<DriverUnavailable>(m, "DriverUnavailable", PyExc_RuntimeError);
  });
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CudaError& e) {
      const py::object& type = cuda_error.get_stored();
      py::object inst = type(e.what());
      inst.attr("code") = e.code();
      inst.attr("name") = error_name(e.code());
      inst.attr("call") = e.call();
      PyErr_SetObject(type.ptr(), inst.ptr());
    } catch (const DriverUnavailable& e) {
      py::set_error(unavailable.get_stored(), e.what());
    }
  });

  m.attr("ABI_VERSION") = ccl::cu::kCudaAbiVersion;

  m.def("driver_status", []() {
    DriverStatus s = driver_status();
    py::dict d;
    d["loaded"] = s.loaded;
    d["path"] = s.path;
    d["stage"] = s.stage;
    d["reason"] = s.reason;
    d["init_result"] = s.init_result;
    d["driver_version"] = s.driver_version;
    d["via_get_proc_address"] = s.via_get_proc_address;
    return d;
  }, "Loads libcuda.so.1 once (thread-safe) and reports the outcome; never raises.");
  m.def("available", []() { return driver_status().loaded; });
  m.def("reload_driver", &reload_driver, py::arg("path") = "",
        "Test hook: unload the driver; the next call loads `path` (\"\": $CCL_CUDA_DRIVER or "
        "libcuda.so.1). Refused while allocations are open.");
  m.def("live_allocations", []() { return live_allocations().load(); });

  m.def("error_name", &error_name, py::arg("code"));
  m.def("error_string", &error_string, py::arg("code"));
  m.def("format_error", &format_error, py::arg("code"), py::arg("call"));
  m.def("function_table", []() {
    py::list out;
    for (const auto& f : function_table()) {
      out.append(py::make_tuple(f.name, f.abi_symbol, f.signature));
    }
    return out;
  }, "(name, abi_symbol, signature) of every driver function the transport resolves.");

  m.def("device_count", &device_count);
  m.def("device_info", [](int index) {
    DeviceInfo i = device_info(index);
    py::dict d;
    d["index"] = i.index;
    d["name"] = i.name;
    d["pci_bus_id"] = i.pci_bus_id;
    d["compute_capability"] = py::make_tuple(i.cc_major, i.cc_minor);
    d["vmm"] = i.vmm;
    d["posix_fd"] = i.posix_fd;
    return d;
  }, py::arg("index"));
  m.def("can_access_peer", &can_access_peer, py::arg("device"), py::arg("peer"));
  m.def("granularity", &granularity, py::arg("device"));
  m.def("round_up", &round_up, py::arg("n"), py::arg("granularity"));

  py::class_<Allocation>(m, "Allocation")
      .def_static("create", &Allocation::create, py::arg("device"), py::arg("min_bytes"),
                  "New zeroed, fd-exportable device memory (size rounded to the granularity).")
      .def_static("import_fd", &Allocation::import_fd, py::arg("device"), py::arg("fd"),
                  py::arg("bytes"),
                  "Maps a peer's exported allocation for `device`; the fd stays open.")
      .def_static("alias", &Allocation::alias, py::arg("owner"), py::arg("device"),
                  "Another mapping of `owner`'s memory in this process, accessible from `device`.")
      .def("export_fd", &Allocation::export_fd, "A new close-on-exec fd; the caller owns it.")
      .def("memset", &Allocation::memset, py::arg("offset"), py::arg("n"), py::arg("value"))
      .def("write",
           [](const Allocation& a, size_t offset, py::bytes data) {
             std::string s = data;
             a.write(offset, s.data(), s.size());
           },
           py::arg("offset"), py::arg("data"))
      .def("read",
           [](const Allocation& a, size_t offset, size_t n) {
             std::string s(n, '\0');
             a.read(offset, s.data(), n);
             return py::bytes(s);
           },
           py::arg("offset"), py::arg("n"))
      .def("close", &Allocation::close)
      .def_property_readonly("ptr", &Allocation::ptr)
      .def_property_readonly("bytes", &Allocation::bytes)
      .def_property_readonly("device", &Allocation::device)
      .def_property_readonly("imported", &Allocation::imported)
      .def_property_readonly("closed", &Allocation::closed);
}
