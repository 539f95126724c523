/* A host-memory stand-in for libcuda.so.1, for tests on machines without a GPU.
 *
 * NOT part of ccl._C (CMake builds only the .cpp files under csrc).
 * tests/test_cuda_transport.py compiles it with the system C compiler and points the
 * transport at it with CCL_CUDA_DRIVER (or ccl._C.cuda.reload_driver). It implements exactly
 * the driver functions the transport resolves, with the same rules the real driver enforces
 * where a bug in our code would otherwise go unnoticed:
 *   - nothing works before cuInit; memcpy/memset need a current context, and the mapping
 *     must have been granted access (cuMemSetAccess) for that context's device;
 *   - sizes must be multiples of the granularity; cuMemAddressFree of a mapped range fails;
 *   - exported handles are real fds (memfds named "fakecuda-dev<N>"), so they cross
 *     processes over SCM_RIGHTS and are mapped with mmap, like device memory over P2P.
 * Knobs (read at every call, so a test can flip them with os.environ):
 *   FAKE_CUDA_DEVICES=n          number of devices (default 2; 0 -> cuInit NO_DEVICE)
 *   FAKE_CUDA_GRANULARITY=bytes  allocation granularity (default 65536)
 *   FAKE_CUDA_INIT_ERROR=code    cuInit returns code
 *   FAKE_CUDA_NO_VMM=1 / FAKE_CUDA_NO_POSIX_FD=1   device attributes 102 / 103 read 0
 *   FAKE_CUDA_NO_P2P=1           no device may map another's memory: cuDeviceCanAccessPeer
 *                                says 0 and cuMemSetAccess for a foreign device fails
 *   FAKE_CUDA_LYING_P2P=1        the driver says P2P works, but foreign mappings are private
 *                                copies: writes through them never reach the owner (the
 *                                silent-corruption case verify_peers must catch)
 *   FAKE_CUDA_NO_GETPROC=1       cuGetProcAddress_v2 finds nothing (tests the dlsym path)
 *   FAKE_CUDA_FAIL=name=code[,name=code]  the named function returns code
 * Build with -DFAKE_CUDA_OLD to leave out the VMM functions (a "driver too old").
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct { int type; int id; } Loc;
typedef struct {
  int type;
  int handle_types;
  Loc loc;
  void* win32;
  unsigned char flags[8];
} Prop;
typedef struct { Loc loc; int flags; } AccessDesc;

enum {
  OK = 0, INVALID_VALUE = 1, NOT_INITIALIZED = 3, NO_DEVICE = 100, INVALID_DEVICE = 101,
  INVALID_CONTEXT = 201, INVALID_HANDLE = 400, NOT_FOUND = 500, UNKNOWN = 999
};

#define MAX_DEVICES 16
#define MAX_ENTRIES 512

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int initialized;

static long env_long(const char* name, long def) {
  const char* v = getenv(name);
  return (v && *v) ? strtol(v, NULL, 0) : def;
}
static int ndev(void) { return (int)env_long("FAKE_CUDA_DEVICES", 2); }
static size_t gran(void) { return (size_t)env_long("FAKE_CUDA_GRANULARITY", 65536); }

/* FAKE_CUDA_FAIL="cuMemSetAccess=217,cuMemCreate=2" */
static CUresult injected(const char* fn) {
  const char* spec = getenv("FAKE_CUDA_FAIL");
  if (!spec) return OK;
  size_t n = strlen(fn);
  for (const char* p = spec; (p = strstr(p, fn)) != NULL; p += n) {
    if ((p == spec || p[-1] == ',') && p[n] == '=') return (CUresult)strtol(p + n + 1, NULL, 0);
  }
  return OK;
}
#define ENTER(name)                          \
  do {                                       \
    CUresult inj_ = injected(name);          \
    if (inj_ != OK) return inj_;             \
    if (!initialized) return NOT_INITIALIZED; \
  } while (0)

