// Bindings for the Level Zero transport (csrc/level_zero/): libze_loader.so.1 is dlopen'ed at
// run time, never linked, so ccl._C imports and works on machines without it. Handles and
// device pointers cross into Python as integers. ccl/transport/level_zero.py is the user API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "level_zero/ze_dispatch.h"
#include "level_zero/ze_transport.h"

namespace py = pybind11;
using namespace ccl::ze;

namespace ccl {
namespace ze {
std::string header_check();  // ze_abi_check.cpp
}  // namespace ze
}  // namespace ccl

namespace {

template <class H>
H handle(uintptr_t v) {
  return reinterpret_cast<H>(v);
}
template <class H>
uintptr_t as_int(H h) {
  return reinterpret_cast<uintptr_t>(h);
}

py::list chain_list(const void* head) {
  py::list out;
  for (auto& e : describe_chain(head)) out.append(py::make_tuple(e.first, e.second));
  return out;
}

std::string hex_bytes(const uint8_t* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += digits[p[i] >> 4];
    s += digits[p[i] & 15];
  }
  return s;
}

py::dict device_info(int index) {
  Runtime& rt = Runtime::get();
  const Api& api = rt.api();
  DeviceEntry e = rt.device(index);
  py::dict d;
  d["index"] = index;
  d["handle"] = as_int(e.device);
  d["driver_handle"] = as_int(e.driver);

  ze_device_properties_t p{};
  p.stype = ZE_STRUCTURE_TYPE_DEVICE_PROPERTIES;
  check(api.zeDeviceGetProperties(e.device, &p), "zeDeviceGetProperties");
  d["name"] = std::string(p.name, strnlen(p.name, sizeof(p.name)));
  d["type"] = static_cast<uint32_t>(p.type);
  d["vendor_id"] = p.vendorId;
  d["device_id"] = p.deviceId;
  d["flags"] = p.flags;
  d["subdevice"] = (p.flags & ZE_DEVICE_PROPERTY_FLAG_SUBDEVICE) != 0;
  d["integrated"] = (p.flags & ZE_DEVICE_PROPERTY_FLAG_INTEGRATED) != 0;
  d["subdevice_id"] = p.subdeviceId;
  d["core_clock_mhz"] = p.coreClockRate;
  d["max_mem_alloc_size"] = p.maxMemAllocSize;
  d["uuid"] = hex_bytes(p.uuid.id, sizeof(p.uuid.id));

  ze_driver_properties_t dp{};
  dp.stype = ZE_STRUCTURE_TYPE_DRIVER_PROPERTIES;
  d["driver_version"] = api.zeDriverGetProperties(e.driver, &dp) == ZE_RESULT_SUCCESS
                            ? py::object(py::int_(dp.driverVersion))
                            : py::object(py::none());
  ze_api_version_t v{};
  d["api_version"] = api.zeDriverGetApiVersion(e.driver, &v) == ZE_RESULT_SUCCESS
                         ? py::object(py::str(std::to_string(static_cast<uint32_t>(v) >> 16) + "." +
                                              std::to_string(static_cast<uint32_t>(v) & 0xffff)))
                         : py::object(py::none());

  d["pci"] = py::none();
  if (api.zeDevicePciGetPropertiesExt != nullptr) {
    ze_pci_ext_properties_t pci{};
    pci.stype = ZE_STRUCTURE_TYPE_PCI_EXT_PROPERTIES;
    if (api.zeDevicePciGetPropertiesExt(e.device, &pci) == ZE_RESULT_SUCCESS) {
      char bdf[32];
      std::snprintf(bdf, sizeof(bdf), "%04x:%02x:%02x.%x", pci.address.domain, pci.address.bus,
                    pci.address.device, pci.address.function);
      py::dict pd;
      pd["address"] = std::string(bdf);
      pd["gen"] = pci.maxSpeed.genVersion;
      pd["width"] = pci.maxSpeed.width;
      pd["max_bandwidth"] = pci.maxSpeed.maxBandwidth;  // bytes/s, -1 when unknown
      d["pci"] = pd;
    }
  }

  ze_device_external_memory_properties_t xm{};
  xm.stype = ZE_STRUCTURE_TYPE_DEVICE_EXTERNAL_MEMORY_PROPERTIES;
  if (api.zeDeviceGetExternalMemoryProperties(e.device, &xm) == ZE_RESULT_SUCCESS) {
    d["external_memory_import"] = xm.memoryAllocationImportTypes;
    d["external_memory_export"] = xm.memoryAllocationExportTypes;
  } else {
    d["external_memory_import"] = py::none();
    d["external_memory_export"] = py::none();
  }

  py::list groups;
  uint32_t n = 0;
  if (api.zeDeviceGetCommandQueueGroupProperties(e.device, &n, nullptr) == ZE_RESULT_SUCCESS && n > 0) {
    std::vector<ze_command_queue_group_properties_t> g(n);
    for (auto& x : g) x.stype = ZE_STRUCTURE_TYPE_COMMAND_QUEUE_GROUP_PROPERTIES;
    if (api.zeDeviceGetCommandQueueGroupProperties(e.device, &n, g.data()) == ZE_RESULT_SUCCESS) {
      for (uint32_t i = 0; i < n; ++i) {
        py::dict gd;
        gd["ordinal"] = i;
        gd["flags"] = g[i].flags;
        gd["num_queues"] = g[i].numQueues;
        gd["max_fill_pattern_size"] = g[i].maxMemoryFillPatternSize;
        groups.append(gd);
      }
    }
  }
  d["queue_groups"] = groups;
  return d;
}

