// The slice of the CUDA driver API that the CUDA transport uses, declared here so that the
// build needs no CUDA headers and the module links no CUDA library: libcuda.so.1 is dlopen'ed
// at run time (csrc/cuda/driver.cpp) and every function below is resolved by name.
//
// Types, enum values and struct layouts are copied from the CUDA driver API reference
// (cuda.h, CUDA 12.x/13.0). They are part of the driver ABI and have not changed since the
// virtual-memory-management API appeared (CUDA 10.2). tests/test_cuda_transport.py compiles
// this header next to the real cuda.h, where one is installed, and checks every value, every
// struct offset and every function type against it.
//
// The function table follows vLLM's pynccl_wrapper: the C API as data, one entry per function
// with its C prototype beside it. X(name, abi_symbol, return_type, (parameter types)):
//   name        the name passed to cuGetProcAddress_v2 (which picks the ABI version of the
//               function that matches kCudaAbiVersion, and the legacy default stream)
//   abi_symbol  the exported symbol of that same ABI version, for dlsym on drivers that lack
//               cuGetProcAddress_v2 (older than CUDA 12.0)
#pragma once

#include <cstddef>
#include <cstdint>

namespace ccl {
namespace cu {

// The CUDA version whose function ABIs the prototypes below describe. cuGetProcAddress_v2
// returns, for each name, the variant that was current in this version.
constexpr int kCudaAbiVersion = 12000;

enum CUresult : int {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_DEINITIALIZED = 4,
  CUDA_ERROR_STUB_LIBRARY = 34,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_PEER_ACCESS_UNSUPPORTED = 217,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_NOT_PERMITTED = 800,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_UNKNOWN = 999,
};

typedef int CUdevice;
typedef unsigned long long CUdeviceptr;  // CUdeviceptr_v2: 64-bit since CUDA 3.2
typedef unsigned long long CUmemGenericAllocationHandle;
typedef uint64_t cuuint64_t;
struct CUctx_st;  // opaque, declared in this namespace (not ::CUctx_st from a cuda.h)
struct CUstream_st;
typedef CUctx_st* CUcontext;
typedef CUstream_st* CUstream;

enum CUdevice_attribute : int {
  CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33,
  CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34,
  CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING = 41,
  CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50,
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
  CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102,
  CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103,
};

enum CUmemAllocationHandleType : int {
  CU_MEM_HANDLE_TYPE_NONE = 0x0,
  CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1,  // shareable handle is an int fd
};

enum CUmemAccess_flags : int {
  CU_MEM_ACCESS_FLAGS_PROT_NONE = 0x0,
  CU_MEM_ACCESS_FLAGS_PROT_READ = 0x1,
  CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3,
};

enum CUmemLocationType : int {
  CU_MEM_LOCATION_TYPE_INVALID = 0x0,
  CU_MEM_LOCATION_TYPE_DEVICE = 0x1,  // id is a device ordinal
};

enum CUmemAllocationType : int {
  CU_MEM_ALLOCATION_TYPE_INVALID = 0x0,
  CU_MEM_ALLOCATION_TYPE_PINNED = 0x1,
};

enum CUmemAllocationGranularity_flags : int {
  CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0,
  CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1,
};

enum CUdriverProcAddressQueryResult : int {
  CU_GET_PROC_ADDRESS_SUCCESS = 0,
  CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND = 1,
  CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT = 2,
};

// cuGetProcAddress flags (CUdriverProcAddress_flags)
constexpr cuuint64_t CU_GET_PROC_ADDRESS_LEGACY_STREAM = 1ull << 0;
// cuStreamCreate flags (CUstream_flags)
constexpr unsigned int CU_STREAM_NON_BLOCKING = 0x1;

struct CUmemLocation {  // CUmemLocation_v1
  CUmemLocationType type;
  int id;
};

struct CUmemAllocationProp {  // CUmemAllocationProp_v1
  CUmemAllocationType type;
  CUmemAllocationHandleType requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;  // must be zero outside Windows
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};

struct CUmemAccessDesc {  // CUmemAccessDesc_v1
  CUmemLocation location;
  CUmemAccess_flags flags;
};

static_assert(sizeof(CUmemLocation) == 8, "CUmemLocation layout");
static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp layout");
static_assert(offsetof(CUmemAllocationProp, location) == 8, "CUmemAllocationProp layout");
static_assert(offsetof(CUmemAllocationProp, allocFlags) == 24, "CUmemAllocationProp layout");
static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc layout");

// cuGetProcAddress_v2 itself is found with dlsym (it is how the others are found).
//   CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int cudaVersion,
//                                cuuint64_t flags, CUdriverProcAddressQueryResult* symbolStatus)
typedef CUresult (*PFN_cuGetProcAddress_v2)(const char*, void**, int, cuuint64_t,
                                             CUdriverProcAddressQueryResult*);

// clang-format off
#define CCL_CUDA_DRIVER_FUNCTIONS(X)                                                          \
  /* CUresult cuGetErrorName(CUresult error, const char** pStr) */                          \
  X(cuGetErrorName, "cuGetErrorName", CUresult, (CUresult, const char**))                    \
  /* CUresult cuGetErrorString(CUresult error, const char** pStr) */                        \
  X(cuGetErrorString, "cuGetErrorString", CUresult, (CUresult, const char**))                \
  /* CUresult cuInit(unsigned int Flags) */                                                 \
  X(cuInit, "cuInit", CUresult, (unsigned int))                                             \
  /* CUresult cuDriverGetVersion(int* driverVersion) */                                     \
  X(cuDriverGetVersion, "cuDriverGetVersion", CUresult, (int*))                             \
  /* CUresult cuDeviceGetCount(int* count) */                                               \
  X(cuDeviceGetCount, "cuDeviceGetCount", CUresult, (int*))                                 \
  /* CUresult cuDeviceGet(CUdevice* device, int ordinal) */                                 \
  X(cuDeviceGet, "cuDeviceGet", CUresult, (CUdevice*, int))                                 \
  /* CUresult cuDeviceGetName(char* name, int len, CUdevice dev) */                         \
  X(cuDeviceGetName, "cuDeviceGetName", CUresult, (char*, int, CUdevice))                   \
  /* CUresult cuDeviceGetPCIBusId(char* pciBusId, int len, CUdevice dev) */                 \
  X(cuDeviceGetPCIBusId, "cuDeviceGetPCIBusId", CUresult, (char*, int, CUdevice))           \
  /* CUresult cuDeviceGetAttribute(int* pi, CUdevice_attribute attrib, CUdevice dev) */     \
  X(cuDeviceGetAttribute, "cuDeviceGetAttribute", CUresult,                                  \
    (int*, CUdevice_attribute, CUdevice))                                                    \
  /* CUresult cuDeviceCanAccessPeer(int* canAccessPeer, CUdevice dev, CUdevice peerDev) */  \
  X(cuDeviceCanAccessPeer, "cuDeviceCanAccessPeer", CUresult, (int*, CUdevice, CUdevice))   \
  /* CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) */                    \
  X(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", CUresult, (CUcontext*, CUdevice)) \
  /* CUresult cuDevicePrimaryCtxRelease(CUdevice dev)   [ABI: _v2 since CUDA 11.0] */       \
  X(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", CUresult, (CUdevice))        \
  /* CUresult cuCtxGetCurrent(CUcontext* pctx) */                                           \
  X(cuCtxGetCurrent, "cuCtxGetCurrent", CUresult, (CUcontext*))                             \
  /* CUresult cuCtxSetCurrent(CUcontext ctx) */                                             \
  X(cuCtxSetCurrent, "cuCtxSetCurrent", CUresult, (CUcontext))                              \
  /* CUresult cuMemGetAllocationGranularity(size_t* granularity,                         */ \
  /*     const CUmemAllocationProp* prop, CUmemAllocationGranularity_flags option)       */ \
  X(cuMemGetAllocationGranularity, "cuMemGetAllocationGranularity", CUresult,                \
    (size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags))                 \
  /* CUresult cuMemCreate(CUmemGenericAllocationHandle* handle, size_t size,             */ \
  /*     const CUmemAllocationProp* prop, unsigned long long flags)                      */ \
  X(cuMemCreate, "cuMemCreate", CUresult,                                                    \
    (CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long)) \
  /* CUresult cuMemRelease(CUmemGenericAllocationHandle handle) */                          \
  X(cuMemRelease, "cuMemRelease", CUresult, (CUmemGenericAllocationHandle))                 \
  /* CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle* handle,         */ \
  /*     void* addr)                                                                     */ \
  X(cuMemRetainAllocationHandle, "cuMemRetainAllocationHandle", CUresult,                    \
    (CUmemGenericAllocationHandle*, void*))                                                  \
  /* CUresult cuMemExportToShareableHandle(void* shareableHandle,                        */ \
  /*     CUmemGenericAllocationHandle handle, CUmemAllocationHandleType handleType,      */ \
  /*     unsigned long long flags)                                                       */ \
  X(cuMemExportToShareableHandle, "cuMemExportToShareableHandle", CUresult,                  \
    (void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType, unsigned long long))    \
  /* CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle* handle,       */ \
  /*     void* osHandle, CUmemAllocationHandleType shHandleType)                         */ \
  X(cuMemImportFromShareableHandle, "cuMemImportFromShareableHandle", CUresult,              \
    (CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType))                       \
  /* CUresult cuMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t alignment,       */ \
  /*     CUdeviceptr addr, unsigned long long flags)                                     */ \
  X(cuMemAddressReserve, "cuMemAddressReserve", CUresult,                                    \
    (CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long))                         \
  /* CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) */                             \
  X(cuMemAddressFree, "cuMemAddressFree", CUresult, (CUdeviceptr, size_t))                  \
  /* CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,                      */ \
  /*     CUmemGenericAllocationHandle handle, unsigned long long flags)                  */ \
  X(cuMemMap, "cuMemMap", CUresult,                                                          \
    (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long))         \
  /* CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) */                                   \
  X(cuMemUnmap, "cuMemUnmap", CUresult, (CUdeviceptr, size_t))                              \
  /* CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc,  */ \
  /*     size_t count)                                                                   */ \
  X(cuMemSetAccess, "cuMemSetAccess", CUresult,                                              \
    (CUdeviceptr, size_t, const CUmemAccessDesc*, size_t))                                   \
  /* CUresult cuStreamCreate(CUstream* phStream, unsigned int Flags) */                     \
  X(cuStreamCreate, "cuStreamCreate", CUresult, (CUstream*, unsigned int))                  \
  /* CUresult cuStreamDestroy(CUstream hStream)   [ABI: _v2 since CUDA 4.0] */              \
  X(cuStreamDestroy, "cuStreamDestroy_v2", CUresult, (CUstream))                            \
  /* CUresult cuStreamSynchronize(CUstream hStream) */                                      \
  X(cuStreamSynchronize, "cuStreamSynchronize", CUresult, (CUstream))                       \
  /* CUresult cuMemsetD8Async(CUdeviceptr dstDevice, unsigned char uc, size_t N,         */ \
  /*     CUstream hStream)                                                               */ \
  X(cuMemsetD8Async, "cuMemsetD8Async", CUresult,                                            \
    (CUdeviceptr, unsigned char, size_t, CUstream))                                          \
  /* CUresult cuMemcpyHtoDAsync(CUdeviceptr dstDevice, const void* srcHost,              */ \
  /*     size_t ByteCount, CUstream hStream)   [ABI: _v2 since CUDA 3.2]                 */ \
  X(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", CUresult,                                     \
    (CUdeviceptr, const void*, size_t, CUstream))                                            \
  /* CUresult cuMemcpyDtoHAsync(void* dstHost, CUdeviceptr srcDevice, size_t ByteCount,  */ \
  /*     CUstream hStream)   [ABI: _v2 since CUDA 3.2]                                   */ \
  X(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2", CUresult,                                     \
    (void*, CUdeviceptr, size_t, CUstream))
// clang-format on

// One function pointer per entry, filled by ccl::cuda::driver().
struct DriverFunctions {
#define CCL_CU_DECLARE_POINTER(name, abi, ret, params) ret(*name) params = nullptr;
  CCL_CUDA_DRIVER_FUNCTIONS(CCL_CU_DECLARE_POINTER)
#undef CCL_CU_DECLARE_POINTER
};

}  // namespace cu
}  // namespace ccl
