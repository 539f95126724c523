// Bindings for the host transport (memfd regions) and the CPU mailbox kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "host/entry.h"
#include "host/layout.h"
#include "host/mailbox.h"
#include "host/shm.h"

namespace py = pybind11;
using namespace ccl;

namespace {
// The C entry points of host/entry.h (ccl._C_torch's tensor fast path calls these).
extern "C" int entry_all_reduce(void* mb, uintptr_t in, uintptr_t out, int64_t numel,
                                int dtype, int algo) {
  return static_cast<HostMailbox*>(mb)->all_reduce(in, out, numel, dtype, algo, 0);
}
extern "C" int entry_add_rms_norm(void* mb, uintptr_t x, uintptr_t residual, uintptr_t weight,
                                  uintptr_t out, uintptr_t residual_out, int64_t rows,
                                  int64_t cols, int dtype, float eps, int gemma, int algo) {
  return static_cast<HostMailbox*>(mb)->add_rms_norm(x, residual, weight, out, residual_out,
                                                      rows, cols, dtype, eps, gemma != 0, algo);
}
extern "C" int entry_qk_rms_norm(void* mb, uintptr_t q, int64_t q_stride, uintptr_t k,
                                 int64_t k_stride, uintptr_t q_weight, uintptr_t k_weight,
                                 uintptr_t q_out, uintptr_t k_out, int64_t q_out_stride,
                                 int64_t k_out_stride, int64_t rows, int64_t q_cols,
                                 int64_t k_cols, int dtype, float eps) {
  return static_cast<HostMailbox*>(mb)->qk_rms_norm(q, q_stride, k, k_stride, q_weight,
                                                     k_weight, q_out, k_out, q_out_stride,
                                                     k_out_stride, rows, q_cols, k_cols, dtype,
                                                     eps);
}
}  // namespace