py::dict p2p(int i, int j) {
  Runtime& rt = Runtime::get();
  const Api& api = rt.api();
  ze_device_handle_t a = rt.device(i).device, b = rt.device(j).device;
  py::dict d;
  ze_bool_t can = 0;
  ze_result_t r = api.zeDeviceCanAccessPeer(a, b, &can);
  d["can_access_peer"] = r == ZE_RESULT_SUCCESS ? py::object(py::bool_(can != 0)) : py::object(py::none());
  d["can_access_peer_error"] = r == ZE_RESULT_SUCCESS ? std::string() : result_name(r);
  ze_device_p2p_properties_t pp{};
  pp.stype = ZE_STRUCTURE_TYPE_DEVICE_P2P_PROPERTIES;
  r = api.zeDeviceGetP2PProperties(a, b, &pp);
  d["flags"] = r == ZE_RESULT_SUCCESS ? py::object(py::int_(pp.flags)) : py::object(py::none());
  d["flags_error"] = r == ZE_RESULT_SUCCESS ? std::string() : result_name(r);
  return d;
}

}  // namespace

void register_level_zero(py::module_& root) {
  py::module_ m = root.def_submodule(
      "level_zero", "Level Zero transport: dlopen'ed libze_loader.so.1, dma-buf export/import");

  static py::exception<ZeError> ze_error(m, "ZeError", PyExc_RuntimeError);
  static py::exception<ZeTimeout> ze_timeout(m, "ZeTimeout", ze_error.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ZeTimeout& e) {
      py::set_error(ze_timeout, e.what());
    } catch (const ZeError& e) {
      py::set_error(ze_error, e.what());
    }
  });

  m.attr("DEFAULT_LOADER") = "libze_loader.so.1";
  m.attr("ALLOC_GRANULARITY") = kAllocGranularity;

  py::dict results, stypes, flags;
#define CCL_PY_VALUE(d) [&](const char* name, uint32_t v) { d[name] = v; }
  auto add_result = CCL_PY_VALUE(results);
  auto add_stype = CCL_PY_VALUE(stypes);
  auto add_flag = CCL_PY_VALUE(flags);
#undef CCL_PY_VALUE
#define CCL_ADD_RESULT(name, value) add_result(#name, static_cast<uint32_t>(value));
  CCL_ZE_RESULTS(CCL_ADD_RESULT)
  CCL_ZE_RESULTS_AFTER_1_4(CCL_ADD_RESULT)
#undef CCL_ADD_RESULT
#define CCL_ADD_STYPE(name, value) add_stype(#name, static_cast<uint32_t>(value));
  CCL_ZE_STYPES(CCL_ADD_STYPE)
#undef CCL_ADD_STYPE
#define CCL_ADD_FLAG(name, bit) add_flag(#name, name);
  CCL_ZE_FLAGS(CCL_ADD_FLAG)
