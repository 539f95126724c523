#include "host/shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

namespace ccl {

namespace {
std::runtime_error os_error(const std::string& what) {
  return std::runtime_error(what + ": " + std::strerror(errno));
}
}  // namespace

ShmRegion shm_create(const std::string& name, size_t bytes) {
  ShmRegion r;
  r.fd = static_cast<int>(syscall(SYS_memfd_create, name.c_str(), MFD_CLOEXEC));
  if (r.fd < 0) throw os_error("memfd_create(" + name + ")");
  if (ftruncate(r.fd, static_cast<off_t>(bytes)) != 0) {
    int saved = errno;
    close(r.fd);
    errno = saved;
    throw os_error("ftruncate(memfd, " + std::to_string(bytes) + ")");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r.fd, 0);
  if (p == MAP_FAILED) {
    int saved = errno;
    close(r.fd);
    errno = saved;
    throw os_error("mmap(memfd, " + std::to_string(bytes) + ")");
  }
  r.ptr = static_cast<uint8_t*>(p);
  r.bytes = bytes;
  return r;
}

uint8_t* shm_map(int fd, size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw os_error("mmap(peer fd " + std::to_string(fd) + ")");
  return static_cast<uint8_t*>(p);
}

void shm_unmap(uint8_t* ptr, size_t bytes) {
  if (ptr != nullptr) munmap(ptr, bytes);
}

size_t fd_size(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) throw os_error("fstat(fd " + std::to_string(fd) + ")");
  return static_cast<size_t>(st.st_size);
}

int pidfd_dup(int pid, int target_fd) {
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) throw os_error("pidfd_open(" + std::to_string(pid) + ")");
  int fd = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, target_fd, 0));
  int saved = errno;
  close(pidfd);
  if (fd < 0) {
    errno = saved;
    throw os_error("pidfd_getfd(pid " + std::to_string(pid) + ", fd " +
                   std::to_string(target_fd) + ") (needs ptrace rights over the peer)");
  }
  return fd;
}

}  // namespace ccl