void register_host(py::module_& root) {
  py::module_ m = root.def_submodule("host", "host shared-memory transport and CPU kernels");

  m.attr("LAYOUT_VERSION") = kLayoutVersion;
  m.attr("MAGIC") = kMailboxMagic;
  m.attr("MAX_WORLD") = kMaxWorld;
  m.attr("HEADER_WORDS") = kHeaderWords;
  // (abi, all_reduce, add_rms_norm, qk_rms_norm) addresses, see host/entry.h.
  m.attr("ENTRY_POINTS") = py::make_tuple(
      kHostEntryAbi, reinterpret_cast<uintptr_t>(static_cast<HostAllReduceFn>(&entry_all_reduce)),
      reinterpret_cast<uintptr_t>(static_cast<HostAddRmsNormFn>(&entry_add_rms_norm)),
      reinterpret_cast<uintptr_t>(static_cast<HostQkRmsNormFn>(&entry_qk_rms_norm)));

  m.def("region_bytes",
        [](int world, size_t capacity) { return MailboxLayout::make(world, capacity).region_bytes; },
        py::arg("world"), py::arg("capacity_bytes"));

  // Returns (fd, address, bytes). The caller owns fd and the mapping.
  m.def("shm_create", [](const std::string& name, size_t bytes) {
    ShmRegion r = shm_create(name, bytes);
    return py::make_tuple(r.fd, reinterpret_cast<uintptr_t>(r.ptr), r.bytes);
  });
  m.def("shm_map", [](int fd, size_t bytes) { return reinterpret_cast<uintptr_t>(shm_map(fd, bytes)); });
  m.def("shm_unmap", [](uintptr_t p, size_t bytes) { shm_unmap(reinterpret_cast<uint8_t*>(p), bytes); });
  m.def("fd_size", &fd_size);
  m.def("pidfd_dup", &pidfd_dup, py::arg("pid"), py::arg("fd"));

  // Control block access for the owner (init) and for peers (validation before use).
  m.def("init_control", [](uintptr_t base, int world, int rank, int pid, size_t capacity,
                           size_t region_bytes) {
    auto* c = reinterpret_cast<ControlBlock*>(base);
    c->version = kLayoutVersion;
    c->world = static_cast<uint32_t>(world);
    c->rank = static_cast<uint32_t>(rank);
    c->pid = pid;
    c->capacity_bytes = capacity;
    c->region_bytes = region_bytes;
    c->seq = 0;
    c->status = 0;
    __atomic_store_n(&c->magic, kMailboxMagic, __ATOMIC_RELEASE);
  });
  m.def("read_control", [](uintptr_t base) {
    auto* c = reinterpret_cast<const ControlBlock*>(base);
    py::dict d;
    d["magic"] = __atomic_load_n(&c->magic, __ATOMIC_ACQUIRE);
    d["version"] = c->version;
    d["world"] = c->world;
    d["rank"] = c->rank;
    d["pid"] = c->pid;
    d["capacity_bytes"] = c->capacity_bytes;
    d["region_bytes"] = c->region_bytes;
    d["seq"] = __atomic_load_n(&c->seq, __ATOMIC_RELAXED);
    d["status"] = c->status;
    return d;
  });
  // Raw 8-byte peer access for the probe's write/read-back check and ping-pong timing.
  m.def("store_u64", [](uintptr_t addr, uint64_t v) {
    __atomic_store_n(reinterpret_cast<uint64_t*>(addr), v, __ATOMIC_RELEASE);
  });
  m.def("load_u64", [](uintptr_t addr) {
    return __atomic_load_n(reinterpret_cast<const uint64_t*>(addr), __ATOMIC_ACQUIRE);
  });

  py::class_<OpHeader>(m, "OpHeader")
      .def_readonly("op_dtype_flags", &OpHeader::op_dtype_flags)
      .def_readonly("numel", &OpHeader::numel)
      .def_readonly("cols", &OpHeader::cols)
      .def_readonly("eps_bits", &OpHeader::eps_bits);

  py::class_<LastError>(m, "LastError")
      .def_readonly("code", &LastError::code)
      .def_readonly("missing_mask", &LastError::missing_mask)
      .def_readonly("mismatch_rank", &LastError::mismatch_rank)
      .def_readonly("mine", &LastError::mine)
      .def_readonly("theirs", &LastError::theirs)
      .def_readonly("message", &LastError::message);

  // The op methods take raw addresses: the Python side validates tensors and passes
  // data_ptr(), which keeps this module free of any libtorch ABI dependency.
  py::class_<HostMailbox>(m, "HostMailbox")
      .def(py::init<int, int, std::vector<uintptr_t>, size_t, double>(), py::arg("rank"),
           py::arg("world"), py::arg("bases"), py::arg("capacity_bytes"), py::arg("timeout_s"))
      .def("all_reduce", &HostMailbox::all_reduce, py::arg("inp"), py::arg("out"),
           py::arg("numel"), py::arg("dtype"), py::arg("algo"), py::arg("op_flags") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("add_rms_norm", &HostMailbox::add_rms_norm, py::call_guard<py::gil_scoped_release>())
      .def("qk_rms_norm", &HostMailbox::qk_rms_norm, py::call_guard<py::gil_scoped_release>())
      .def("handshake", &HostMailbox::handshake, py::arg("op"), py::arg("dtype"),
           py::arg("numel"), py::arg("cols"), py::arg("eps"), py::arg("op_flags") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("last_error", &HostMailbox::last_error, py::return_value_policy::copy)
      .def_property("seq", &HostMailbox::seq, &HostMailbox::set_seq)
      .def("set_timeout", &HostMailbox::set_timeout)
      .def("set_spin_before_yield", &HostMailbox::set_spin_before_yield)
      .def_property("ll_max_bytes", &HostMailbox::ll_max_bytes, &HostMailbox::set_ll_max_bytes)
      .def_property_readonly("capacity_bytes", &HostMailbox::capacity_bytes)
      .def_property_readonly("rank", &HostMailbox::rank)
      .def_property_readonly("world", &HostMailbox::world)
      // For the ENTRY_POINTS callers only; valid while this object lives.
      .def_property_readonly("address",
                             [](HostMailbox& mb) { return reinterpret_cast<uintptr_t>(&mb); });
}