/* ---------------------------------------------------------------- contexts, devices */
typedef struct { int dev; int refs; } Ctx;
static Ctx ctxs[MAX_DEVICES];
static __thread Ctx* current;

static int valid_dev(int d) { return d >= 0 && d < ndev() && d < MAX_DEVICES; }

CUresult cuInit(unsigned int flags) {
  CUresult inj = injected("cuInit");
  if (inj != OK) return inj;
  long e = env_long("FAKE_CUDA_INIT_ERROR", 0);
  if (e) return (CUresult)e;
  if (flags != 0) return INVALID_VALUE;
  if (ndev() <= 0) return NO_DEVICE;
  initialized = 1;
  return OK;
}
CUresult cuDriverGetVersion(int* v) { *v = 12080; return OK; }
CUresult cuDeviceGetCount(int* n) { ENTER("cuDeviceGetCount"); *n = ndev(); return OK; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  ENTER("cuDeviceGet");
  if (!valid_dev(ordinal)) return INVALID_DEVICE;
  *d = ordinal;
  return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
  ENTER("cuDeviceGetName");
  if (!valid_dev(d)) return INVALID_DEVICE;
  snprintf(name, (size_t)len, "Fake GPU %d", d);
  return OK;
}
CUresult cuDeviceGetPCIBusId(char* bus, int len, CUdevice d) {
  ENTER("cuDeviceGetPCIBusId");
  if (!valid_dev(d)) return INVALID_DEVICE;
  snprintf(bus, (size_t)len, "0000:%02x:00.0", 0x18 + d);
  return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
  ENTER("cuDeviceGetAttribute");
  if (!valid_dev(d)) return INVALID_DEVICE;
  switch (attr) {
    case 102: *v = !env_long("FAKE_CUDA_NO_VMM", 0); break;
    case 103: *v = !env_long("FAKE_CUDA_NO_POSIX_FD", 0); break;
    case 75: *v = 9; break;
    case 76: *v = 0; break;
    default: *v = 0;
  }
  return OK;
}
static int p2p_forbidden(int a, int b) { return a != b && env_long("FAKE_CUDA_NO_P2P", 0); }
CUresult cuDeviceCanAccessPeer(int* v, CUdevice a, CUdevice b) {
  ENTER("cuDeviceCanAccessPeer");
  if (!valid_dev(a) || !valid_dev(b)) return INVALID_DEVICE;
  *v = a != b && !p2p_forbidden(a, b);
  return OK;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
  ENTER("cuDevicePrimaryCtxRetain");
  if (!valid_dev(d)) return INVALID_DEVICE;
  pthread_mutex_lock(&mu);
  ctxs[d].dev = d;
  ctxs[d].refs++;
  pthread_mutex_unlock(&mu);
  *ctx = &ctxs[d];
  return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
  ENTER("cuDevicePrimaryCtxRelease");
  if (!valid_dev(d)) return INVALID_DEVICE;
  pthread_mutex_lock(&mu);
  CUresult r = ctxs[d].refs > 0 ? OK : INVALID_CONTEXT;
  if (r == OK) ctxs[d].refs--;
  pthread_mutex_unlock(&mu);
  return r;
}
CUresult cuCtxGetCurrent(void** ctx) { ENTER("cuCtxGetCurrent"); *ctx = current; return OK; }
CUresult cuCtxSetCurrent(void* ctx) {
  ENTER("cuCtxSetCurrent");
  Ctx* c = (Ctx*)ctx;
  if (c != NULL && (c < ctxs || c >= ctxs + MAX_DEVICES || c->refs <= 0)) return INVALID_CONTEXT;
  current = c;
  return OK;
}

/* ---------------------------------------------------------------- errors */
static const struct { int code; const char* name; const char* text; } errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {217, "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED",
     "peer access is not supported between these two devices"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};
