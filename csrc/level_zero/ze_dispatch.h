// The Level Zero functions the transport calls, declared as data (the vLLM pynccl_wrapper
// pattern): one X-macro entry per function, written as its C prototype. The table is filled by
// dlopen("libze_loader.so.1") + dlsym (never linked), or by the in-process mock driver that the
// tests install (ze_mock.cpp), so every code path above the table runs without a GPU.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "level_zero/ze_types.h"

namespace ccl {
namespace ze {

// X(name, required, (parameters))  — every function returns ze_result_t.
// A missing required symbol makes the transport unavailable (with the name in the reason);
// a missing optional one only disables what it serves.
#define CCL_ZE_FUNCTIONS(X)                                                                    \
  /* Core 1.0 */                                                                               \
  X(zeInit, true, (ze_init_flags_t flags))                                                     \
  X(zeDriverGet, true, (uint32_t* pCount, ze_driver_handle_t* phDrivers))                      \
  X(zeDriverGetProperties, true,                                                               \
    (ze_driver_handle_t hDriver, ze_driver_properties_t* pDriverProperties))                   \
  X(zeDriverGetApiVersion, true, (ze_driver_handle_t hDriver, ze_api_version_t* version))      \
  X(zeDeviceGet, true,                                                                         \
    (ze_driver_handle_t hDriver, uint32_t* pCount, ze_device_handle_t* phDevices))             \
  X(zeDeviceGetProperties, true,                                                               \
    (ze_device_handle_t hDevice, ze_device_properties_t* pDeviceProperties))                   \
  X(zeDeviceGetCommandQueueGroupProperties, true,                                              \
    (ze_device_handle_t hDevice, uint32_t* pCount,                                             \
     ze_command_queue_group_properties_t* pCommandQueueGroupProperties))                       \
  X(zeDeviceGetExternalMemoryProperties, true,                                                 \
    (ze_device_handle_t hDevice, ze_device_external_memory_properties_t* pExternalMemoryProperties)) \
  X(zeDeviceCanAccessPeer, true,                                                               \
    (ze_device_handle_t hDevice, ze_device_handle_t hPeerDevice, ze_bool_t* value))            \
  X(zeDeviceGetP2PProperties, true,                                                            \
    (ze_device_handle_t hDevice, ze_device_handle_t hPeerDevice,                               \
     ze_device_p2p_properties_t* pP2PProperties))                                              \
  X(zeContextCreate, true,                                                                     \
    (ze_driver_handle_t hDriver, const ze_context_desc_t* desc, ze_context_handle_t* phContext)) \
  X(zeContextDestroy, true, (ze_context_handle_t hContext))                                    \
  X(zeMemAllocDevice, true,                                                                    \
    (ze_context_handle_t hContext, const ze_device_mem_alloc_desc_t* device_desc, size_t size, \
     size_t alignment, ze_device_handle_t hDevice, void** pptr))                               \
  X(zeMemAllocHost, true,                                                                      \
    (ze_context_handle_t hContext, const ze_host_mem_alloc_desc_t* host_desc, size_t size,     \
     size_t alignment, void** pptr))                                                           \
  X(zeMemFree, true, (ze_context_handle_t hContext, void* ptr))                                \
  X(zeMemGetAllocProperties, true,                                                             \
    (ze_context_handle_t hContext, const void* ptr,                                            \
     ze_memory_allocation_properties_t* pMemAllocProperties, ze_device_handle_t* phDevice))    \
  X(zeCommandListCreateImmediate, true,                                                        \
    (ze_context_handle_t hContext, ze_device_handle_t hDevice,                                 \
     const ze_command_queue_desc_t* altdesc, ze_command_list_handle_t* phCommandList))         \
  X(zeCommandListDestroy, true, (ze_command_list_handle_t hCommandList))                       \
  X(zeCommandListAppendMemoryCopy, true,                                                       \
    (ze_command_list_handle_t hCommandList, void* dstptr, const void* srcptr, size_t size,     \
     ze_event_handle_t hSignalEvent, uint32_t numWaitEvents, ze_event_handle_t* phWaitEvents)) \
  X(zeCommandListAppendMemoryFill, true,                                                       \
    (ze_command_list_handle_t hCommandList, void* ptr, const void* pattern,                    \
     size_t pattern_size, size_t size, ze_event_handle_t hSignalEvent,                         \
     uint32_t numWaitEvents, ze_event_handle_t* phWaitEvents))                                 \
  X(zeEventPoolCreate, true,                                                                   \
    (ze_context_handle_t hContext, const ze_event_pool_desc_t* desc, uint32_t numDevices,      \
     ze_device_handle_t* phDevices, ze_event_pool_handle_t* phEventPool))                      \
  X(zeEventPoolDestroy, true, (ze_event_pool_handle_t hEventPool))                             \
  X(zeEventCreate, true,                                                                       \
    (ze_event_pool_handle_t hEventPool, const ze_event_desc_t* desc, ze_event_handle_t* phEvent)) \
  X(zeEventDestroy, true, (ze_event_handle_t hEvent))                                          \
  X(zeEventHostSynchronize, true, (ze_event_handle_t hEvent, uint64_t timeout))                \
  X(zeEventHostReset, true, (ze_event_handle_t hEvent))                                        \
  /* ZE_extension_pci_properties (1.3): optional, only for the PCI address in devices() */     \
  X(zeDevicePciGetPropertiesExt, false,                                                        \
    (ze_device_handle_t hDevice, ze_pci_ext_properties_t* pPciProperties))

#define CCL_ZE_FN_TYPE(name, required, params) using name##_fn = ze_result_t(*) params;
CCL_ZE_FUNCTIONS(CCL_ZE_FN_TYPE)
#undef CCL_ZE_FN_TYPE

// The function table. `source` names where it came from ("/usr/lib/.../libze_loader.so.1",
// "mock"); a null entry is a symbol the loader does not export.
struct Api {
#define CCL_ZE_FN_FIELD(name, required, params) name##_fn name = nullptr;
  CCL_ZE_FUNCTIONS(CCL_ZE_FN_FIELD)
#undef CCL_ZE_FN_FIELD
  std::string source;
};

// dlopen(`library`) and dlsym every entry. Returns "" on success, else the reason (the library
// is not found, or a required symbol is missing). The library stays loaded for the process.
std::string load_api(const std::string& library, Api& out);

// The mock driver's table (ze_mock.cpp).
struct MockConfig {
  int num_devices = 2;
  bool can_access_peer = true;
  uint32_t p2p_flags = ZE_DEVICE_P2P_PROPERTY_FLAG_ACCESS;  // Arc over PCIe: no ATOMICS
  bool lie_p2p = false;          // imports map a private copy: peer writes never arrive
  bool hang_copies = false;      // appended copies/fills never complete (tests bounded waits)
  bool reject_compression_hint = false;  // an older driver without the extension
  bool init_fails = false;       // zeInit returns ZE_RESULT_ERROR_UNINITIALIZED
};
Api mock_api(const MockConfig& cfg);
// The pNext chains the mock saw in its zeMemAllocDevice calls, most recent last:
// one entry per call, each a list of (stype, flags) pairs in chain order.
std::vector<std::vector<std::pair<uint32_t, uint32_t>>> mock_alloc_log();
// Live allocations and contexts of the mock (leak checks in the tests).
std::pair<size_t, size_t> mock_live_objects();

// "ZE_RESULT_ERROR_UNINITIALIZED", or "ZE_RESULT_0x12345678" when the code is not in the spec.
std::string result_name(uint32_t code);

}  // namespace ze
}  // namespace ccl
