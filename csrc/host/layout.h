// Layout of one rank's mailbox region (host transport). Each rank owns one region; peers map
// it and push into it. Offsets are computed here and nowhere else.
//
//   [0, kControlBytes)          ControlBlock (sequence number, status, identity)
//   hop1[2 phases][world][slot_words]   LL8 packets: header + payload (one-shot) or shard
//                                        (two-shot reduce-scatter), one slot per source rank
//   hop2[2 phases][world][hop2_words]   LL8 packets: fp32 reduced shard pushed by its owner
//                                        (two-shot all-gather)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "common/ll_packet.h"

namespace ccl {

constexpr uint64_t kMailboxMagic = 0x786f626c69616d63ull;  // "cmailbox"
constexpr uint32_t kLayoutVersion = 3;  // 3: bulk flags per bulk_chunk_words (was kChunkWords)
constexpr size_t kControlBytes = 4096;
constexpr int kPhases = 2;
constexpr int kMaxWorld = 64;  // missing-rank reports are 64-bit masks

struct alignas(64) ControlBlock {
  uint64_t magic;
  uint32_t version;
  uint32_t world;
  uint32_t rank;
  int32_t pid;
  uint64_t capacity_bytes;
  uint64_t region_bytes;
  alignas(64) uint64_t seq;     // written only by the owning rank, by the op itself
  alignas(64) uint64_t status;  // last error code of the owning rank (for probes / post-mortem)
};
static_assert(sizeof(ControlBlock) <= kControlBytes, "control block too large");

inline size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

// Payload words reduced per step (the size of a reader's fp32 accumulator).
constexpr size_t kChunkWords = 512;
// Largest bulk chunk: payload words published by one flag (16 KB). Finer flags let a reader
// start on the first bytes sooner, but on the 2-core CI VM a reader that follows the writer
// closely only slows both down (each flag line and the lines around it change hands again),
// and each flag adds a store that orders the writer's copy: 2 KB flags measured ~10% slower
// than 16 KB ones at 16 KB, and 16 KB flags as fast as one flag for the whole payload at
// 64 KB. A multiple of kChunkWords, so a reduce step never straddles two flags.
constexpr size_t kFlagChunkWords = 4096;
static_assert(kFlagChunkWords % kChunkWords == 0, "a reduce step must lie inside one flag chunk");

// Flag chunk of a bulk slot that carries `words` payload words: payloads up to two full chunks
// are published in two halves (rounded up to whole reduce steps), so the reader starts on the
// first half while the writer copies the second (2-core CI VM, 2 ranks fp32, against one flag
// up to 16 KB: fused add_rms_norm 1x4096 -10%, 8 and 16 KB all-reduce -5%; fixed 4 or 8 KB
// chunks were 3-12% slower at 32-64 KB). Writer and reader derive it from the same slot
// size, so they always agree. At most max(2, ceil(words / kFlagChunkWords)) flags.
inline int64_t bulk_chunk_words(int64_t words) {
  const size_t half = round_up((static_cast<size_t>(words) + 1) / 2, kChunkWords);
  return static_cast<int64_t>(std::min(kFlagChunkWords, std::max(half, kChunkWords)));
}
// Largest payload carried as LL packets; larger payloads use the bulk protocol.
constexpr size_t kLLAreaBytes = 8192;

// A hop-1 slot holds two protocols in disjoint areas, so raw bulk bytes can never be read
// as an LL packet carrying a current flag:
//   [0, kHeaderWords)           header packets (LL)
//   [ll_offset, +ll_words)      LL payload packets            (payloads <= LL threshold)
//   [flags_offset, +flag_words) one LL flag packet per bulk chunk  (bulk protocol)
//   [data_offset, ...)          raw payload bytes, published by the chunk's flag (release)
struct MailboxLayout {
  int world = 0;
  size_t capacity_bytes = 0;  // largest payload one rank may push in one call
  size_t cap_words = 0;       // payload words (4 data bytes each)
  size_t ll_offset = 0, ll_words = 0;
  size_t flags_offset = 0, flag_words = 0;
  size_t data_offset = 0;     // in 8-byte units from the slot start
  size_t slot_words = 0;
  size_t shard_words_max = 0; // largest two-shot shard, in payload words
  size_t hop2_words = 0;      // fp32 words of the largest reduced shard
  size_t hop1_offset = 0;
  size_t hop2_offset = 0;
  size_t region_bytes = 0;

  static MailboxLayout make(int world, size_t capacity_bytes) {
    MailboxLayout l;
    l.world = world;
    l.capacity_bytes = capacity_bytes;
    l.cap_words = round_up((capacity_bytes + 3) / 4, 8);
    l.ll_offset = 8;  // header padded to a cache line
    l.ll_words = round_up(std::min(capacity_bytes, kLLAreaBytes) / 4 + 1, 8);
    l.flags_offset = l.ll_offset + l.ll_words;
    l.flag_words =
        round_up(std::max<size_t>(2, (l.cap_words + kFlagChunkWords - 1) / kFlagChunkWords), 8);
    l.data_offset = l.flags_offset + l.flag_words;
    l.slot_words = l.data_offset + l.cap_words / 2;
    l.shard_words_max = round_up((l.cap_words + world - 1) / world, 8);
    l.hop2_words = 2 * l.shard_words_max;  // a 16-bit payload word holds two elements
    l.hop1_offset = kControlBytes;
    l.hop2_offset = l.hop1_offset + sizeof(uint64_t) * kPhases * world * l.slot_words;
    l.region_bytes =
        round_up(l.hop2_offset + sizeof(uint64_t) * kPhases * world * l.hop2_words, 4096);
    return l;
  }

  // Slot `src` of phase `phase` inside the region starting at `base`.
  LL8Packet* hop1_slot(uint8_t* base, int phase, int src) const {
    return reinterpret_cast<LL8Packet*>(base + hop1_offset) +
           (static_cast<size_t>(phase) * world + src) * slot_words;
  }
  LL8Packet* hop2_slot(uint8_t* base, int phase, int src) const {
    return reinterpret_cast<LL8Packet*>(base + hop2_offset) +
           (static_cast<size_t>(phase) * world + src) * hop2_words;
  }
  static uint8_t* bulk_data(LL8Packet* slot, size_t data_offset) {
    return reinterpret_cast<uint8_t*>(slot + data_offset);
  }
};

}  // namespace ccl