static CUresult lookup_error(int code, const char** out, int want_text) {
  for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++) {
    if (errors[i].code == code) {
      *out = want_text ? errors[i].text : errors[i].name;
      return OK;
    }
  }
  *out = NULL;
  return INVALID_VALUE;
}
CUresult cuGetErrorName(CUresult e, const char** s) { return lookup_error(e, s, 0); }
CUresult cuGetErrorString(CUresult e, const char** s) { return lookup_error(e, s, 1); }

/* ---------------------------------------------------------------- streams */
CUresult cuStreamCreate(void** s, unsigned int flags) {
  ENTER("cuStreamCreate");
  if (!current) return INVALID_CONTEXT;
  *s = malloc(1);
  return OK;
}
CUresult cuStreamDestroy_v2(void* s) { ENTER("cuStreamDestroy"); free(s); return OK; }
CUresult cuStreamSynchronize(void* s) {
  ENTER("cuStreamSynchronize");
  return s ? OK : INVALID_HANDLE;
}

#ifndef FAKE_CUDA_OLD
/* ---------------------------------------------------------------- VMM */
typedef struct { int fd; size_t size; int device; int refs; } Handle;
typedef struct { uintptr_t ptr; size_t size; } Range;
typedef struct { uintptr_t ptr; size_t size; Handle* h; unsigned access; } Mapping;

static Range reservations[MAX_ENTRIES];
static Mapping mappings[MAX_ENTRIES];
static int live_handles;

static void unref(Handle* h) {
  if (--h->refs == 0) {
    close(h->fd);
    free(h);
    live_handles--;
  }
}
static Mapping* find_mapping(uintptr_t p, size_t n) {
  for (int i = 0; i < MAX_ENTRIES; i++) {
    Mapping* m = &mappings[i];
    if (m->size && p >= m->ptr && p + n <= m->ptr + m->size) return m;
  }
  return NULL;
}
static Range* find_reservation(uintptr_t p, size_t n) {
  for (int i = 0; i < MAX_ENTRIES; i++) {
    Range* r = &reservations[i];
    if (r->size && p >= r->ptr && p + n <= r->ptr + r->size) return r;
  }
  return NULL;
}

