// The subset of the Level Zero API (ze_api.h) that the transport uses, declared here so the
// extension builds without libze-dev: every value and layout below is taken from the Level Zero
// specification (oneapi-src/level-zero include/ze_api.h, v1.4 to v1.12 agree on all of them).
//
// When the real header is present at build time, ze_abi_check.cpp includes it next to this file
// and static_asserts every enum value, struct size, field offset and function prototype below
// against it, so a mismatch fails the build instead of corrupting a driver call.
//
// Names are the spec's, inside namespace ccl::ze (so both can live in one translation unit).
// Handle types use the spec's global struct tags, which makes them identical to the header's.
#pragma once

#include <cstddef>
#include <cstdint>

struct _ze_driver_handle_t;
struct _ze_device_handle_t;
struct _ze_context_handle_t;
struct _ze_command_list_handle_t;
struct _ze_event_pool_handle_t;
struct _ze_event_handle_t;

namespace ccl {
namespace ze {

using ze_driver_handle_t = ::_ze_driver_handle_t*;
using ze_device_handle_t = ::_ze_device_handle_t*;
using ze_context_handle_t = ::_ze_context_handle_t*;
using ze_command_list_handle_t = ::_ze_command_list_handle_t*;
using ze_event_pool_handle_t = ::_ze_event_pool_handle_t*;
using ze_event_handle_t = ::_ze_event_handle_t*;

using ze_bool_t = uint8_t;
using ze_init_flags_t = uint32_t;
using ze_device_property_flags_t = uint32_t;
using ze_device_p2p_property_flags_t = uint32_t;
using ze_context_flags_t = uint32_t;
using ze_device_mem_alloc_flags_t = uint32_t;
using ze_host_mem_alloc_flags_t = uint32_t;
using ze_external_memory_type_flags_t = uint32_t;
using ze_memory_compression_hints_ext_flags_t = uint32_t;
using ze_command_queue_flags_t = uint32_t;
using ze_command_queue_group_property_flags_t = uint32_t;
using ze_event_pool_flags_t = uint32_t;
using ze_event_scope_flags_t = uint32_t;

constexpr uint32_t ZE_MAX_DEVICE_NAME = 256;
constexpr uint32_t ZE_MAX_DEVICE_UUID_SIZE = 16;
constexpr uint32_t ZE_MAX_DRIVER_UUID_SIZE = 16;

// ze_result_t: every code of spec v1.12 (the loader may hand back any of them). The first list
// is API 1.4's (checked against the header when present).
#define CCL_ZE_RESULTS(X)                                   \
  X(ZE_RESULT_SUCCESS, 0)                                   \
  X(ZE_RESULT_NOT_READY, 1)                                 \
  X(ZE_RESULT_ERROR_DEVICE_LOST, 0x70000001)                \
  X(ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY, 0x70000002)         \
  X(ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY, 0x70000003)       \
  X(ZE_RESULT_ERROR_MODULE_BUILD_FAILURE, 0x70000004)       \
  X(ZE_RESULT_ERROR_MODULE_LINK_FAILURE, 0x70000005)        \
  X(ZE_RESULT_ERROR_DEVICE_REQUIRES_RESET, 0x70000006)      \
  X(ZE_RESULT_ERROR_DEVICE_IN_LOW_POWER_STATE, 0x70000007)  \
  X(ZE_RESULT_EXP_ERROR_DEVICE_IS_NOT_VERTEX, 0x7ff00001)   \
  X(ZE_RESULT_EXP_ERROR_VERTEX_IS_NOT_DEVICE, 0x7ff00002)   \
  X(ZE_RESULT_EXP_ERROR_REMOTE_DEVICE, 0x7ff00003)          \
  X(ZE_RESULT_ERROR_INSUFFICIENT_PERMISSIONS, 0x70010000)   \
  X(ZE_RESULT_ERROR_NOT_AVAILABLE, 0x70010001)              \
  X(ZE_RESULT_ERROR_DEPENDENCY_UNAVAILABLE, 0x70020000)     \
  X(ZE_RESULT_WARNING_DROPPED_DATA, 0x70020001)             \
  X(ZE_RESULT_ERROR_UNINITIALIZED, 0x78000001)              \
  X(ZE_RESULT_ERROR_UNSUPPORTED_VERSION, 0x78000002)        \
  X(ZE_RESULT_ERROR_UNSUPPORTED_FEATURE, 0x78000003)        \
  X(ZE_RESULT_ERROR_INVALID_ARGUMENT, 0x78000004)           \
  X(ZE_RESULT_ERROR_INVALID_NULL_HANDLE, 0x78000005)        \
  X(ZE_RESULT_ERROR_HANDLE_OBJECT_IN_USE, 0x78000006)       \
  X(ZE_RESULT_ERROR_INVALID_NULL_POINTER, 0x78000007)       \
  X(ZE_RESULT_ERROR_INVALID_SIZE, 0x78000008)               \
  X(ZE_RESULT_ERROR_UNSUPPORTED_SIZE, 0x78000009)           \
  X(ZE_RESULT_ERROR_UNSUPPORTED_ALIGNMENT, 0x7800000a)      \
  X(ZE_RESULT_ERROR_INVALID_SYNCHRONIZATION_OBJECT, 0x7800000b) \
  X(ZE_RESULT_ERROR_INVALID_ENUMERATION, 0x7800000c)        \
  X(ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION, 0x7800000d)    \
  X(ZE_RESULT_ERROR_UNSUPPORTED_IMAGE_FORMAT, 0x7800000e)   \
  X(ZE_RESULT_ERROR_INVALID_NATIVE_BINARY, 0x7800000f)      \
  X(ZE_RESULT_ERROR_INVALID_GLOBAL_NAME, 0x78000010)        \
  X(ZE_RESULT_ERROR_INVALID_KERNEL_NAME, 0x78000011)        \
  X(ZE_RESULT_ERROR_INVALID_FUNCTION_NAME, 0x78000012)      \
  X(ZE_RESULT_ERROR_INVALID_GROUP_SIZE_DIMENSION, 0x78000013) \
  X(ZE_RESULT_ERROR_INVALID_GLOBAL_WIDTH_DIMENSION, 0x78000014) \
  X(ZE_RESULT_ERROR_INVALID_KERNEL_ARGUMENT_INDEX, 0x78000015) \
  X(ZE_RESULT_ERROR_INVALID_KERNEL_ARGUMENT_SIZE, 0x78000016) \
  X(ZE_RESULT_ERROR_INVALID_KERNEL_ATTRIBUTE_VALUE, 0x78000017) \
  X(ZE_RESULT_ERROR_INVALID_MODULE_UNLINKED, 0x78000018)    \
  X(ZE_RESULT_ERROR_INVALID_COMMAND_LIST_TYPE, 0x78000019)  \
  X(ZE_RESULT_ERROR_OVERLAPPING_REGIONS, 0x7800001a)        \
  X(ZE_RESULT_WARNING_ACTION_REQUIRED, 0x7800001b)          \
  X(ZE_RESULT_ERROR_UNKNOWN, 0x7ffffffe)

// Codes added after API 1.4 (not in Debian 12's libze-dev header, so checked against the header
// only where it has them; their values are from spec v1.12).
#define CCL_ZE_RESULTS_AFTER_1_4(X)                         \
  X(ZE_RESULT_EXP_ERROR_OPERANDS_INCOMPATIBLE, 0x7ff00004)  \
  X(ZE_RESULT_EXP_RTAS_BUILD_RETRY, 0x7ff00005)             \
  X(ZE_RESULT_EXP_RTAS_BUILD_DEFERRED, 0x7ff00006)          \
  X(ZE_RESULT_ERROR_INVALID_KERNEL_HANDLE, 0x7800001c)

#define CCL_ZE_ENUM_ENTRY(name, value) name = value,
enum ze_result_t : uint32_t {
  CCL_ZE_RESULTS(CCL_ZE_ENUM_ENTRY) CCL_ZE_RESULTS_AFTER_1_4(CCL_ZE_ENUM_ENTRY)
};
#undef CCL_ZE_ENUM_ENTRY

// ze_structure_type_t: only the ones used here (pNext chains must carry no stype the driver
// does not know: compute-runtime answers ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION).
#define CCL_ZE_STYPES(X)                                          \
  X(ZE_STRUCTURE_TYPE_DRIVER_PROPERTIES, 0x1)                     \
  X(ZE_STRUCTURE_TYPE_DEVICE_PROPERTIES, 0x3)                     \
  X(ZE_STRUCTURE_TYPE_COMMAND_QUEUE_GROUP_PROPERTIES, 0x6)        \
  X(ZE_STRUCTURE_TYPE_DEVICE_P2P_PROPERTIES, 0xb)                 \
  X(ZE_STRUCTURE_TYPE_DEVICE_EXTERNAL_MEMORY_PROPERTIES, 0xc)     \
  X(ZE_STRUCTURE_TYPE_CONTEXT_DESC, 0xd)                          \
  X(ZE_STRUCTURE_TYPE_COMMAND_QUEUE_DESC, 0xe)                    \
  X(ZE_STRUCTURE_TYPE_EVENT_POOL_DESC, 0x10)                      \
  X(ZE_STRUCTURE_TYPE_EVENT_DESC, 0x11)                           \
  X(ZE_STRUCTURE_TYPE_DEVICE_MEM_ALLOC_DESC, 0x15)                \
  X(ZE_STRUCTURE_TYPE_HOST_MEM_ALLOC_DESC, 0x16)                  \
  X(ZE_STRUCTURE_TYPE_MEMORY_ALLOCATION_PROPERTIES, 0x17)         \
  X(ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_DESC, 0x18)          \
  X(ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_IMPORT_FD, 0x19)            \
  X(ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_FD, 0x1a)            \
  X(ZE_STRUCTURE_TYPE_PCI_EXT_PROPERTIES, 0x10008)                \
  X(ZE_STRUCTURE_TYPE_MEMORY_COMPRESSION_HINTS_EXT_DESC, 0x1000b)

#define CCL_ZE_ENUM_ENTRY(name, value) name = value,
enum ze_structure_type_t : uint32_t { CCL_ZE_STYPES(CCL_ZE_ENUM_ENTRY) };
#undef CCL_ZE_ENUM_ENTRY

enum ze_device_type_t : uint32_t {
  ZE_DEVICE_TYPE_GPU = 1,
  ZE_DEVICE_TYPE_CPU = 2,
  ZE_DEVICE_TYPE_FPGA = 3,
  ZE_DEVICE_TYPE_MCA = 4,
  ZE_DEVICE_TYPE_VPU = 5,
};
enum ze_memory_type_t : uint32_t {
  ZE_MEMORY_TYPE_UNKNOWN = 0,
  ZE_MEMORY_TYPE_HOST = 1,
  ZE_MEMORY_TYPE_DEVICE = 2,
  ZE_MEMORY_TYPE_SHARED = 3,
};
enum ze_command_queue_mode_t : uint32_t {
  ZE_COMMAND_QUEUE_MODE_DEFAULT = 0,
  ZE_COMMAND_QUEUE_MODE_SYNCHRONOUS = 1,
  ZE_COMMAND_QUEUE_MODE_ASYNCHRONOUS = 2,
};
enum ze_command_queue_priority_t : uint32_t {
  ZE_COMMAND_QUEUE_PRIORITY_NORMAL = 0,
  ZE_COMMAND_QUEUE_PRIORITY_PRIORITY_LOW = 1,
  ZE_COMMAND_QUEUE_PRIORITY_PRIORITY_HIGH = 2,
};
enum ze_api_version_t : uint32_t {
  ZE_API_VERSION_1_0 = (1 << 16) | 0,
};

// Flag bits (the spec's ZE_BIT(i) values): X(name, bit).
#define CCL_ZE_FLAGS(X)                                         \
  X(ZE_INIT_FLAG_GPU_ONLY, 0)                                   \
  X(ZE_DEVICE_PROPERTY_FLAG_INTEGRATED, 0)                      \
  X(ZE_DEVICE_PROPERTY_FLAG_SUBDEVICE, 1)                       \
  X(ZE_DEVICE_PROPERTY_FLAG_ECC, 2)                             \
  X(ZE_DEVICE_PROPERTY_FLAG_ONDEMANDPAGING, 3)                  \
  X(ZE_DEVICE_P2P_PROPERTY_FLAG_ACCESS, 0)                      \
  X(ZE_DEVICE_P2P_PROPERTY_FLAG_ATOMICS, 1)                     \
  X(ZE_EXTERNAL_MEMORY_TYPE_FLAG_OPAQUE_FD, 0)                  \
  X(ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF, 1)                    \
  X(ZE_MEMORY_COMPRESSION_HINTS_EXT_FLAG_COMPRESSED, 0)         \
  X(ZE_MEMORY_COMPRESSION_HINTS_EXT_FLAG_UNCOMPRESSED, 1)       \
  X(ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COMPUTE, 0)            \
  X(ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COPY, 1)               \
  X(ZE_EVENT_POOL_FLAG_HOST_VISIBLE, 0)                         \
  X(ZE_EVENT_SCOPE_FLAG_HOST, 2)

#define CCL_ZE_FLAG_CONST(name, bit) constexpr uint32_t name = 1u << (bit);
CCL_ZE_FLAGS(CCL_ZE_FLAG_CONST)
#undef CCL_ZE_FLAG_CONST

// Every chainable struct starts with these two fields (ze_base_desc_t / ze_base_properties_t).
struct ze_base_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
};
struct ze_base_properties_t {
  ze_structure_type_t stype;
  void* pNext;
};

struct ze_driver_uuid_t {
  uint8_t id[ZE_MAX_DRIVER_UUID_SIZE];
};
struct ze_device_uuid_t {
  uint8_t id[ZE_MAX_DEVICE_UUID_SIZE];
};

struct ze_driver_properties_t {
  ze_structure_type_t stype;
  void* pNext;
  ze_driver_uuid_t uuid;
  uint32_t driverVersion;
};

struct ze_device_properties_t {
  ze_structure_type_t stype;
  void* pNext;
  ze_device_type_t type;
  uint32_t vendorId;
  uint32_t deviceId;
  ze_device_property_flags_t flags;
  uint32_t subdeviceId;
  uint32_t coreClockRate;
  uint64_t maxMemAllocSize;
  uint32_t maxHardwareContexts;
  uint32_t maxCommandQueuePriority;
  uint32_t numThreadsPerEU;
  uint32_t physicalEUSimdWidth;
  uint32_t numEUsPerSubslice;
  uint32_t numSubslicesPerSlice;
  uint32_t numSlices;
  uint64_t timerResolution;
  uint32_t timestampValidBits;
  uint32_t kernelTimestampValidBits;
  ze_device_uuid_t uuid;
  char name[ZE_MAX_DEVICE_NAME];
};

struct ze_device_p2p_properties_t {
  ze_structure_type_t stype;
  void* pNext;
  ze_device_p2p_property_flags_t flags;
};

struct ze_device_external_memory_properties_t {
  ze_structure_type_t stype;
  void* pNext;
  ze_external_memory_type_flags_t memoryAllocationImportTypes;
  ze_external_memory_type_flags_t memoryAllocationExportTypes;
  ze_external_memory_type_flags_t imageImportTypes;
  ze_external_memory_type_flags_t imageExportTypes;
};

struct ze_command_queue_group_properties_t {
  ze_structure_type_t stype;
  void* pNext;
  ze_command_queue_group_property_flags_t flags;
  size_t maxMemoryFillPatternSize;
  uint32_t numQueues;
};

// ZE_extension_pci_properties (zeDevicePciGetPropertiesExt).
struct ze_pci_address_ext_t {
  uint32_t domain;
  uint32_t bus;
  uint32_t device;
  uint32_t function;
};
struct ze_pci_speed_ext_t {
  int32_t genVersion;
  int32_t width;
  int64_t maxBandwidth;
};
struct ze_pci_ext_properties_t {
  ze_structure_type_t stype;
  void* pNext;
  ze_pci_address_ext_t address;
  ze_pci_speed_ext_t maxSpeed;
};

struct ze_context_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_context_flags_t flags;
};

