// Device memory that other processes can map: driver-API virtual memory management (VMM).
//
//   owner:    cuMemCreate (pinned, on the device, POSIX-fd exportable, size rounded up to the
//             allocation granularity) -> cuMemAddressReserve -> cuMemMap -> cuMemSetAccess
//             (read/write for the owning device) -> zeroed -> cuMemExportToShareableHandle
//             gives an fd that crosses processes over SCM_RIGHTS like a memfd.
//   importer: cuMemImportFromShareableHandle(fd) -> cuMemAddressReserve -> cuMemMap ->
//             cuMemSetAccess for the IMPORTING device: the peer's memory becomes addressable
//             from this process's GPU (P2P over NVLink/PCIe). When the two GPUs cannot reach
//             each other, cuMemSetAccess (or the first access) fails, and the caller falls back.
//
// All calls run in the device's primary context (PyTorch's), made current for the call and
// restored afterwards. Zeroing happens before the fd exists, so no peer can ever observe the
// region's previous contents (stale flags from another job).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "cuda/driver.h"

namespace ccl {
namespace cuda {

// Round n up to a multiple of g (g > 0). Throws std::invalid_argument on g == 0 or overflow.
size_t round_up(size_t n, size_t g);

// Minimum allocation granularity for pinned, POSIX-fd exportable memory on `device`.
size_t granularity(int device);

class Allocation {
 public:
  // New zeroed memory on `device` of at least `min_bytes` (rounded up to the granularity).
  static std::unique_ptr<Allocation> create(int device, size_t min_bytes);
  // Maps the allocation behind `fd` (exported by a peer) for access from `device`. `bytes`
  // must be the exporter's size (a multiple of the granularity). Does not close `fd`.
  static std::unique_ptr<Allocation> import_fd(int device, int fd, size_t bytes);

  // A second mapping of `owner`'s memory, in this process, for access from `device` (the
  // in-process peer check of probe_pairs: same handle, another GPU's page tables).
  static std::unique_ptr<Allocation> alias(const Allocation& owner, int device);

  ~Allocation();  // close(), errors ignored
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  // A new fd for this allocation (close-on-exec; the caller owns it). Owner side only.
  int export_fd() const;

  // Synchronous helpers over a private stream, for set-up and verification only (not for the
  // data path): bytes [offset, offset + n) of this mapping.
  void memset(size_t offset, size_t n, uint8_t value) const;
  void write(size_t offset, const void* src, size_t n) const;
  void read(size_t offset, void* dst, size_t n) const;

  // Unmaps, frees the address range and releases the handle and the context reference.
  // Idempotent; throws CudaError on the first failure after attempting every step.
  void close();

  uintptr_t ptr() const { return static_cast<uintptr_t>(ptr_); }
  size_t bytes() const { return bytes_; }
  int device() const { return device_; }
  bool imported() const { return imported_; }
  bool closed() const { return closed_; }

 private:
  Allocation(int device, size_t bytes, bool imported);
  void map_for_device(size_t alignment);  // reserve + map + set access (handle_ set)
  void check_range(size_t offset, size_t n, const char* what) const;
  std::string describe() const;

  int device_;
  size_t bytes_;
  bool imported_;
  bool closed_ = false;
  std::unique_ptr<PrimaryContext> ctx_;
  cu::CUmemGenericAllocationHandle handle_ = 0;
  bool have_handle_ = false;
  cu::CUdeviceptr ptr_ = 0;
  bool reserved_ = false;
  bool mapped_ = false;
};

}  // namespace cuda
}  // namespace ccl
