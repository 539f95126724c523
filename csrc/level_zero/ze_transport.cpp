#include "level_zero/ze_transport.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ccl {
namespace ze {

namespace {
std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}
}  // namespace

ZeError::ZeError(const std::string& call, uint32_t c, const std::string& detail)
    : std::runtime_error(call + " failed: " + result_name(c) + " (" + hex32(c) + ")" +
                         (detail.empty() ? "" : ": " + detail)),
      code(c) {}

ZeTimeout::ZeTimeout(const std::string& what)
    : ZeError("zeEventHostSynchronize", ZE_RESULT_NOT_READY, what) {}

void check(ze_result_t r, const char* call) {
  if (r != ZE_RESULT_SUCCESS) throw ZeError(call, r);
}

// ------------------------------------------------------------------------------------------
// Runtime

Runtime& Runtime::get() {
  static Runtime* rt = new Runtime();  // never destroyed: drivers dislike teardown at exit
  return *rt;
}

std::string Runtime::init(const std::string& library) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!tried_) {
    if (!have_api_) {
      std::string err = load_api(library, api_);
      if (!err.empty()) {
        tried_ = true;
        reason_ = err;
        return reason_;
      }
      have_api_ = true;
    }
    reason_ = init_locked();
    tried_ = true;
  }
  return reason_;
}

std::string Runtime::init_locked() {
  devices_.clear();
  ze_result_t r = api_.zeInit(ZE_INIT_FLAG_GPU_ONLY);
  if (r != ZE_RESULT_SUCCESS) {
    return "zeInit(ZE_INIT_FLAG_GPU_ONLY) failed with " + result_name(r) + " (" + hex32(r) +
           "): the loader " + api_.source +
           " found no usable GPU driver (is Intel's compute runtime, libze-intel-gpu1 / "
           "intel-level-zero-gpu, installed, and /dev/dri/renderD* accessible to this user?)";
  }
  uint32_t ndrivers = 0;
  r = api_.zeDriverGet(&ndrivers, nullptr);
  if (r != ZE_RESULT_SUCCESS) return "zeDriverGet failed with " + result_name(r);
  if (ndrivers == 0) return "no Level Zero driver: the loader " + api_.source + " found none";
  std::vector<ze_driver_handle_t> drivers(ndrivers);
  r = api_.zeDriverGet(&ndrivers, drivers.data());
  if (r != ZE_RESULT_SUCCESS) return "zeDriverGet failed with " + result_name(r);
  for (uint32_t d = 0; d < ndrivers; ++d) {
    uint32_t n = 0;
    if (api_.zeDeviceGet(drivers[d], &n, nullptr) != ZE_RESULT_SUCCESS || n == 0) continue;
    std::vector<ze_device_handle_t> devs(n);
    if (api_.zeDeviceGet(drivers[d], &n, devs.data()) != ZE_RESULT_SUCCESS) continue;
    for (uint32_t i = 0; i < n; ++i) {
      ze_device_properties_t p{};
      p.stype = ZE_STRUCTURE_TYPE_DEVICE_PROPERTIES;
      if (api_.zeDeviceGetProperties(devs[i], &p) != ZE_RESULT_SUCCESS) continue;
      if (p.type != ZE_DEVICE_TYPE_GPU) continue;
      devices_.push_back({drivers[d], devs[i]});
    }
  }
  if (devices_.empty()) {
    const char* mask = std::getenv("ZE_AFFINITY_MASK");
    return "no Level Zero GPU devices (" + std::to_string(ndrivers) + " driver(s) found" +
           (mask ? std::string(", ZE_AFFINITY_MASK=") + mask : std::string()) + ")";
  }
  return "";
}

void Runtime::install(const Api& api) {
  std::lock_guard<std::mutex> lk(mu_);
  api_ = api;
  have_api_ = true;
  tried_ = false;
  reason_.clear();
  devices_.clear();
}

void Runtime::reset() {
  std::lock_guard<std::mutex> lk(mu_);
  api_ = Api();
  have_api_ = false;
  tried_ = false;
  reason_.clear();
  devices_.clear();
}

bool Runtime::ready() {
  std::lock_guard<std::mutex> lk(mu_);
  return tried_ && reason_.empty();
}

const Api& Runtime::api() {
  std::lock_guard<std::mutex> lk(mu_);
  if (!tried_ || !reason_.empty())
    throw ZeError("ccl Level Zero runtime", ZE_RESULT_ERROR_UNINITIALIZED,
                  tried_ ? reason_ : "call availability() / init() first");
  return api_;  // stable: only install()/reset() replace it, which tests do between uses
}