CUresult cuMemGetAllocationGranularity(size_t* g, const Prop* prop, int option) {
  ENTER("cuMemGetAllocationGranularity");
  if (prop->type != 1 || prop->loc.type != 1 || !valid_dev(prop->loc.id)) return INVALID_VALUE;
  *g = gran();
  return OK;
}
CUresult cuMemCreate(CUmemGenericAllocationHandle* out, size_t size, const Prop* prop,
                     unsigned long long flags) {
  ENTER("cuMemCreate");
  if (prop->type != 1 || prop->handle_types != 1 || prop->loc.type != 1 ||
      !valid_dev(prop->loc.id) || prop->win32 != NULL || flags != 0)
    return INVALID_VALUE;
  if (size == 0 || size % gran() != 0) return INVALID_VALUE;
  char name[32];
  snprintf(name, sizeof(name), "fakecuda-dev%d", prop->loc.id);
  int fd = (int)syscall(SYS_memfd_create, name, 1 /* MFD_CLOEXEC */);
  if (fd < 0) return UNKNOWN;
  if (ftruncate(fd, (off_t)size) != 0) { close(fd); return 2; }
  Handle* h = calloc(1, sizeof(Handle));
  h->fd = fd; h->size = size; h->device = prop->loc.id; h->refs = 1;
  pthread_mutex_lock(&mu);
  live_handles++;
  pthread_mutex_unlock(&mu);
  *out = (uintptr_t)h;
  return OK;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
  ENTER("cuMemRelease");
  if (!handle) return INVALID_HANDLE;
  pthread_mutex_lock(&mu);
  unref((Handle*)(uintptr_t)handle);
  pthread_mutex_unlock(&mu);
  return OK;
}
CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle* out, void* addr) {
  ENTER("cuMemRetainAllocationHandle");
  pthread_mutex_lock(&mu);
  Mapping* m = find_mapping((uintptr_t)addr, 1);
  if (m) { m->h->refs++; *out = (uintptr_t)m->h; }
  pthread_mutex_unlock(&mu);
  return m ? OK : INVALID_VALUE;
}
CUresult cuMemExportToShareableHandle(void* out, CUmemGenericAllocationHandle handle, int type,
                                      unsigned long long flags) {
  ENTER("cuMemExportToShareableHandle");
  if (type != 1 || flags != 0 || !handle) return INVALID_VALUE;
  int fd = dup(((Handle*)(uintptr_t)handle)->fd);
  if (fd < 0) return UNKNOWN;
  *(int*)out = fd;
  return OK;
}
CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle* out, void* os_handle,
                                        int type) {
  ENTER("cuMemImportFromShareableHandle");
  if (type != 1) return INVALID_VALUE;
  int fd = (int)(intptr_t)os_handle;
  char link[64], target[256];
  snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof(target) - 1);
  if (n < 0) return INVALID_VALUE;
  target[n] = 0;
  const char* tag = strstr(target, "fakecuda-dev");
  struct stat st;
  if (!tag || fstat(fd, &st) != 0) return INVALID_VALUE;  /* not one of our allocations */
  Handle* h = calloc(1, sizeof(Handle));
  h->fd = dup(fd); h->size = (size_t)st.st_size; h->device = atoi(tag + 12); h->refs = 1;
  pthread_mutex_lock(&mu);
  live_handles++;
  pthread_mutex_unlock(&mu);
  *out = (uintptr_t)h;
  return OK;
}
CUresult cuMemAddressReserve(CUdeviceptr* out, size_t size, size_t align, CUdeviceptr addr,
                             unsigned long long flags) {
  ENTER("cuMemAddressReserve");
  if (size == 0 || size % gran() != 0 || addr != 0 || flags != 0) return INVALID_VALUE;
  if (align == 0) align = gran();
  size_t total = size + align;
  char* p = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return 2;
  uintptr_t start = ((uintptr_t)p + align - 1) / align * align;
  if (start > (uintptr_t)p) munmap(p, start - (uintptr_t)p);
  uintptr_t end = (uintptr_t)p + total;
  if (end > start + size) munmap((void*)(start + size), end - (start + size));
  pthread_mutex_lock(&mu);
  int i = 0;
  while (i < MAX_ENTRIES && reservations[i].size) i++;
  if (i < MAX_ENTRIES) { reservations[i].ptr = start; reservations[i].size = size; }
  pthread_mutex_unlock(&mu);
  if (i == MAX_ENTRIES) { munmap((void*)start, size); return 2; }
  *out = start;
  return OK;
}
CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  ENTER("cuMemAddressFree");
  pthread_mutex_lock(&mu);
  CUresult r = INVALID_VALUE;
  for (int i = 0; i < MAX_ENTRIES; i++) {
    if (reservations[i].ptr == ptr && reservations[i].size == size) {
      r = find_mapping(ptr, 1) ? INVALID_VALUE : OK;  /* still mapped: the real driver refuses */
      if (r == OK) { munmap((void*)ptr, size); reservations[i].size = 0; }
      break;
    }
  }
  pthread_mutex_unlock(&mu);
  return r;
}
CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags) {
  ENTER("cuMemMap");
  Handle* h = (Handle*)(uintptr_t)handle;
  if (!h || flags != 0 || size % gran() != 0 || offset + size > h->size) return INVALID_VALUE;
  pthread_mutex_lock(&mu);
  CUresult r = OK;
  int i = 0;
  if (!find_reservation(ptr, size) || find_mapping(ptr, 1)) r = INVALID_VALUE;
  while (r == OK && i < MAX_ENTRIES && mappings[i].size) i++;
  if (r == OK && i == MAX_ENTRIES) r = 2;
  if (r == OK) {
    void* p = mmap((void*)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->fd, (off_t)offset);
    if (p == MAP_FAILED) r = UNKNOWN;
  }
  if (r == OK) {
    mappings[i].ptr = ptr; mappings[i].size = size; mappings[i].h = h; mappings[i].access = 0;
    h->refs++;
  }
  pthread_mutex_unlock(&mu);
  return r;
}
CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
  ENTER("cuMemUnmap");
  pthread_mutex_lock(&mu);
  Mapping* m = find_mapping(ptr, 1);
  CUresult r = (m && m->ptr == ptr && m->size == size) ? OK : INVALID_VALUE;
  if (r == OK) {
    mmap((void*)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
         -1, 0);
    unref(m->h);
    memset(m, 0, sizeof(*m));
  }
  pthread_mutex_unlock(&mu);
  return r;
}
CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const AccessDesc* desc, size_t count) {
  ENTER("cuMemSetAccess");
  pthread_mutex_lock(&mu);
  Mapping* m = find_mapping(ptr, size);
  CUresult r = (m && m->ptr == ptr && m->size == size && count > 0) ? OK : INVALID_VALUE;
  for (size_t k = 0; r == OK && k < count; k++) {
    const AccessDesc* d = &desc[k];
    if (d->loc.type != 1 || !valid_dev(d->loc.id) || d->flags != 3) r = INVALID_VALUE;
    else if (p2p_forbidden(d->loc.id, m->h->device)) r = INVALID_DEVICE;
  }
  if (r == OK) {
    int foreign = 0;
    for (size_t k = 0; k < count; k++) {
      m->access |= 1u << desc[k].loc.id;
      foreign |= desc[k].loc.id != m->h->device;
    }
    int lying = foreign && env_long("FAKE_CUDA_LYING_P2P", 0);
    int flags = MAP_FIXED | (lying ? MAP_PRIVATE : MAP_SHARED);
    void* p = mmap((void*)ptr, size, PROT_READ | PROT_WRITE, flags, m->h->fd, 0);
    if (p == MAP_FAILED) r = UNKNOWN;
  }
  pthread_mutex_unlock(&mu);
  return r;
}

