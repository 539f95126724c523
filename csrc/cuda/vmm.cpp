#include "cuda/vmm.h"

#include <fcntl.h>
#include <unistd.h>

#include <limits>
#include <stdexcept>

namespace ccl {
namespace cuda {

namespace {

cu::CUmemAllocationProp allocation_prop(int device) {
  cu::CUmemAllocationProp prop{};  // zeroed: no compression, no RDMA flag, no win32 data
  prop.type = cu::CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  prop.location.type = cu::CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

size_t granularity_in_context(int device) {
  cu::CUmemAllocationProp prop = allocation_prop(device);
  size_t g = 0;
  check(driver().cuMemGetAllocationGranularity(&g, &prop, cu::CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        "cuMemGetAllocationGranularity(device " + std::to_string(device) + ")");
  if (g == 0) throw CudaError(cu::CUDA_ERROR_UNKNOWN, "cuMemGetAllocationGranularity",
                              "cuMemGetAllocationGranularity returned 0");
  return g;
}

}  // namespace

size_t round_up(size_t n, size_t g) {
  if (g == 0) throw std::invalid_argument("round_up: granularity must be positive");
  if (n > std::numeric_limits<size_t>::max() - (g - 1)) {
    throw std::invalid_argument("round_up: " + std::to_string(n) + " bytes overflows");
  }
  return (n + g - 1) / g * g;
}

size_t granularity(int device) {
  PrimaryContext ctx(device);
  CurrentContext current(ctx.get());
  return granularity_in_context(device);
}

Allocation::Allocation(int device, size_t bytes, bool imported)
    : device_(device), bytes_(bytes), imported_(imported) {
  ++live_allocations();
}

Allocation::~Allocation() {
  try {
    close();
  } catch (...) {
    // Destructors run at interpreter exit too, after the driver may be torn down.
  }
}

std::string Allocation::describe() const {
  return imported_ ? "a peer allocation of " + std::to_string(bytes_) +
                         " bytes mapped for device " + std::to_string(device_)
                   : "an allocation of " + std::to_string(bytes_) + " bytes on device " +
                         std::to_string(device_);
}

void Allocation::map_for_device(size_t alignment) {
  const auto& d = driver();
  const std::string what = " for " + describe();
  check(d.cuMemAddressReserve(&ptr_, bytes_, alignment, 0, 0), "cuMemAddressReserve" + what);
  reserved_ = true;
  check(d.cuMemMap(ptr_, bytes_, 0, handle_, 0), "cuMemMap" + what);
  mapped_ = true;
  cu::CUmemAccessDesc access{};
  access.location.type = cu::CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device_;
  access.flags = cu::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  check(d.cuMemSetAccess(ptr_, bytes_, &access, 1),
        "cuMemSetAccess(read/write for device " + std::to_string(device_) + ")" + what);
}

std::unique_ptr<Allocation> Allocation::create(int device, size_t min_bytes) {
  if (min_bytes == 0) throw std::invalid_argument("cannot allocate 0 bytes of device memory");
  auto ctx = std::make_unique<PrimaryContext>(device);
  CurrentContext current(ctx->get());
  const size_t g = granularity_in_context(device);
  std::unique_ptr<Allocation> a(new Allocation(device, round_up(min_bytes, g), false));
  a->ctx_ = std::move(ctx);  // from here on, the destructor undoes whatever was done
  cu::CUmemAllocationProp prop = allocation_prop(device);
  check(driver().cuMemCreate(&a->handle_, a->bytes_, &prop, 0),
        "cuMemCreate(POSIX fd handle type) for " + a->describe());
  a->have_handle_ = true;
  a->map_for_device(g);
  a->memset(0, a->bytes_, 0);  // before any fd exists: peers never see stale contents
  return a;
}

std::unique_ptr<Allocation> Allocation::import_fd(int device, int fd, size_t bytes) {
  if (fd < 0) throw std::invalid_argument("import_fd: invalid fd " + std::to_string(fd));
  auto ctx = std::make_unique<PrimaryContext>(device);
  CurrentContext current(ctx->get());
  const size_t g = granularity_in_context(device);
  if (bytes == 0 || bytes % g != 0) {
    throw std::invalid_argument("import_fd: " + std::to_string(bytes) +
                                " bytes is not a positive multiple of device " +
                                std::to_string(device) + "'s granularity " + std::to_string(g) +
                                " (the exporter's region size differs from ours?)");
  }
  std::unique_ptr<Allocation> a(new Allocation(device, bytes, true));
  a->ctx_ = std::move(ctx);
  check(driver().cuMemImportFromShareableHandle(
            &a->handle_, reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
            cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle(fd " + std::to_string(fd) + ")");
  a->have_handle_ = true;
  a->map_for_device(g);
  return a;
}

std::unique_ptr<Allocation> Allocation::alias(const Allocation& owner, int device) {
  if (owner.closed_) throw std::logic_error("alias of a closed allocation");
  auto ctx = std::make_unique<PrimaryContext>(device);
  CurrentContext current(ctx->get());
  const size_t g = granularity_in_context(device);
  if (owner.bytes_ % g != 0) {
    throw std::invalid_argument("alias: " + std::to_string(owner.bytes_) +
                                " bytes is not a multiple of device " + std::to_string(device) +
                                "'s granularity " + std::to_string(g));
  }
  std::unique_ptr<Allocation> a(new Allocation(device, owner.bytes_, true));
  a->ctx_ = std::move(ctx);
  check(driver().cuMemRetainAllocationHandle(&a->handle_, reinterpret_cast<void*>(owner.ptr_)),
        "cuMemRetainAllocationHandle of " + owner.describe());
  a->have_handle_ = true;
  a->map_for_device(g);
  return a;
}

int Allocation::export_fd() const {
  if (closed_) throw std::logic_error("export_fd on a closed allocation");
  if (imported_) throw std::logic_error("export_fd: only the owner exports its allocation");
  CurrentContext current(ctx_->get());
  int fd = -1;
  check(driver().cuMemExportToShareableHandle(&fd, handle_,
                                              cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
        "cuMemExportToShareableHandle(POSIX fd) for " + describe());
  if (fd < 0) {
    throw CudaError(cu::CUDA_ERROR_UNKNOWN, "cuMemExportToShareableHandle",
                    "cuMemExportToShareableHandle returned fd " + std::to_string(fd));
  }
  int flags = fcntl(fd, F_GETFD);
  if (flags >= 0) fcntl(fd, F_SETFD, flags | FD_CLOEXEC);  // not inherited by child processes
  return fd;
}

void Allocation::check_range(size_t offset, size_t n, const char* what) const {
  if (closed_) throw std::logic_error(std::string(what) + " on a closed allocation");
  if (offset > bytes_ || n > bytes_ - offset) {
    throw std::invalid_argument(std::string(what) + ": [" + std::to_string(offset) + ", +" +
                            std::to_string(n) + ") is outside the " + std::to_string(bytes_) +
                            "-byte allocation");
  }
}

void Allocation::memset(size_t offset, size_t n, uint8_t value) const {
  check_range(offset, n, "memset");
  CurrentContext current(ctx_->get());
  ScopedStream stream;
  check(driver().cuMemsetD8Async(ptr_ + offset, value, n, stream.get()),
        "cuMemsetD8Async on " + describe());
  stream.synchronize("cuMemsetD8Async");
}

void Allocation::write(size_t offset, const void* src, size_t n) const {
  check_range(offset, n, "write");
  CurrentContext current(ctx_->get());
  ScopedStream stream;
  check(driver().cuMemcpyHtoDAsync(ptr_ + offset, src, n, stream.get()),
        "cuMemcpyHtoDAsync(offset " + std::to_string(offset) + ") to " + describe());
  stream.synchronize("cuMemcpyHtoDAsync");  // the DMA has landed, not merely been staged
}

void Allocation::read(size_t offset, void* dst, size_t n) const {
  check_range(offset, n, "read");
  CurrentContext current(ctx_->get());
  ScopedStream stream;
  check(driver().cuMemcpyDtoHAsync(dst, ptr_ + offset, n, stream.get()),
        "cuMemcpyDtoHAsync(offset " + std::to_string(offset) + ") from " + describe());
  stream.synchronize("cuMemcpyDtoHAsync");
}

void Allocation::close() {
  if (closed_) return;
  closed_ = true;
  --live_allocations();
  const cu::DriverFunctions* d = driver_if_loaded();
  std::string first_error;
  int first_code = 0;
  auto step = [&](cu::CUresult r, const char* call) {
    if (r != cu::CUDA_SUCCESS && first_error.empty()) {
      first_code = r;
      first_error = format_error(r, std::string(call) + " of " + describe());
    }
  };
  if (d != nullptr && ctx_ != nullptr) {
    // Unmapping needs no particular context, but some drivers want one current; use ours.
    cu::CUcontext prev = nullptr;
    bool switched = d->cuCtxGetCurrent(&prev) == cu::CUDA_SUCCESS && prev != ctx_->get() &&
                    d->cuCtxSetCurrent(ctx_->get()) == cu::CUDA_SUCCESS;
    if (mapped_) step(d->cuMemUnmap(ptr_, bytes_), "cuMemUnmap");
    if (reserved_) step(d->cuMemAddressFree(ptr_, bytes_), "cuMemAddressFree");
    if (have_handle_) step(d->cuMemRelease(handle_), "cuMemRelease");
    if (switched) d->cuCtxSetCurrent(prev);
  }
  mapped_ = reserved_ = have_handle_ = false;
  ptr_ = 0;
  ctx_.reset();
  if (!first_error.empty()) throw CudaError(first_code, "close", first_error);
}

}  // namespace cuda
}  // namespace ccl