std::string Runtime::source() {
  std::lock_guard<std::mutex> lk(mu_);
  return api_.source;
}

size_t Runtime::num_devices() {
  std::lock_guard<std::mutex> lk(mu_);
  return devices_.size();
}

DeviceEntry Runtime::device(int index) {
  std::lock_guard<std::mutex> lk(mu_);
  if (index < 0 || static_cast<size_t>(index) >= devices_.size())
    throw std::out_of_range("Level Zero device index " + std::to_string(index) + " out of range (" +
                            std::to_string(devices_.size()) + " GPU devices)");
  return devices_[static_cast<size_t>(index)];
}

int Runtime::index_of(ze_device_handle_t dev) {
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t i = 0; i < devices_.size(); ++i)
    if (devices_[i].device == dev) return static_cast<int>(i);
  return -1;
}

// ------------------------------------------------------------------------------------------
// Descriptor chains

ExportAllocChain::ExportAllocChain(bool uncompressed) {
  hints.stype = ZE_STRUCTURE_TYPE_MEMORY_COMPRESSION_HINTS_EXT_DESC;
  hints.pNext = nullptr;
  hints.flags = ZE_MEMORY_COMPRESSION_HINTS_EXT_FLAG_UNCOMPRESSED;
  export_desc.stype = ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_DESC;
  export_desc.pNext = uncompressed ? &hints : nullptr;
  export_desc.flags = ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF;
  desc.stype = ZE_STRUCTURE_TYPE_DEVICE_MEM_ALLOC_DESC;
  desc.pNext = &export_desc;
  desc.flags = 0;
  desc.ordinal = 0;
}

ImportAllocChain::ImportAllocChain(int fd) {
  import_fd.stype = ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_IMPORT_FD;
  import_fd.pNext = nullptr;
  import_fd.flags = ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF;
  import_fd.fd = fd;
  desc.stype = ZE_STRUCTURE_TYPE_DEVICE_MEM_ALLOC_DESC;
  desc.pNext = &import_fd;
  desc.flags = 0;
  desc.ordinal = 0;
}

ExportFdQuery::ExportFdQuery() {
  export_fd.stype = ZE_STRUCTURE_TYPE_EXTERNAL_MEMORY_EXPORT_FD;
  export_fd.pNext = nullptr;
  export_fd.flags = ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF;
  export_fd.fd = -1;
  props.stype = ZE_STRUCTURE_TYPE_MEMORY_ALLOCATION_PROPERTIES;
  props.pNext = &export_fd;
}

