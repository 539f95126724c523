#include "cuda/driver.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>

#include "cuda/error_names.h"

namespace ccl {
namespace cuda {

namespace {

struct DriverState {
  std::mutex mu;
  bool attempted = false;
  pid_t pid = 0;  // the process that loaded (and cuInit'ed) the driver
  std::string path_override;  // set by reload_driver
  void* handle = nullptr;
  cu::DriverFunctions fns;
  DriverStatus status;
};

DriverState& state() {
  static DriverState* s = new DriverState();  // never destroyed: used from atexit paths too
  return *s;
}

const char* table_error_name(int code) {
  switch (code) {
#define CCL_CU_ERROR_CASE(value, name) \
  case value:                          \
    return #name;
    CCL_CUDA_ERROR_NAMES(CCL_CU_ERROR_CASE)
#undef CCL_CU_ERROR_CASE
    default:
      return nullptr;
  }
}

std::string default_path() {
  const char* env = std::getenv("CCL_CUDA_DRIVER");
  if (env != nullptr && env[0] != '\0') return env;
  return "libcuda.so.1";
}

// Fills s.fns and s.status. Called with s.mu held.
void load(DriverState& s) {
  s.attempted = true;
  s.pid = getpid();
  s.fns = cu::DriverFunctions{};
  s.status = DriverStatus{};
  DriverStatus& st = s.status;
  st.path = s.path_override.empty() ? default_path() : s.path_override;

  dlerror();
  s.handle = dlopen(st.path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (s.handle == nullptr) {
    const char* err = dlerror();
    st.stage = "dlopen";
    st.reason = "no driver: " + st.path + " not found (" + (err ? err : "dlopen failed") + ")";
    return;
  }

  auto get_proc = reinterpret_cast<cu::PFN_cuGetProcAddress_v2>(
      dlsym(s.handle, "cuGetProcAddress_v2"));
  st.via_get_proc_address = get_proc != nullptr;
  std::string missing;
  // Resolve one entry: the driver's own lookup first (it knows which ABI variant matches
  // kCudaAbiVersion), then the exported symbol of that variant.
  auto resolve = [&](const char* name, const char* abi) -> void* {
    void* p = nullptr;
    if (get_proc != nullptr) {
      cu::CUdriverProcAddressQueryResult q = cu::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
      cu::CUresult r = get_proc(name, &p, cu::kCudaAbiVersion,
                                cu::CU_GET_PROC_ADDRESS_LEGACY_STREAM, &q);
      if (r != cu::CUDA_SUCCESS || q != cu::CU_GET_PROC_ADDRESS_SUCCESS) p = nullptr;
    }
    if (p == nullptr) p = dlsym(s.handle, abi);
    if (p == nullptr) missing += (missing.empty() ? "" : ", ") + std::string(abi);
    return p;
  };
#define CCL_CU_RESOLVE(name, abi, ret, params) \
  s.fns.name = reinterpret_cast<decltype(s.fns.name)>(resolve(#name, abi));
  CCL_CUDA_DRIVER_FUNCTIONS(CCL_CU_RESOLVE)
#undef CCL_CU_RESOLVE

  if (s.fns.cuDriverGetVersion != nullptr) {
    int v = 0;
    if (s.fns.cuDriverGetVersion(&v) == cu::CUDA_SUCCESS) st.driver_version = v;
  }
  if (!missing.empty()) {
    st.stage = "symbols";
    st.reason = "driver too old: " + st.path + " (CUDA driver version " +
                std::to_string(st.driver_version) + ") lacks " + missing +
                "; the CUDA transport needs the virtual memory management API with POSIX-fd "
                "export (a driver for CUDA 11 or newer; 12+ recommended)";
    return;
  }

  cu::CUresult r = s.fns.cuInit(0);
  st.init_result = static_cast<int>(r);
  if (r != cu::CUDA_SUCCESS) {
    st.stage = "cuInit";
    if (r == cu::CUDA_ERROR_NO_DEVICE) {
      st.reason = "no CUDA device: cuInit returned CUDA_ERROR_NO_DEVICE (check "
                  "CUDA_VISIBLE_DEVICES and that the GPUs are visible in this container)";
    } else if (r == cu::CUDA_ERROR_STUB_LIBRARY) {
      st.reason = "no driver: " + st.path + " is the CUDA toolkit's stub library, not the "
                  "driver (CUDA_ERROR_STUB_LIBRARY)";
    } else {
      st.reason = format_error(r, "cuInit(0)");
    }
    return;
  }
  st.stage = "ok";
  st.loaded = true;
}

DriverState& loaded_state() {
  DriverState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.attempted) load(s);
  if (s.status.loaded && s.pid != getpid()) {
    // CUDA does not survive fork(): every call in the child would fail (or worse).
    s.status.loaded = false;
    s.status.stage = "fork";
    s.status.reason = "the CUDA driver was initialised in a parent process (pid " +
                      std::to_string(s.pid) + ") before fork(); CUDA cannot be used in a "
                      "forked child: start ranks with the spawn method or exec";
  }
  return s;
}

}  // namespace

DriverStatus driver_status() {
  DriverState& s = loaded_state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.status;
}

const cu::DriverFunctions& driver() {
  DriverState& s = loaded_state();
  if (!s.status.loaded) throw DriverUnavailable(s.status.reason);
  return s.fns;
}

const cu::DriverFunctions* driver_if_loaded() noexcept {
  DriverState& s = state();
  return s.status.loaded && s.pid == getpid() ? &s.fns : nullptr;
}

std::atomic<int>& live_allocations() {
  static std::atomic<int> n{0};
  return n;
}

void reload_driver(const std::string& path) {
  if (live_allocations().load() != 0) {
    throw std::logic_error("cannot reload the CUDA driver: " +
                           std::to_string(live_allocations().load()) +
                           " allocation(s) are still open; close them first");
  }
  DriverState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.fns = cu::DriverFunctions{};
  s.status = DriverStatus{};
  if (s.handle != nullptr) dlclose(s.handle);
  s.handle = nullptr;
  s.attempted = false;
  s.path_override = path;
}

std::string error_name(int code) {
  DriverState& s = state();  // the driver's names also serve load() (cuInit's error)
  if (s.fns.cuGetErrorName != nullptr) {
    const char* name = nullptr;
    if (s.fns.cuGetErrorName(static_cast<cu::CUresult>(code), &name) == cu::CUDA_SUCCESS &&
        name != nullptr) {
      return name;
    }
  }
  const char* name = table_error_name(code);
  return name != nullptr ? name : "CUDA_ERROR_" + std::to_string(code);
}

std::string error_string(int code) {
  DriverState& s = state();
  if (s.fns.cuGetErrorString != nullptr) {
    const char* text = nullptr;
    if (s.fns.cuGetErrorString(static_cast<cu::CUresult>(code), &text) == cu::CUDA_SUCCESS &&
        text != nullptr) {
      return text;
    }
  }
  return "";
}

std::string format_error(int code, const std::string& call) {
  std::string msg = call + " failed: " + error_name(code) + " (" + std::to_string(code) + ")";
  std::string text = error_string(code);
  if (!text.empty()) msg += ": " + text;
  return msg;
}

void check(cu::CUresult r, const std::string& call) {
  if (r == cu::CUDA_SUCCESS) return;
  throw CudaError(static_cast<int>(r), call, format_error(static_cast<int>(r), call));
}

// ---------------------------------------------------------------------- contexts and streams

PrimaryContext::PrimaryContext(int device_index) : index_(device_index) {
  const auto& d = driver();
  check(d.cuDeviceGet(&dev_, device_index), "cuDeviceGet(" + std::to_string(device_index) + ")");
  check(d.cuDevicePrimaryCtxRetain(&ctx_, dev_),
        "cuDevicePrimaryCtxRetain(device " + std::to_string(device_index) + ")");
}

PrimaryContext::~PrimaryContext() {
  const cu::DriverFunctions* d = driver_if_loaded();
  if (ctx_ != nullptr && d != nullptr) d->cuDevicePrimaryCtxRelease(dev_);  // errors ignored
}

CurrentContext::CurrentContext(cu::CUcontext ctx) {
  const auto& d = driver();
  check(d.cuCtxGetCurrent(&prev_), "cuCtxGetCurrent");
  if (prev_ != ctx) {
    check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent(primary context)");
    switched_ = true;
  }
}

CurrentContext::~CurrentContext() {
  const cu::DriverFunctions* d = driver_if_loaded();
  if (switched_ && d != nullptr) d->cuCtxSetCurrent(prev_);
}

ScopedStream::ScopedStream() {
  check(driver().cuStreamCreate(&stream_, cu::CU_STREAM_NON_BLOCKING),
        "cuStreamCreate(CU_STREAM_NON_BLOCKING)");
}

ScopedStream::~ScopedStream() {
  const cu::DriverFunctions* d = driver_if_loaded();
  if (stream_ != nullptr && d != nullptr) d->cuStreamDestroy(stream_);
}

void ScopedStream::synchronize(const char* what) {
  check(driver().cuStreamSynchronize(stream_), std::string("cuStreamSynchronize after ") + what);
}

// ---------------------------------------------------------------------- devices

int device_count() {
  int n = 0;
  check(driver().cuDeviceGetCount(&n), "cuDeviceGetCount");
  return n;
}

DeviceInfo device_info(int index) {
  const auto& d = driver();
  DeviceInfo info;
  info.index = index;
  cu::CUdevice dev = 0;
  const std::string tag = "(device " + std::to_string(index) + ")";
  check(d.cuDeviceGet(&dev, index), "cuDeviceGet" + tag);
  char buf[256] = {0};
  check(d.cuDeviceGetName(buf, sizeof(buf) - 1, dev), "cuDeviceGetName" + tag);
  info.name = buf;
  char bus[64] = {0};
  check(d.cuDeviceGetPCIBusId(bus, sizeof(bus) - 1, dev), "cuDeviceGetPCIBusId" + tag);
  info.pci_bus_id = bus;
  auto attr = [&](cu::CUdevice_attribute a, const char* name) {
    int v = 0;
    check(d.cuDeviceGetAttribute(&v, a, dev),
          std::string("cuDeviceGetAttribute(") + name + ")" + tag);
    return v;
  };
  info.cc_major = attr(cu::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "CC_MAJOR");
  info.cc_minor = attr(cu::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "CC_MINOR");
  info.vmm = attr(cu::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                  "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED") != 0;
  info.posix_fd = attr(cu::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                       "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED") != 0;
  return info;
}

bool can_access_peer(int device, int peer) {
  const auto& d = driver();
  cu::CUdevice a = 0, b = 0;
  check(d.cuDeviceGet(&a, device), "cuDeviceGet(" + std::to_string(device) + ")");
  check(d.cuDeviceGet(&b, peer), "cuDeviceGet(" + std::to_string(peer) + ")");
  int v = 0;
  check(d.cuDeviceCanAccessPeer(&v, a, b),
        "cuDeviceCanAccessPeer(" + std::to_string(device) + ", " + std::to_string(peer) + ")");
  return v != 0;
}

std::vector<FunctionSpec> function_table() {
  return {
#define CCL_CU_SPEC(name, abi, ret, params) {#name, abi, #ret " " #name #params},
      CCL_CUDA_DRIVER_FUNCTIONS(CCL_CU_SPEC)
#undef CCL_CU_SPEC
  };
}

}  // namespace cuda
}  // namespace ccl