/* Device-side accesses: the current context's device must have been granted access. */
static CUresult check_access(uintptr_t p, size_t n) {
  if (!current) return INVALID_CONTEXT;
  pthread_mutex_lock(&mu);
  Mapping* m = find_mapping(p, n);
  CUresult r = (m && (m->access & (1u << current->dev))) ? OK : INVALID_VALUE;
  pthread_mutex_unlock(&mu);
  return r;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
  ENTER("cuMemsetD8Async");
  CUresult r = stream ? check_access(dst, n) : INVALID_HANDLE;
  if (r == OK) memset((void*)dst, v, n);
  return r;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
  ENTER("cuMemcpyHtoDAsync");
  CUresult r = stream ? check_access(dst, n) : INVALID_HANDLE;
  if (r == OK) memcpy((void*)dst, src, n);
  return r;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
  ENTER("cuMemcpyDtoHAsync");
  CUresult r = stream ? check_access(src, n) : INVALID_HANDLE;
  if (r == OK) memcpy(dst, (const void*)src, n);
  return r;
}
#endif /* FAKE_CUDA_OLD */

/* ---------------------------------------------------------------- test introspection */
/* Live objects, for leak checks: handles, mappings, reservations, primary-context refs. */
void fake_cuda_stats(int* handles, int* maps, int* reserved, int* ctx_refs) {
  pthread_mutex_lock(&mu);
  *handles = *maps = *reserved = *ctx_refs = 0;
#ifndef FAKE_CUDA_OLD
  *handles = live_handles;
  for (int i = 0; i < MAX_ENTRIES; i++) {
    *maps += mappings[i].size != 0;
    *reserved += reservations[i].size != 0;
  }
#endif
  for (int d = 0; d < MAX_DEVICES; d++) *ctx_refs += ctxs[d].refs;
  pthread_mutex_unlock(&mu);
}
/* Device of the calling thread's current context, or -1 when none is current. */
int fake_cuda_current_device(void) { return current ? current->dev : -1; }
/* Last (version, flags) passed to cuGetProcAddress_v2. */
static int last_version;
static unsigned long long last_flags;
void fake_cuda_last_get_proc(int* version, unsigned long long* flags) {
  *version = last_version;
  *flags = last_flags;
}

