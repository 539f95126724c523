// SYCL -> Level Zero interop shim for mailbox-ccl (see ccl/transport/sycl_interop.py).
//
// Built on first use with the system C++ compiler against the SYCL headers and libsycl of the
// running PyTorch (the intel-sycl-rt wheel, or oneAPI); never part of ccl._C. Host code only:
// no kernels, so no SYCL compiler is needed. Exposes a C ABI for ctypes.
#include <sycl/sycl.hpp>
#include <sycl/ext/oneapi/backend/level_zero.hpp>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <variant>

extern "C" {

// Version of this shim's C ABI (bumped on any change of the functions below).
int ccl_sycl_shim_abi(void) { return 1; }

// The Level Zero handles behind a sycl::queue* (what torch.xpu.Stream.sycl_queue holds).
// Returns 0 and fills the outputs, or 1 and writes the reason into err.
int ccl_sycl_queue_ze_handles(void* queue_ptr, uintptr_t* context, uintptr_t* device,
                              uintptr_t* native_queue, int* is_immediate_list, char* err,
                              size_t err_len) {
  try {
    if (queue_ptr == nullptr) {
      std::snprintf(err, err_len, "null sycl::queue pointer");
      return 1;
    }
    const sycl::queue& q = *static_cast<const sycl::queue*>(queue_ptr);
    if (q.get_backend() != sycl::backend::ext_oneapi_level_zero) {
      std::snprintf(err, err_len, "the queue's backend is not Level Zero (backend id %d)",
                    static_cast<int>(q.get_backend()));
      return 1;
    }
    *context = reinterpret_cast<uintptr_t>(
        sycl::get_native<sycl::backend::ext_oneapi_level_zero>(q.get_context()));
    *device = reinterpret_cast<uintptr_t>(
        sycl::get_native<sycl::backend::ext_oneapi_level_zero>(q.get_device()));
    auto nq = sycl::get_native<sycl::backend::ext_oneapi_level_zero>(q);
    if (auto* list = std::get_if<ze_command_list_handle_t>(&nq)) {
      *native_queue = reinterpret_cast<uintptr_t>(*list);
      *is_immediate_list = 1;
    } else {
      *native_queue = reinterpret_cast<uintptr_t>(std::get<ze_command_queue_handle_t>(nq));
      *is_immediate_list = 0;
    }
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
  } catch (...) {
    std::snprintf(err, err_len, "unknown C++ exception");
  }
  return 1;
}

}  // extern "C"