struct ze_device_mem_alloc_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_device_mem_alloc_flags_t flags;
  uint32_t ordinal;
};
struct ze_host_mem_alloc_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_host_mem_alloc_flags_t flags;
};

// External memory (core since 1.0): export on allocation, fd query, import on allocation.
struct ze_external_memory_export_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_external_memory_type_flags_t flags;
};
struct ze_external_memory_import_fd_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_external_memory_type_flags_t flags;
  int fd;
};
struct ze_external_memory_export_fd_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_external_memory_type_flags_t flags;
  int fd;
};
// ZE_extension_memory_compression_hints.
struct ze_memory_compression_hints_ext_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_memory_compression_hints_ext_flags_t flags;
};

struct ze_memory_allocation_properties_t {
  ze_structure_type_t stype;
  void* pNext;
  ze_memory_type_t type;
  uint64_t id;
  uint64_t pageSize;
};

struct ze_command_queue_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  uint32_t ordinal;
  uint32_t index;
  ze_command_queue_flags_t flags;
  ze_command_queue_mode_t mode;
  ze_command_queue_priority_t priority;
};

struct ze_event_pool_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  ze_event_pool_flags_t flags;
  uint32_t count;
};
struct ze_event_desc_t {
  ze_structure_type_t stype;
  const void* pNext;
  uint32_t index;
  ze_event_scope_flags_t signal;
  ze_event_scope_flags_t wait;
};

