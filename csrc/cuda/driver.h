// Run-time loading of the CUDA driver (libcuda.so.1) and the helpers every driver call uses:
// error checking that throws CudaError with the CUresult name and text, and the device's
// primary context made current for the duration of a call.
//
// Nothing here links against CUDA: the library is dlopen'ed on first use, so ccl._C imports
// and works on machines without a driver (driver_status() then says why CUDA is absent).
#pragma once

#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/driver_api.h"

namespace ccl {
namespace cuda {

// A driver call failed. what() reads "<call> failed: <NAME> (<code>): <text>".
class CudaError : public std::runtime_error {
 public:
  CudaError(int code, const std::string& call, const std::string& message)
      : std::runtime_error(message), code_(code), call_(call) {}
  int code() const { return code_; }
  const std::string& call() const { return call_; }

 private:
  int code_;
  std::string call_;
};

// The driver could not be loaded or initialised; what() is the reason (for Availability).
class DriverUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct DriverStatus {
  bool loaded = false;        // dlopen + every symbol + cuInit succeeded
  std::string path;           // what was dlopen'ed
  std::string stage;          // "dlopen", "symbols", "cuInit" (where it failed) or "ok"
  std::string reason;         // empty when loaded
  int init_result = -1;       // CUresult of cuInit (-1: not reached)
  int driver_version = 0;     // cuDriverGetVersion, e.g. 12080 (0: unknown)
  bool via_get_proc_address = false;  // symbols came from cuGetProcAddress_v2, not dlsym
};

// Loads the driver once per process (thread-safe) and reports how that went. Never throws.
// The library is $CCL_CUDA_DRIVER when set (a path), else "libcuda.so.1".
DriverStatus driver_status();

// The function table. Throws DriverUnavailable (with the reason) when the driver is absent.
const cu::DriverFunctions& driver();
// The function table when the driver is loaded, else nullptr. Never throws (for destructors).
const cu::DriverFunctions* driver_if_loaded() noexcept;

// Test hook: unloads the driver and makes the next use load `path` ("" = the default). Refused
// (std::logic_error) while any allocation of this module is alive.
void reload_driver(const std::string& path);

// Throws CudaError unless r == CUDA_SUCCESS; `call` names the call and its arguments.
void check(cu::CUresult r, const std::string& call);
inline void check(cu::CUresult r, const char* call) {
  if (r != cu::CUDA_SUCCESS) check(r, std::string(call));
}

// "CUDA_ERROR_OUT_OF_MEMORY": from the driver when loaded, else from the built-in table,
// else "CUDA_ERROR_<code>".
std::string error_name(int code);
// The driver's description of `code`, or "" when the driver cannot give one.
std::string error_string(int code);
// "<call> failed: NAME (code): text"
std::string format_error(int code, const std::string& call);

// Number of live allocations (Allocation objects not yet closed), for reload_driver.
std::atomic<int>& live_allocations();

// One reference to a device's primary context (the context the CUDA runtime, and so PyTorch,
// uses for that device): retained on construction, released on destruction.
class PrimaryContext {
 public:
  explicit PrimaryContext(int device_index);
  ~PrimaryContext();
  PrimaryContext(const PrimaryContext&) = delete;
  PrimaryContext& operator=(const PrimaryContext&) = delete;
  cu::CUcontext get() const { return ctx_; }
  cu::CUdevice device() const { return dev_; }
  int index() const { return index_; }

 private:
  int index_;
  cu::CUdevice dev_ = 0;
  cu::CUcontext ctx_ = nullptr;
};

// Makes `ctx` current on this thread for the scope and restores the previous context (which
// may be none, or another device's) afterwards: the transport never leaves the caller's
// thread on a different device than it found it.
class CurrentContext {
 public:
  explicit CurrentContext(cu::CUcontext ctx);
  ~CurrentContext();
  CurrentContext(const CurrentContext&) = delete;
  CurrentContext& operator=(const CurrentContext&) = delete;

 private:
  cu::CUcontext prev_ = nullptr;
  bool switched_ = false;
};

// A private non-blocking stream for one operation: init-time copies never serialise with, or
// wait behind, work the framework has queued on the legacy default stream.
class ScopedStream {
 public:
  ScopedStream();
  ~ScopedStream();
  ScopedStream(const ScopedStream&) = delete;
  ScopedStream& operator=(const ScopedStream&) = delete;
  cu::CUstream get() const { return stream_; }
  void synchronize(const char* what);

 private:
  cu::CUstream stream_ = nullptr;
};

struct DeviceInfo {
  int index = 0;
  std::string name;
  std::string pci_bus_id;
  int cc_major = 0, cc_minor = 0;
  bool vmm = false;       // CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
  bool posix_fd = false;  // CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
};

int device_count();
DeviceInfo device_info(int index);
bool can_access_peer(int device, int peer);

// Name and ABI symbol of every function in the table, with its signature as declared.
struct FunctionSpec {
  const char* name;
  const char* abi_symbol;
  const char* signature;
};
std::vector<FunctionSpec> function_table();

}  // namespace cuda
}  // namespace ccl