#undef CCL_ADD_FLAG
  m.attr("RESULTS") = results;
  m.attr("STRUCTURE_TYPES") = stypes;
  m.attr("FLAGS") = flags;

  // {struct: {"size", "align", "stype", "offsets": {field: offset}}} of our declarations.
  m.def("layout", []() {
    py::dict out;
#define CCL_LAYOUT_STRUCT(name, st)                                  \
  {                                                                  \
    py::dict s;                                                      \
    s["size"] = sizeof(name);                                        \
    s["align"] = alignof(name);                                      \
    s["stype"] = static_cast<uint32_t>(st);                          \
    py::dict offs;                                                   \
    offs["stype"] = offsetof(name, stype);                           \
    offs["pNext"] = offsetof(name, pNext);                           \
    s["offsets"] = offs;                                             \
    out[#name] = s;                                                  \
  }
    CCL_ZE_STRUCTS(CCL_LAYOUT_STRUCT)
#undef CCL_LAYOUT_STRUCT
#define CCL_LAYOUT_FIELD(name, field) \
  out[#name]["offsets"][#field] = offsetof(name, field);
    CCL_ZE_FIELDS(CCL_LAYOUT_FIELD)
#undef CCL_LAYOUT_FIELD
    return out;
  });
  // The function table as data: [(name, required)].
  m.def("functions", []() {
    py::list out;
#define CCL_LIST_FN(name, required, params) out.append(py::make_tuple(#name, required));
    CCL_ZE_FUNCTIONS(CCL_LIST_FN)
#undef CCL_LIST_FN
    return out;
  });
  m.def("header_check", &ccl::ze::header_check,
        "API version of the ze_api.h this build was checked against ('' when built without it)");
  m.def("error_name", &result_name, py::arg("code"));

  // pNext chains as built for the driver: [(stype, flags)] head first.
  m.def("export_alloc_chain", [](bool uncompressed) {
    ExportAllocChain c(uncompressed);
    return chain_list(&c.desc);
  }, py::arg("uncompressed") = true);
  m.def("import_alloc_chain", [](int fd) {
    ImportAllocChain c(fd);
    py::list out = chain_list(&c.desc);
    return py::make_tuple(out, c.import_fd.fd);
  }, py::arg("fd"));
  m.def("export_fd_query_chain", []() {
    ExportFdQuery q;
    return chain_list(&q.props);
  });

  // Runtime: load + init (cached), or a mock driver for tests.
  m.def("init", [](const std::string& library) { return Runtime::get().init(library); },
        py::arg("library") = "libze_loader.so.1", py::call_guard<py::gil_scoped_release>(),
        "Load the loader and zeInit; returns '' when usable, else the reason. Cached.");
  m.def("available", []() { return Runtime::get().init("libze_loader.so.1").empty(); },
        py::call_guard<py::gil_scoped_release>());
  m.def("ready", []() { return Runtime::get().ready(); });
  m.def("reset", []() { Runtime::get().reset(); });
  m.def("source", []() { return Runtime::get().source(); });
  m.def("install_mock",
        [](int num_devices, bool can_access_peer, uint32_t p2p_flags, bool lie_p2p, bool hang_copies,
           bool reject_compression_hint, bool init_fails) {
          MockConfig c;
          c.num_devices = num_devices;
          c.can_access_peer = can_access_peer;
          c.p2p_flags = p2p_flags;
          c.lie_p2p = lie_p2p;
          c.hang_copies = hang_copies;
          c.reject_compression_hint = reject_compression_hint;
          c.init_fails = init_fails;
          Runtime::get().install(mock_api(c));
        },
        py::arg("num_devices") = 2, py::arg("can_access_peer") = true,
        py::arg("p2p_flags") = ZE_DEVICE_P2P_PROPERTY_FLAG_ACCESS, py::arg("lie_p2p") = false,
        py::arg("hang_copies") = false, py::arg("reject_compression_hint") = false,
        py::arg("init_fails") = false,
        "Testing only: replace the driver by the in-process mock (memfd-backed dma-bufs).");
  m.def("mock_alloc_log", []() { return mock_alloc_log(); });
  m.def("mock_live_objects", []() { return mock_live_objects(); },
        "(live allocations, live contexts) of the mock driver");

  m.def("num_devices", []() { return Runtime::get().num_devices(); });
  m.def("device_handle", [](int i) { return as_int(Runtime::get().device(i).device); });
  m.def("device_index", [](uintptr_t h) { return Runtime::get().index_of(handle<ze_device_handle_t>(h)); });
  m.def("device_info", &device_info, py::arg("index"));
  m.def("p2p", &p2p, py::arg("src"), py::arg("dst"));

  m.def("context_create", [](int device_index) {
    DeviceEntry e = Runtime::get().device(device_index);
    ze_context_desc_t d{};
    d.stype = ZE_STRUCTURE_TYPE_CONTEXT_DESC;
    ze_context_handle_t ctx = nullptr;
    check(Runtime::get().api().zeContextCreate(e.driver, &d, &ctx), "zeContextCreate");
    return as_int(ctx);
  }, py::arg("device_index"));
  m.def("context_destroy", [](uintptr_t ctx) {
    check(Runtime::get().api().zeContextDestroy(handle<ze_context_handle_t>(ctx)), "zeContextDestroy");
  });

  m.def("alloc_exportable",
        [](uintptr_t ctx, uintptr_t dev, size_t bytes, bool uncompressed, bool allow_without_hint) {
          ExportedAllocation a;
          {
            py::gil_scoped_release nogil;
            a = alloc_exportable(handle<ze_context_handle_t>(ctx), handle<ze_device_handle_t>(dev),
                                 bytes, uncompressed, allow_without_hint);
          }
          py::dict d;
          d["ptr"] = as_int(a.ptr);
          d["fd"] = a.fd;
          d["bytes"] = a.bytes;
          d["uncompressed_hint"] = a.uncompressed_hint;
          d["id"] = a.id;
          return d;
        },
        py::arg("context"), py::arg("device"), py::arg("nbytes"), py::arg("uncompressed") = true,
        py::arg("allow_without_hint") = true,
        "Exportable device allocation; 'fd' is owned by the driver: dup it, never close it.");
  m.def("import_dmabuf", [](uintptr_t ctx, uintptr_t dev, int fd, size_t bytes) {
    return as_int(import_dmabuf(handle<ze_context_handle_t>(ctx), handle<ze_device_handle_t>(dev), fd, bytes));
  }, py::arg("context"), py::arg("device"), py::arg("fd"), py::arg("nbytes"),
     py::call_guard<py::gil_scoped_release>());
  m.def("mem_free", [](uintptr_t ctx, uintptr_t ptr) {
    mem_free(handle<ze_context_handle_t>(ctx), reinterpret_cast<void*>(ptr));
  }, py::call_guard<py::gil_scoped_release>());

  py::class_<Stream>(m, "Stream", "Immediate command list + host-visible event; every wait bounded")
      .def(py::init([](uintptr_t ctx, uintptr_t dev, bool copy_engine, double timeout_s) {
             return new Stream(handle<ze_context_handle_t>(ctx), handle<ze_device_handle_t>(dev),
                               copy_engine, timeout_s);
           }),
           py::arg("context"), py::arg("device"), py::arg("copy_engine") = false,
           py::arg("timeout_s") = 30.0)
      .def_property_readonly("ordinal", &Stream::ordinal)
      .def("fill_u32", [](Stream& s, uintptr_t dst, uint32_t pattern, size_t bytes) {
        s.fill_u32(reinterpret_cast<void*>(dst), pattern, bytes);
      }, py::call_guard<py::gil_scoped_release>())
      .def("copy", [](Stream& s, uintptr_t dst, uintptr_t src, size_t bytes) {
        s.copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
      }, py::call_guard<py::gil_scoped_release>())
      .def("write", [](Stream& s, uintptr_t dst, const py::bytes& data) {
        std::string buf = data;
        py::gil_scoped_release nogil;
        s.write(reinterpret_cast<void*>(dst), buf.data(), buf.size());
      })
      .def("read", [](Stream& s, uintptr_t src, size_t bytes) {
        std::string buf(bytes, '\0');
        {
          py::gil_scoped_release nogil;
          s.read(reinterpret_cast<const void*>(src), &buf[0], bytes);
        }
        return py::bytes(buf);
      })
      .def("time_copies", [](Stream& s, uintptr_t dst, uintptr_t src, size_t bytes, int iters, int warmup) {
        return s.time_copies(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes,
                             iters, warmup);
      }, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("iters"), py::arg("warmup") = 10,
         py::call_guard<py::gil_scoped_release>())
      .def("close", &Stream::close);
}
