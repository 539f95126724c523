// Shared-memory regions for the host transport: memfd_create + mmap, and fd import helpers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ccl {

struct ShmRegion {
  int fd = -1;
  uint8_t* ptr = nullptr;
  size_t bytes = 0;
};

// Creates an anonymous memfd of `bytes`, maps it shared and read-write. Throws on failure.
ShmRegion shm_create(const std::string& name, size_t bytes);
// Maps a peer's memfd (received over SCM_RIGHTS). Does not take ownership of `fd`.
uint8_t* shm_map(int fd, size_t bytes);
void shm_unmap(uint8_t* ptr, size_t bytes);
// Size of the file behind fd (to check a peer's region before mapping it).
size_t fd_size(int fd);
// pidfd_open + pidfd_getfd: duplicate `target_fd` of process `pid` into this process.
// Needs ptrace rights over `pid` (Yama may refuse); throws with the errno text.
int pidfd_dup(int pid, int target_fd);

}  // namespace ccl