/* ---------------------------------------------------------------- cuGetProcAddress_v2 */
static const struct { const char* name; void* fn; } procs[] = {
    {"cuGetErrorName", (void*)cuGetErrorName},
    {"cuGetErrorString", (void*)cuGetErrorString},
    {"cuInit", (void*)cuInit},
    {"cuDriverGetVersion", (void*)cuDriverGetVersion},
    {"cuDeviceGetCount", (void*)cuDeviceGetCount},
    {"cuDeviceGet", (void*)cuDeviceGet},
    {"cuDeviceGetName", (void*)cuDeviceGetName},
    {"cuDeviceGetPCIBusId", (void*)cuDeviceGetPCIBusId},
    {"cuDeviceGetAttribute", (void*)cuDeviceGetAttribute},
    {"cuDeviceCanAccessPeer", (void*)cuDeviceCanAccessPeer},
    {"cuDevicePrimaryCtxRetain", (void*)cuDevicePrimaryCtxRetain},
    {"cuDevicePrimaryCtxRelease", (void*)cuDevicePrimaryCtxRelease_v2},
    {"cuCtxGetCurrent", (void*)cuCtxGetCurrent},
    {"cuCtxSetCurrent", (void*)cuCtxSetCurrent},
    {"cuStreamCreate", (void*)cuStreamCreate},
    {"cuStreamDestroy", (void*)cuStreamDestroy_v2},
    {"cuStreamSynchronize", (void*)cuStreamSynchronize},
#ifndef FAKE_CUDA_OLD
    {"cuMemGetAllocationGranularity", (void*)cuMemGetAllocationGranularity},
    {"cuMemCreate", (void*)cuMemCreate},
    {"cuMemRelease", (void*)cuMemRelease},
    {"cuMemRetainAllocationHandle", (void*)cuMemRetainAllocationHandle},
    {"cuMemExportToShareableHandle", (void*)cuMemExportToShareableHandle},
    {"cuMemImportFromShareableHandle", (void*)cuMemImportFromShareableHandle},
    {"cuMemAddressReserve", (void*)cuMemAddressReserve},
    {"cuMemAddressFree", (void*)cuMemAddressFree},
    {"cuMemMap", (void*)cuMemMap},
    {"cuMemUnmap", (void*)cuMemUnmap},
    {"cuMemSetAccess", (void*)cuMemSetAccess},
    {"cuMemsetD8Async", (void*)cuMemsetD8Async},
    {"cuMemcpyHtoDAsync", (void*)cuMemcpyHtoDAsync_v2},
    {"cuMemcpyDtoHAsync", (void*)cuMemcpyDtoHAsync_v2},
#endif
};
CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version, unsigned long long flags,
                             int* status) {
  last_version = version;
  last_flags = flags;
  *pfn = NULL;
  if (status) *status = 1; /* SYMBOL_NOT_FOUND */
  if (env_long("FAKE_CUDA_NO_GETPROC", 0)) return NOT_FOUND;
  for (size_t i = 0; i < sizeof(procs) / sizeof(procs[0]); i++) {
    if (strcmp(procs[i].name, symbol) == 0) {
      *pfn = procs[i].fn;
      if (status) *status = 0;
      return OK;
    }
  }
  return NOT_FOUND;
}
