// Level Zero transport core: driver/device discovery, exportable (dma-buf) device allocations,
// dma-buf import, and a small immediate command list for fills, copies and timed pushes.
//
// Every call goes through the function table of ze_dispatch.h (the dlopen'ed loader, or the mock
// driver in tests). Nothing here knows about Python; csrc/bindings/level_zero.cpp wraps it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "level_zero/ze_dispatch.h"

namespace ccl {
namespace ze {

// A failed driver call: `call` is the function, `code` its ze_result_t.
class ZeError : public std::runtime_error {
 public:
  ZeError(const std::string& call, uint32_t code, const std::string& detail = "");
  uint32_t code;
};

// A bounded wait expired (zeEventHostSynchronize returned ZE_RESULT_NOT_READY).
class ZeTimeout : public ZeError {
 public:
  explicit ZeTimeout(const std::string& what);
};

struct DeviceEntry {
  ze_driver_handle_t driver = nullptr;
  ze_device_handle_t device = nullptr;
};

// Process-wide state: the function table and the GPU devices of every driver, in driver order.
class Runtime {
 public:
  static Runtime& get();

  // Loads `library` (once) and runs zeInit / zeDriverGet / zeDeviceGet. Returns "" when the
  // transport is usable, else the reason. The outcome is cached until reset()/install().
  std::string init(const std::string& library);
  // Replaces the function table (the mock driver) and forgets the cached outcome.
  void install(const Api& api);
  void reset();

  bool ready();
  const Api& api();  // throws ZeError(ZE_RESULT_ERROR_UNINITIALIZED) unless ready
  std::string source();
  size_t num_devices();
  DeviceEntry device(int index);
  int index_of(ze_device_handle_t dev);  // -1 when not one of ours

 private:
  std::string init_locked();
  std::mutex mu_;
  Api api_;
  bool have_api_ = false;
  bool tried_ = false;
  std::string reason_;
  std::vector<DeviceEntry> devices_;
};

void check(ze_result_t r, const char* call);

// pNext chains. Each owns its structs (non-copyable: the links point inside the object).
struct ExportAllocChain {
  explicit ExportAllocChain(bool uncompressed);
  ExportAllocChain(const ExportAllocChain&) = delete;
  ExportAllocChain& operator=(const ExportAllocChain&) = delete;
  ze_memory_compression_hints_ext_desc_t hints{};
  ze_external_memory_export_desc_t export_desc{};
  ze_device_mem_alloc_desc_t desc{};
};
struct ImportAllocChain {
  explicit ImportAllocChain(int fd);
  ImportAllocChain(const ImportAllocChain&) = delete;
  ImportAllocChain& operator=(const ImportAllocChain&) = delete;
  ze_external_memory_import_fd_t import_fd{};
  ze_device_mem_alloc_desc_t desc{};
};
struct ExportFdQuery {
  ExportFdQuery();
  ExportFdQuery(const ExportFdQuery&) = delete;
  ExportFdQuery& operator=(const ExportFdQuery&) = delete;
  ze_external_memory_export_fd_t export_fd{};
  ze_memory_allocation_properties_t props{};
};
// (stype, flags) of every struct of a descriptor chain, head first. All chained structs here
// keep `flags` right after {stype, pNext}.
std::vector<std::pair<uint32_t, uint32_t>> describe_chain(const void* head);

// Allocation granularity: regions are rounded up to it (device-local pages are 64 KiB).
constexpr size_t kAllocGranularity = 64 * 1024;

struct ExportedAllocation {
  void* ptr = nullptr;
  int fd = -1;  // owned by the driver (it caches the dma-buf fd in the allocation): dup it
  size_t bytes = 0;
  bool uncompressed_hint = false;  // false when the driver refused the hint and we went on
  uint64_t id = 0;
};
// zeMemAllocDevice with export(DMA_BUF) [+ uncompressed hint], then the fd through
// zeMemGetAllocProperties + ze_external_memory_export_fd_t. When the driver rejects the hint
// (ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION) and allow_without_hint is set, retries without it.
ExportedAllocation alloc_exportable(ze_context_handle_t ctx, ze_device_handle_t dev, size_t bytes,
                                    bool uncompressed, bool allow_without_hint);
// zeMemAllocDevice + ze_external_memory_import_fd_t(DMA_BUF). Does not take ownership of fd.
void* import_dmabuf(ze_context_handle_t ctx, ze_device_handle_t dev, int fd, size_t bytes);
void mem_free(ze_context_handle_t ctx, void* ptr);

// The ordinal of the first command-queue group with `want` flags (COMPUTE, or COPY without
// COMPUTE for "copy"). Throws when there is none.
uint32_t pick_queue_ordinal(ze_device_handle_t dev, bool copy_engine);

// An immediate command list on (ctx, dev) with one host-visible event: every operation is
// appended with the event and waited for with zeEventHostSynchronize(timeout) — bounded.
class Stream {
 public:
  Stream(ze_context_handle_t ctx, ze_device_handle_t dev, bool copy_engine, double timeout_s);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  void fill_u32(void* dst, uint32_t pattern, size_t bytes);
  void copy(void* dst, const void* src, size_t bytes);
  // Host <-> device through a pinned staging buffer (zeMemAllocHost).
  void write(void* dst, const void* host_src, size_t bytes);
  void read(const void* src, void* host_dst, size_t bytes);
  // Wall time of `iters` copies of `bytes` (each appended then waited for), after `warmup`
  // untimed ones. Microseconds, one per copy.
  std::vector<double> time_copies(void* dst, const void* src, size_t bytes, int iters, int warmup);
  void close();
  uint32_t ordinal() const { return ordinal_; }

 private:
  void wait(const char* what, size_t bytes);
  void* staging(size_t bytes);
  void alive() const;

  ze_context_handle_t ctx_;
  ze_device_handle_t dev_;
  uint32_t ordinal_ = 0;
  uint64_t timeout_ns_;
  ze_command_list_handle_t list_ = nullptr;
  ze_event_pool_handle_t pool_ = nullptr;
  ze_event_handle_t event_ = nullptr;
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
  bool broken_ = false;
};

}  // namespace ze
}  // namespace ccl