// Every struct above, for the layout table the tests read and for the header check:
// X(struct name, its stype or 0 when it has none).
#define CCL_ZE_STRUCTS(X)                                                                   \
  X(ze_driver_properties_t, ZE_STRUCTURE_TYPE_DRIVER_PROPERTIES)                            \
  X(ze_device_properties_t, ZE_STRUCTURE_TYPE_DEVICE_PROPERTIES)                            \
  X(ze_device_p2p_properties_t, ZE_STRUCTURE_TYPE_DEVICE_P2P_PROPERTIES)                    \
  X(ze_device_external_memory_properties_t,                                                 \
    ZE_STRUCTURE_TYPE_DEVICE_EXTERNAL_MEMORY_PROPERTIES)                                    \
  X(ze_command_queue_group_properties_t, ZE_STRUCTURE_TYPE_COMMAND_QUEUE_GROUP_PROPERTIES)  \
  X(ze_pci_ext_properties_t, ZE_STRUCTURE_TYPE_PCI_EXT_PROPERTIES)                          \
  X(ze_context_desc_t, ZE_STRUCTURE_TYPE_CONTEXT_DESC)                                      \
  X(ze_device_mem_alloc_desc_t, ZE_STRUCTURE_TYPE_DEVICE_MEM_ALLOC_DESC)                    \
  X(ze_host_mem_alloc_desc_t, ZE_STRUCTURE_TYPE_HOST_MEM_ALLOC_DESC)                        \
  X(ze_external_memory_export_desc_t, ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_DESC)        \
  X(ze_external_memory_import_fd_t, ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_IMPORT_FD)            \
  X(ze_external_memory_export_fd_t, ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_FD)            \
  X(ze_memory_compression_hints_ext_desc_t,                                                 \
    ZE_STRUCTURE_TYPE_MEMORY_COMPRESSION_HINTS_EXT_DESC)                                    \
  X(ze_memory_allocation_properties_t, ZE_STRUCTURE_TYPE_MEMORY_ALLOCATION_PROPERTIES)      \
  X(ze_command_queue_desc_t, ZE_STRUCTURE_TYPE_COMMAND_QUEUE_DESC)                          \
  X(ze_event_pool_desc_t, ZE_STRUCTURE_TYPE_EVENT_POOL_DESC)                                \
  X(ze_event_desc_t, ZE_STRUCTURE_TYPE_EVENT_DESC)