std::vector<std::pair<uint32_t, uint32_t>> describe_chain(const void* head) {
  std::vector<std::pair<uint32_t, uint32_t>> out;
  for (auto* e = static_cast<const ze_base_desc_t*>(head); e != nullptr && out.size() < 16;
       e = static_cast<const ze_base_desc_t*>(e->pNext)) {
    uint32_t flags = 0;
    std::memcpy(&flags, reinterpret_cast<const uint8_t*>(e) + sizeof(ze_base_desc_t), sizeof(flags));
    out.emplace_back(static_cast<uint32_t>(e->stype), flags);
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// Allocations

ExportedAllocation alloc_exportable(ze_context_handle_t ctx, ze_device_handle_t dev, size_t bytes,
                                    bool uncompressed, bool allow_without_hint) {
  const Api& api = Runtime::get().api();
  ExportedAllocation out;
  out.bytes = bytes;
  out.uncompressed_hint = uncompressed;
  ze_result_t r;
  {
    ExportAllocChain chain(uncompressed);
    r = api.zeMemAllocDevice(ctx, &chain.desc, bytes, 0, dev, &out.ptr);
  }
  if (r == ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION && uncompressed && allow_without_hint) {
    ExportAllocChain chain(false);
    out.uncompressed_hint = false;
    r = api.zeMemAllocDevice(ctx, &chain.desc, bytes, 0, dev, &out.ptr);
  }
  if (r != ZE_RESULT_SUCCESS)
    throw ZeError("zeMemAllocDevice(export DMA_BUF" +
                      std::string(out.uncompressed_hint ? " + UNCOMPRESSED hint" : "") + ", " +
                      std::to_string(bytes) + " bytes)",
                  r);
  ExportFdQuery q;
  r = api.zeMemGetAllocProperties(ctx, out.ptr, &q.props, nullptr);
  if (r != ZE_RESULT_SUCCESS || q.export_fd.fd < 0) {
    api.zeMemFree(ctx, out.ptr);
    throw ZeError("zeMemGetAllocProperties(export fd DMA_BUF)",
                  r != ZE_RESULT_SUCCESS ? r : ZE_RESULT_ERROR_UNKNOWN,
                  r != ZE_RESULT_SUCCESS ? "" : "the driver returned no fd");
  }
  out.fd = q.export_fd.fd;
  out.id = q.props.id;
  return out;
}

void* import_dmabuf(ze_context_handle_t ctx, ze_device_handle_t dev, int fd, size_t bytes) {
  const Api& api = Runtime::get().api();
  ImportAllocChain chain(fd);
  void* p = nullptr;
  ze_result_t r = api.zeMemAllocDevice(ctx, &chain.desc, bytes, 0, dev, &p);
  if (r != ZE_RESULT_SUCCESS)
    throw ZeError("zeMemAllocDevice(import DMA_BUF fd " + std::to_string(fd) + ", " +
                      std::to_string(bytes) + " bytes)",
                  r);
  return p;
}

void mem_free(ze_context_handle_t ctx, void* ptr) {
  if (ptr == nullptr) return;
  check(Runtime::get().api().zeMemFree(ctx, ptr), "zeMemFree");
}

uint32_t pick_queue_ordinal(ze_device_handle_t dev, bool copy_engine) {
  const Api& api = Runtime::get().api();
  uint32_t n = 0;
  check(api.zeDeviceGetCommandQueueGroupProperties(dev, &n, nullptr),
        "zeDeviceGetCommandQueueGroupProperties");
  std::vector<ze_command_queue_group_properties_t> groups(n);
  for (auto& g : groups) {
    g.stype = ZE_STRUCTURE_TYPE_COMMAND_QUEUE_GROUP_PROPERTIES;
    g.pNext = nullptr;
  }
  check(api.zeDeviceGetCommandQueueGroupProperties(dev, &n, groups.data()),
        "zeDeviceGetCommandQueueGroupProperties");
  for (uint32_t i = 0; i < n; ++i) {
    bool compute = groups[i].flags & ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COMPUTE;
    bool copy = groups[i].flags & ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COPY;
    if (copy_engine ? (copy && !compute) : compute) return i;
  }
  throw ZeError("zeDeviceGetCommandQueueGroupProperties", ZE_RESULT_ERROR_UNSUPPORTED_FEATURE,
                copy_engine ? "the device has no copy-only engine group"
                            : "the device has no compute engine group");
}

// ------------------------------------------------------------------------------------------
// Stream

Stream::Stream(ze_context_handle_t ctx, ze_device_handle_t dev, bool copy_engine, double timeout_s)
    : ctx_(ctx), dev_(dev), timeout_ns_(static_cast<uint64_t>(timeout_s * 1e9)) {
  const Api& api = Runtime::get().api();
  try {
    ordinal_ = pick_queue_ordinal(dev, copy_engine);
    ze_command_queue_desc_t qd{};
    qd.stype = ZE_STRUCTURE_TYPE_COMMAND_QUEUE_DESC;
    qd.ordinal = ordinal_;
    qd.index = 0;
    qd.mode = ZE_COMMAND_QUEUE_MODE_ASYNCHRONOUS;  // completion through the event, bounded
    qd.priority = ZE_COMMAND_QUEUE_PRIORITY_NORMAL;
    check(api.zeCommandListCreateImmediate(ctx, dev, &qd, &list_), "zeCommandListCreateImmediate");
    ze_event_pool_desc_t pd{};
    pd.stype = ZE_STRUCTURE_TYPE_EVENT_POOL_DESC;
    pd.flags = ZE_EVENT_POOL_FLAG_HOST_VISIBLE;
    pd.count = 1;
    check(api.zeEventPoolCreate(ctx, &pd, 1, &dev_, &pool_), "zeEventPoolCreate");
    ze_event_desc_t ed{};
    ed.stype = ZE_STRUCTURE_TYPE_EVENT_DESC;
    ed.index = 0;
    ed.signal = ZE_EVENT_SCOPE_FLAG_HOST;
    ed.wait = ZE_EVENT_SCOPE_FLAG_HOST;
    check(api.zeEventCreate(pool_, &ed, &event_), "zeEventCreate");
  } catch (...) {
    close();
    throw;
  }
}

Stream::~Stream() {
  try {
    close();
  } catch (...) {
  }
}

void Stream::close() {
  if (list_ == nullptr && pool_ == nullptr && event_ == nullptr && staging_ == nullptr) return;
  const Api& api = Runtime::get().api();
  // After a timeout the device may still own these; leaking beats a use-after-free in the driver.
  if (!broken_) {
    if (staging_ != nullptr) api.zeMemFree(ctx_, staging_);
    if (event_ != nullptr) api.zeEventDestroy(event_);
    if (pool_ != nullptr) api.zeEventPoolDestroy(pool_);
    if (list_ != nullptr) api.zeCommandListDestroy(list_);
  }
  staging_ = nullptr;
  staging_bytes_ = 0;
  event_ = nullptr;
  pool_ = nullptr;
  list_ = nullptr;
}

void Stream::alive() const {
  if (list_ == nullptr)
    throw ZeError("ccl Level Zero stream", ZE_RESULT_ERROR_INVALID_NULL_HANDLE,
                  broken_ ? "unusable after a timed-out operation" : "closed");
}

void Stream::wait(const char* what, size_t bytes) {
  const Api& api = Runtime::get().api();
  ze_result_t r = api.zeEventHostSynchronize(event_, timeout_ns_);
  if (r == ZE_RESULT_NOT_READY) {
    broken_ = true;
    list_ = nullptr;  // unusable from now on (alive() says so); resources deliberately leaked
    char buf[200];
    std::snprintf(buf, sizeof(buf), "%s of %zu bytes did not complete within %.1f s", what, bytes,
                  static_cast<double>(timeout_ns_) * 1e-9);
    throw ZeTimeout(buf);
  }
  check(r, "zeEventHostSynchronize");
  check(api.zeEventHostReset(event_), "zeEventHostReset");
}

void* Stream::staging(size_t bytes) {
  if (bytes <= staging_bytes_) return staging_;
  const Api& api = Runtime::get().api();
  if (staging_ != nullptr) {
    api.zeMemFree(ctx_, staging_);
    staging_ = nullptr;
    staging_bytes_ = 0;
  }
  ze_host_mem_alloc_desc_t hd{};
  hd.stype = ZE_STRUCTURE_TYPE_HOST_MEM_ALLOC_DESC;
  size_t want = bytes < 4096 ? 4096 : bytes;
  check(api.zeMemAllocHost(ctx_, &hd, want, 64, &staging_), "zeMemAllocHost");
  staging_bytes_ = want;
  return staging_;
}

void Stream::fill_u32(void* dst, uint32_t pattern, size_t bytes) {
  alive();
  if (bytes % 4 != 0) throw std::invalid_argument("fill size must be a multiple of 4 bytes");
  const Api& api = Runtime::get().api();
  check(api.zeCommandListAppendMemoryFill(list_, dst, &pattern, sizeof(pattern), bytes, event_, 0, nullptr),
        "zeCommandListAppendMemoryFill");
  wait("fill", bytes);
}

void Stream::copy(void* dst, const void* src, size_t bytes) {
  alive();
  const Api& api = Runtime::get().api();
  check(api.zeCommandListAppendMemoryCopy(list_, dst, src, bytes, event_, 0, nullptr),
        "zeCommandListAppendMemoryCopy");
  wait("copy", bytes);
}

void Stream::write(void* dst, const void* host_src, size_t bytes) {
  alive();
  void* s = staging(bytes);
  std::memcpy(s, host_src, bytes);
  copy(dst, s, bytes);
}

void Stream::read(const void* src, void* host_dst, size_t bytes) {
  alive();
  void* s = staging(bytes);
  copy(s, src, bytes);
  std::memcpy(host_dst, s, bytes);
}

std::vector<double> Stream::time_copies(void* dst, const void* src, size_t bytes, int iters, int warmup) {
  alive();
  const Api& api = Runtime::get().api();
  std::vector<double> out;
  out.reserve(static_cast<size_t>(iters > 0 ? iters : 0));
  for (int i = 0; i < warmup + iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    check(api.zeCommandListAppendMemoryCopy(list_, dst, src, bytes, event_, 0, nullptr),
          "zeCommandListAppendMemoryCopy");
    ze_result_t r = api.zeEventHostSynchronize(event_, timeout_ns_);
    auto t1 = std::chrono::steady_clock::now();
    if (r == ZE_RESULT_NOT_READY) {
      broken_ = true;
      list_ = nullptr;
      throw ZeTimeout("timed push of " + std::to_string(bytes) + " bytes did not complete");
    }
    check(r, "zeEventHostSynchronize");
    check(api.zeEventHostReset(event_), "zeEventHostReset");
    if (i >= warmup) out.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  return out;
}

}  // namespace ze
}  // namespace ccl
