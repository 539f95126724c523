// An in-process mock of a Level Zero driver, for tests on machines without an Intel GPU.
//
// Device allocations made with a dma-buf export descriptor are memfd-backed shared mappings, so
// the fd that zeMemGetAllocProperties hands out really crosses processes over SCM_RIGHTS and an
// import really maps the exporter's bytes: export -> fd exchange -> import -> fill/copy ->
// verify runs end to end between real processes. Command-list copies and fills run at append
// time on the host and signal their event. It validates pNext chains the way compute-runtime
// does (an unknown stype is ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION) and logs them for tests.
//
// Fault injection (MockConfig): lie_p2p (imports map a private copy, so peer writes are lost
// although P2P is reported), hang_copies (events never signal), reject_compression_hint,
// init_fails. Not a model of timing or coherence.
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "level_zero/ze_dispatch.h"

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

namespace ccl {
namespace ze {
namespace {

struct MockDevice {
  int index;
};
struct MockDriver {
  int unused;
};
struct MockEvent {
  bool signaled = false;
};
struct MockEventPool {
  uint32_t count;
};
struct MockCommandList {
  bool immediate = true;
};
struct MockAlloc {
  size_t size = 0;
  int fd = -1;          // the exporter's memfd (driver-owned, closed by zeMemFree)
  bool mapped = false;  // munmap on free (else free())
  bool exportable = false;
};

struct MockState {
  std::mutex mu;
  MockConfig cfg;
  MockDriver driver{0};
  std::vector<std::unique_ptr<MockDevice>> devices;
  std::set<void*> contexts;
  std::map<void*, MockAlloc> allocs;
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> alloc_log;
};

MockState& st() {
  static MockState* s = new MockState();  // never destroyed: handles may outlive statics
  return *s;
}

MockDevice* dev(ze_device_handle_t h) { return reinterpret_cast<MockDevice*>(h); }

bool valid_device(ze_device_handle_t h) {
  for (auto& d : st().devices)
    if (reinterpret_cast<ze_device_handle_t>(d.get()) == h) return true;
  return false;
}

ze_result_t mock_zeInit(ze_init_flags_t) {
  return st().cfg.init_fails ? ZE_RESULT_ERROR_UNINITIALIZED : ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDriverGet(uint32_t* pCount, ze_driver_handle_t* phDrivers) {
  if (pCount == nullptr) return ZE_RESULT_ERROR_INVALID_NULL_POINTER;
  if (*pCount == 0 || phDrivers == nullptr) {
    *pCount = 1;
    return ZE_RESULT_SUCCESS;
  }
  phDrivers[0] = reinterpret_cast<ze_driver_handle_t>(&st().driver);
  *pCount = 1;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDriverGetProperties(ze_driver_handle_t, ze_driver_properties_t* p) {
  if (p == nullptr) return ZE_RESULT_ERROR_INVALID_NULL_POINTER;
  std::memset(p->uuid.id, 0xcc, sizeof(p->uuid.id));
  p->driverVersion = 0x01000000;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDriverGetApiVersion(ze_driver_handle_t, ze_api_version_t* v) {
  *v = static_cast<ze_api_version_t>((1u << 16) | 4u);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDeviceGet(ze_driver_handle_t, uint32_t* pCount, ze_device_handle_t* phDevices) {
  auto& s = st();
  uint32_t n = static_cast<uint32_t>(s.devices.size());
  if (*pCount == 0 || phDevices == nullptr) {
    *pCount = n;
    return ZE_RESULT_SUCCESS;
  }
  uint32_t k = *pCount < n ? *pCount : n;
  for (uint32_t i = 0; i < k; ++i) phDevices[i] = reinterpret_cast<ze_device_handle_t>(s.devices[i].get());
  *pCount = k;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDeviceGetProperties(ze_device_handle_t h, ze_device_properties_t* p) {
  if (!valid_device(h)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (p->stype != ZE_STRUCTURE_TYPE_DEVICE_PROPERTIES) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  int i = dev(h)->index;
  p->type = ZE_DEVICE_TYPE_GPU;
  p->vendorId = 0x8086;
  p->deviceId = 0;
  p->flags = 0;
  p->subdeviceId = 0;
  p->coreClockRate = 1000;
  p->maxMemAllocSize = 1ull << 32;
  p->timerResolution = 1;
  std::memset(p->uuid.id, 0, sizeof(p->uuid.id));
  p->uuid.id[0] = 0x86;
  p->uuid.id[1] = 0x80;
  p->uuid.id[15] = static_cast<uint8_t>(i);
  std::snprintf(p->name, sizeof(p->name), "ccl mock Level Zero device %d", i);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDeviceGetCommandQueueGroupProperties(ze_device_handle_t h, uint32_t* pCount,
                                                        ze_command_queue_group_properties_t* p) {
  if (!valid_device(h)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (*pCount == 0 || p == nullptr) {
    *pCount = 2;
    return ZE_RESULT_SUCCESS;
  }
  // Group 0: compute (+copy), group 1: copy only (a blitter), like a discrete Xe GPU.
  p[0].flags = ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COMPUTE | ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COPY;
  p[0].maxMemoryFillPatternSize = 128;
  p[0].numQueues = 1;
  if (*pCount > 1) {
    p[1].flags = ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COPY;
    p[1].maxMemoryFillPatternSize = 4;
    p[1].numQueues = 1;
    *pCount = 2;
  }
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDeviceGetExternalMemoryProperties(ze_device_handle_t h,
                                                     ze_device_external_memory_properties_t* p) {
  if (!valid_device(h)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  p->memoryAllocationImportTypes = ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF;
  p->memoryAllocationExportTypes = ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF;
  p->imageImportTypes = 0;
  p->imageExportTypes = 0;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDeviceCanAccessPeer(ze_device_handle_t a, ze_device_handle_t b, ze_bool_t* v) {
  if (!valid_device(a) || !valid_device(b)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  *v = (a == b || st().cfg.can_access_peer) ? 1 : 0;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDeviceGetP2PProperties(ze_device_handle_t a, ze_device_handle_t b,
                                          ze_device_p2p_properties_t* p) {
  if (!valid_device(a) || !valid_device(b)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (p->stype != ZE_STRUCTURE_TYPE_DEVICE_P2P_PROPERTIES) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  p->flags = a == b ? (ZE_DEVICE_P2P_PROPERTY_FLAG_ACCESS | ZE_DEVICE_P2P_PROPERTY_FLAG_ATOMICS)
                    : st().cfg.p2p_flags;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeContextCreate(ze_driver_handle_t, const ze_context_desc_t* desc,
                                 ze_context_handle_t* ph) {
  if (desc == nullptr || desc->stype != ZE_STRUCTURE_TYPE_CONTEXT_DESC)
    return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  void* c = std::malloc(16);
  std::lock_guard<std::mutex> lk(st().mu);
  st().contexts.insert(c);
  *ph = reinterpret_cast<ze_context_handle_t>(c);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeContextDestroy(ze_context_handle_t h) {
  std::lock_guard<std::mutex> lk(st().mu);
  if (st().contexts.erase(h) == 0) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  std::free(h);
  return ZE_RESULT_SUCCESS;
}

bool valid_context(ze_context_handle_t h) {
  std::lock_guard<std::mutex> lk(st().mu);
  return st().contexts.count(h) != 0;
}

ze_result_t mock_zeMemAllocDevice(ze_context_handle_t hContext, const ze_device_mem_alloc_desc_t* d,
                                  size_t size, size_t, ze_device_handle_t hDevice, void** pptr) {
  if (!valid_context(hContext) || !valid_device(hDevice)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (d == nullptr || d->stype != ZE_STRUCTURE_TYPE_DEVICE_MEM_ALLOC_DESC)
    return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  if (size == 0) return ZE_RESULT_ERROR_UNSUPPORTED_SIZE;
  auto& s = st();
  std::vector<std::pair<uint32_t, uint32_t>> chain;
  bool exportable = false;
  int import_fd = -1;
  for (auto* e = static_cast<const ze_base_desc_t*>(d->pNext); e != nullptr;
       e = static_cast<const ze_base_desc_t*>(e->pNext)) {
    uint32_t flags = 0;
    switch (e->stype) {
      case ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_DESC: {
        flags = reinterpret_cast<const ze_external_memory_export_desc_t*>(e)->flags;
        if (flags != ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF) return ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION;
        exportable = true;
        break;
      }
      case ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_IMPORT_FD: {
        auto* imp = reinterpret_cast<const ze_external_memory_import_fd_t*>(e);
        flags = imp->flags;
        if (flags != ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF) return ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION;
        import_fd = imp->fd;
        break;
      }
      case ZE_STRUCTURE_TYPE_MEMORY_COMPRESSION_HINTS_EXT_DESC: {
        flags = reinterpret_cast<const ze_memory_compression_hints_ext_desc_t*>(e)->flags;
        if (s.cfg.reject_compression_hint) return ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION;
        if (flags != ZE_MEMORY_COMPRESSION_HINTS_EXT_FLAG_COMPRESSED &&
            flags != ZE_MEMORY_COMPRESSION_HINTS_EXT_FLAG_UNCOMPRESSED)
          return ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION;
        break;
      }
      default:
        return ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION;
    }
    chain.emplace_back(e->stype, flags);
  }
  if (exportable && import_fd >= 0) return ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    s.alloc_log.push_back(chain);
  }
  MockAlloc a;
  a.size = size;
  a.mapped = true;
  void* p = MAP_FAILED;
  if (import_fd >= 0) {
    struct stat sb;
    if (fstat(import_fd, &sb) != 0 || static_cast<size_t>(sb.st_size) < size)
      return ZE_RESULT_ERROR_INVALID_ARGUMENT;
    // A real dma-buf import keeps no reference to the caller's fd; neither does this.
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, s.cfg.lie_p2p ? MAP_PRIVATE : MAP_SHARED,
             import_fd, 0);
  } else {
    int fd = static_cast<int>(syscall(SYS_memfd_create, "ccl-ze-mock", MFD_CLOEXEC));
    if (fd < 0) return ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY;
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
      close(fd);
      return ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY;
    }
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED && exportable) {
      a.fd = fd;
      a.exportable = true;
    } else {
      close(fd);
    }
  }
  if (p == MAP_FAILED) {
    if (a.fd >= 0) close(a.fd);
    return ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY;
  }
  std::lock_guard<std::mutex> lk(s.mu);
  s.allocs[p] = a;
  *pptr = p;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeMemAllocHost(ze_context_handle_t hContext, const ze_host_mem_alloc_desc_t* d,
                                size_t size, size_t alignment, void** pptr) {
  if (!valid_context(hContext)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (d == nullptr || d->stype != ZE_STRUCTURE_TYPE_HOST_MEM_ALLOC_DESC)
    return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  size_t align = alignment < 64 ? 64 : alignment;
  void* p = nullptr;
  if (posix_memalign(&p, align, size == 0 ? 1 : size) != 0) return ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY;
  MockAlloc a;
  a.size = size;
  std::lock_guard<std::mutex> lk(st().mu);
  st().allocs[p] = a;
  *pptr = p;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeMemFree(ze_context_handle_t hContext, void* ptr) {
  if (!valid_context(hContext)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  MockAlloc a;
  {
    std::lock_guard<std::mutex> lk(st().mu);
    auto it = st().allocs.find(ptr);
    if (it == st().allocs.end()) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
    a = it->second;
    st().allocs.erase(it);
  }
  if (a.mapped) {
    munmap(ptr, a.size);
  } else {
    std::free(ptr);
  }
  if (a.fd >= 0) close(a.fd);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeMemGetAllocProperties(ze_context_handle_t hContext, const void* ptr,
                                         ze_memory_allocation_properties_t* p,
                                         ze_device_handle_t* phDevice) {
  if (!valid_context(hContext)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (p == nullptr || p->stype != ZE_STRUCTURE_TYPE_MEMORY_ALLOCATION_PROPERTIES)
    return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  MockAlloc a;
  {
    std::lock_guard<std::mutex> lk(st().mu);
    auto it = st().allocs.find(const_cast<void*>(ptr));
    if (it == st().allocs.end()) {
      p->type = ZE_MEMORY_TYPE_UNKNOWN;
      return ZE_RESULT_SUCCESS;
    }
    a = it->second;
  }
  p->type = a.mapped ? ZE_MEMORY_TYPE_DEVICE : ZE_MEMORY_TYPE_HOST;
  p->id = reinterpret_cast<uintptr_t>(ptr);
  p->pageSize = 4096;
  if (phDevice != nullptr) *phDevice = nullptr;
  // Like compute-runtime (handleAllocationExtensions): only an export-fd struct is accepted
  // in the chain, the fd is the allocation's cached handle (owned by the driver).
  auto* e = static_cast<ze_base_properties_t*>(p->pNext);
  if (e != nullptr) {
    if (e->stype != ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_FD) return ZE_RESULT_ERROR_INVALID_ENUMERATION;
    auto* x = reinterpret_cast<ze_external_memory_export_fd_t*>(e);
    if (x->flags & ZE_EXTERNAL_MEMORY_TYPE_FLAG_OPAQUE_FD) return ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION;
    if (p->type != ZE_MEMORY_TYPE_DEVICE || !a.exportable) return ZE_RESULT_ERROR_UNSUPPORTED_FEATURE;
    x->fd = a.fd;
  }
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeCommandListCreateImmediate(ze_context_handle_t hContext, ze_device_handle_t hDevice,
                                              const ze_command_queue_desc_t* desc,
                                              ze_command_list_handle_t* ph) {
  if (!valid_context(hContext) || !valid_device(hDevice)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (desc == nullptr || desc->stype != ZE_STRUCTURE_TYPE_COMMAND_QUEUE_DESC)
    return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  if (desc->ordinal > 1) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  *ph = reinterpret_cast<ze_command_list_handle_t>(new MockCommandList());
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeCommandListDestroy(ze_command_list_handle_t h) {
  delete reinterpret_cast<MockCommandList*>(h);
  return ZE_RESULT_SUCCESS;
}

void complete(ze_event_handle_t ev) {
  if (ev != nullptr && !st().cfg.hang_copies) reinterpret_cast<MockEvent*>(ev)->signaled = true;
}

ze_result_t mock_zeCommandListAppendMemoryCopy(ze_command_list_handle_t, void* dst, const void* src,
                                               size_t size, ze_event_handle_t ev, uint32_t nwait,
                                               ze_event_handle_t*) {
  if (nwait != 0) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  if (!st().cfg.hang_copies) std::memmove(dst, src, size);
  complete(ev);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeCommandListAppendMemoryFill(ze_command_list_handle_t, void* ptr, const void* pattern,
                                               size_t pattern_size, size_t size, ze_event_handle_t ev,
                                               uint32_t nwait, ze_event_handle_t*) {
  if (nwait != 0) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  if (pattern_size == 0 || (pattern_size & (pattern_size - 1)) != 0 || size % pattern_size != 0)
    return ZE_RESULT_ERROR_INVALID_SIZE;
  if (!st().cfg.hang_copies) {
    auto* d = static_cast<uint8_t*>(ptr);
    for (size_t off = 0; off < size; off += pattern_size) std::memcpy(d + off, pattern, pattern_size);
  }
  complete(ev);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeEventPoolCreate(ze_context_handle_t hContext, const ze_event_pool_desc_t* desc,
                                   uint32_t, ze_device_handle_t*, ze_event_pool_handle_t* ph) {
  if (!valid_context(hContext)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (desc == nullptr || desc->stype != ZE_STRUCTURE_TYPE_EVENT_POOL_DESC || desc->count == 0)
    return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  *ph = reinterpret_cast<ze_event_pool_handle_t>(new MockEventPool{desc->count});
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeEventPoolDestroy(ze_event_pool_handle_t h) {
  delete reinterpret_cast<MockEventPool*>(h);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeEventCreate(ze_event_pool_handle_t pool, const ze_event_desc_t* desc,
                               ze_event_handle_t* ph) {
  if (desc == nullptr || desc->stype != ZE_STRUCTURE_TYPE_EVENT_DESC) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  if (desc->index >= reinterpret_cast<MockEventPool*>(pool)->count) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  *ph = reinterpret_cast<ze_event_handle_t>(new MockEvent());
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeEventDestroy(ze_event_handle_t h) {
  delete reinterpret_cast<MockEvent*>(h);
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeEventHostSynchronize(ze_event_handle_t h, uint64_t timeout_ns) {
  if (reinterpret_cast<MockEvent*>(h)->signaled) return ZE_RESULT_SUCCESS;
  // Nothing will ever signal it; honour the timeout so the caller's bound is exercised.
  if (timeout_ns > 0) usleep(static_cast<useconds_t>(timeout_ns > 50000000ull ? 50000 : timeout_ns / 1000));
  return ZE_RESULT_NOT_READY;
}

ze_result_t mock_zeEventHostReset(ze_event_handle_t h) {
  reinterpret_cast<MockEvent*>(h)->signaled = false;
  return ZE_RESULT_SUCCESS;
}

ze_result_t mock_zeDevicePciGetPropertiesExt(ze_device_handle_t h, ze_pci_ext_properties_t* p) {
  if (!valid_device(h)) return ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
  if (p->stype != ZE_STRUCTURE_TYPE_PCI_EXT_PROPERTIES) return ZE_RESULT_ERROR_INVALID_ARGUMENT;
  p->address = {0, static_cast<uint32_t>(0x10 * (dev(h)->index + 1)), 0, 0};
  p->maxSpeed = {4, 16, 31500000000ll / 8};
  return ZE_RESULT_SUCCESS;
}

}  // namespace

Api mock_api(const MockConfig& cfg) {
  auto& s = st();
  {
    std::lock_guard<std::mutex> lk(s.mu);
    s.cfg = cfg;
    // Device objects are kept (handles handed out earlier stay valid); only grow the list.
    while (static_cast<int>(s.devices.size()) < cfg.num_devices)
      s.devices.push_back(std::make_unique<MockDevice>(MockDevice{static_cast<int>(s.devices.size())}));
    s.alloc_log.clear();
  }
  // Hide devices beyond num_devices from zeDeviceGet without destroying them.
  static std::vector<std::unique_ptr<MockDevice>> parked;
  while (static_cast<int>(s.devices.size()) > cfg.num_devices) {
    parked.push_back(std::move(s.devices.back()));
    s.devices.pop_back();
  }
  Api api;
#define CCL_ZE_MOCK_FN(name, required, params) api.name = &mock_##name;
  CCL_ZE_FUNCTIONS(CCL_ZE_MOCK_FN)
#undef CCL_ZE_MOCK_FN
  api.source = "mock";
  return api;
}

std::vector<std::vector<std::pair<uint32_t, uint32_t>>> mock_alloc_log() {
  std::lock_guard<std::mutex> lk(st().mu);
  return st().alloc_log;
}

std::pair<size_t, size_t> mock_live_objects() {
  std::lock_guard<std::mutex> lk(st().mu);
  return {st().allocs.size(), st().contexts.size()};
}

}  // namespace ze
}  // namespace ccl