// The fields whose offsets are checked against the header and reported to the tests:
// X(struct, field).
#define CCL_ZE_FIELDS(X)                                                 \
  X(ze_driver_properties_t, uuid)                                        \
  X(ze_driver_properties_t, driverVersion)                               \
  X(ze_device_properties_t, type)                                        \
  X(ze_device_properties_t, vendorId)                                    \
  X(ze_device_properties_t, deviceId)                                    \
  X(ze_device_properties_t, flags)                                       \
  X(ze_device_properties_t, subdeviceId)                                 \
  X(ze_device_properties_t, coreClockRate)                               \
  X(ze_device_properties_t, maxMemAllocSize)                             \
  X(ze_device_properties_t, timerResolution)                             \
  X(ze_device_properties_t, uuid)                                        \
  X(ze_device_properties_t, name)                                        \
  X(ze_device_p2p_properties_t, flags)                                   \
  X(ze_device_external_memory_properties_t, memoryAllocationImportTypes) \
  X(ze_device_external_memory_properties_t, memoryAllocationExportTypes) \
  X(ze_command_queue_group_properties_t, flags)                          \
  X(ze_command_queue_group_properties_t, maxMemoryFillPatternSize)       \
  X(ze_command_queue_group_properties_t, numQueues)                      \
  X(ze_pci_ext_properties_t, address)                                    \
  X(ze_pci_ext_properties_t, maxSpeed)                                   \
  X(ze_context_desc_t, flags)                                            \
  X(ze_device_mem_alloc_desc_t, flags)                                   \
  X(ze_device_mem_alloc_desc_t, ordinal)                                 \
  X(ze_host_mem_alloc_desc_t, flags)                                     \
  X(ze_external_memory_export_desc_t, flags)                             \
  X(ze_external_memory_import_fd_t, flags)                               \
  X(ze_external_memory_import_fd_t, fd)                                  \
  X(ze_external_memory_export_fd_t, flags)                               \
  X(ze_external_memory_export_fd_t, fd)                                  \
  X(ze_memory_compression_hints_ext_desc_t, flags)                       \
  X(ze_memory_allocation_properties_t, type)                             \
  X(ze_memory_allocation_properties_t, id)                               \
  X(ze_memory_allocation_properties_t, pageSize)                         \
  X(ze_command_queue_desc_t, ordinal)                                    \
  X(ze_command_queue_desc_t, index)                                      \
  X(ze_command_queue_desc_t, flags)                                      \
  X(ze_command_queue_desc_t, mode)                                       \
  X(ze_command_queue_desc_t, priority)                                   \
  X(ze_event_pool_desc_t, flags)                                         \
  X(ze_event_pool_desc_t, count)                                         \
  X(ze_event_desc_t, index)                                              \
  X(ze_event_desc_t, signal)                                             \
  X(ze_event_desc_t, wait)

}  // namespace ze
}  // namespace ccl
