// LL8 packet: the wire format of every mailbox (DESIGN.md §3), defined once for C++.
// The Triton kernels mirror it in ccl/kernels/ll.py with the same field names.
//
//   bits 63..32  flag : low 32 bits of the call's sequence number
//   bits 31..0   data : 4 payload bytes (one fp32, or two bf16/fp16 values)
//
// Atomicity assumption: an aligned 8-byte store and an aligned 8-byte load are single-copy
// atomic (true for x86-64 and AArch64 `mov`/`str`/`ldr`, and for 64-bit GPU stores). A
// reader that sees the current flag therefore also sees the data written with it, so no
// fence between data and flag is needed: the flag is inside the word.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>

namespace ccl {

struct LL8Packet {
  uint64_t word;

  static inline uint64_t pack(uint32_t data, uint32_t flag) {
    return (static_cast<uint64_t>(flag) << 32) | data;
  }
  static inline uint32_t flag_of(uint64_t w) { return static_cast<uint32_t>(w >> 32); }
  static inline uint32_t data_of(uint64_t w) { return static_cast<uint32_t>(w); }

  inline void store(uint32_t data, uint32_t flag) {
    __atomic_store_n(&word, pack(data, flag), __ATOMIC_RELAXED);
  }
  // Bulk-protocol chunk flags publish raw bytes written before them: release.
  inline void store_release(uint32_t data, uint32_t flag) {
    __atomic_store_n(&word, pack(data, flag), __ATOMIC_RELEASE);
  }
  inline uint64_t load() const { return __atomic_load_n(&word, __ATOMIC_ACQUIRE); }
};
static_assert(sizeof(LL8Packet) == 8, "LL8Packet must be one 8-byte word");

// Header carried in the first kHeaderWords packets of every hop-1 slot. Every rank compares
// its peers' headers with its own before touching their payload, so ranks that disagree on
// the op, dtype, shape or eps get a clear error instead of reading past what was sent.
constexpr int kHeaderWords = 4;

struct OpHeader {
  uint32_t op_dtype_flags;  // op (8) | dtype (8) | reserved (8) | flags (8)
  uint32_t numel;           // low 32 bits of the element count
  uint32_t cols;            // row length (0 for plain all-reduce)
  uint32_t eps_bits;        // bit pattern of eps (0 without a norm)

  bool operator==(const OpHeader& o) const {
    return op_dtype_flags == o.op_dtype_flags && numel == o.numel && cols == o.cols &&
           eps_bits == o.eps_bits;
  }
  bool operator!=(const OpHeader& o) const { return !(*this == o); }
  uint32_t word(int i) const {
    switch (i) {
      case 0: return op_dtype_flags;
      case 1: return numel;
      case 2: return cols;
      default: return eps_bits;
    }
  }
  void set_word(int i, uint32_t v) {
    switch (i) {
      case 0: op_dtype_flags = v; break;
      case 1: numel = v; break;
      case 2: cols = v; break;
      default: eps_bits = v; break;
    }
  }
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace ccl
