#include "host/mailbox.h"

#include "host/epilogue.h"

#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CCL_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CCL_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define CCL_CPU_RELAX() asm volatile("" ::: "memory")
#endif

namespace ccl {

namespace {

// Every 2^31 calls each rank rewrites the unused tail of its slots with the current flag, so
// no word keeps a flag older than 2^31 calls and a 32-bit flag can never match stale data
// after the sequence number wraps (the "slot counter wraparound" hang of earlier designs).
constexpr uint64_t kScrubPeriodMask = (1ull << 31) - 1;

inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

inline size_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }
inline int elems_per_word(DType dt) { return dt == DType::kFloat32 ? 1 : 2; }

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline uint16_t f32_to_f16(float f) {
  _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float load_elem(const uint8_t* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case DType::kBFloat16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return bf16_to_f32(h);
    }
    default: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return f16_to_f32(h);
    }
  }
}

inline void store_elem(uint8_t* p, int64_t i, DType dt, float v) {
  switch (dt) {
    case DType::kFloat32:
      std::memcpy(p + 4 * i, &v, 4);
      break;
    case DType::kBFloat16: {
      uint16_t h = f32_to_bf16(v);
      std::memcpy(p + 2 * i, &h, 2);
      break;
    }
    default: {
      uint16_t h = f32_to_f16(v);
      std::memcpy(p + 2 * i, &h, 2);
      break;
    }
  }
}

// Element `j` (0 or 1) of a payload word.
inline float word_elem(uint32_t data, int j, DType dt) {
  switch (dt) {
    case DType::kFloat32:
      return bits_to_f32(data);
    case DType::kBFloat16:
      return bf16_to_f32(static_cast<uint16_t>(data >> (16 * j)));
    default:
      return f16_to_f32(static_cast<uint16_t>(data >> (16 * j)));
  }
}

// Payload word w of a raw buffer of nbytes (the last word is zero-padded).
inline uint32_t raw_word(const uint8_t* p, size_t nbytes, int64_t w) {
  uint32_t d = 0;
  size_t off = static_cast<size_t>(w) * 4;
  std::memcpy(&d, p + off, std::min<size_t>(4, nbytes - off));
  return d;
}

}  // namespace

struct HostMailbox::Call {
  uint64_t seq;
  int phase;
  uint32_t flag;
  int64_t deadline_ns;
  bool scrub;
};

// Bounded spin. Pauses first (a peer on another core answers within a few hundred ns), then
// yields the core on every retry so an oversubscribed job (more ranks than cores) still makes
// progress, and checks the deadline now and then. The spin count is per wait: a long call
// that waits briefly many times (a reader catching up with a writer) never degrades to
// yielding on every word.
class Spinner {
 public:
  Spinner(int64_t deadline_ns, int spin_before_yield)
      : deadline_ns_(deadline_ns), spin_before_yield_(spin_before_yield) {}
  inline bool again(int& spins) {
    if (++spins < spin_before_yield_) {
      CCL_CPU_RELAX();
      return true;
    }
    sched_yield();
    if ((spins & 31) == 0 && now_ns() > deadline_ns_) return false;
    return true;
  }

 private:
  int64_t deadline_ns_;
  int spin_before_yield_;
};

namespace {

inline bool wait_word(const LL8Packet* p, uint32_t flag, Spinner& s, uint32_t* data) {
  uint64_t w = p->load();
  int spins = 0;
  while (LL8Packet::flag_of(w) != flag) {
    if (!s.again(spins)) return false;
    w = p->load();
  }
  *data = LL8Packet::data_of(w);
  return true;
}

// Push payload words [w0, w1) of `in` to dst[0 .. w1-w0).
inline void push_words(LL8Packet* dst, const uint8_t* in, size_t nbytes, int64_t w0, int64_t w1,
                       uint32_t flag) {
  const int64_t full_end = std::min<int64_t>(w1, static_cast<int64_t>(nbytes / 4));
  int64_t w = w0;
  for (; w < full_end; ++w) {
    uint32_t d;
    std::memcpy(&d, in + 4 * w, 4);
    dst[w - w0].store(d, flag);
  }
  for (; w < w1; ++w) dst[w - w0].store(raw_word(in, nbytes, w), flag);
}

inline void push_tail(LL8Packet* slot, size_t from, size_t to, uint32_t flag) {
  for (size_t w = from; w < to; ++w) slot[w].store(0, flag);
}

// Adds (or, for the first source, assigns) source words [w0, w1) into acc[0 ..).
// `words` is the source's packets, indexed from w0.
inline bool accumulate_packets(const LL8Packet* words, int64_t w0, int64_t w1, int64_t n,
                               DType dt, uint32_t flag, bool first, float* acc, Spinner& s) {
  const int epw = elems_per_word(dt);
  // Wait for the chunk's last word first: the writer fills words in order, so the reader
  // then walks lines the writer has left instead of chasing it line by line.
  uint32_t d;
  if (w1 > w0 && !wait_word(words + (w1 - 1 - w0), flag, s, &d)) return false;
  for (int64_t w = w0; w < w1; ++w) {
    if (!wait_word(words + (w - w0), flag, s, &d)) return false;
    for (int j = 0; j < epw; ++j) {
      int64_t e = w * epw + j;
      if (e >= n) break;
      float v = word_elem(d, j, dt);
      float* a = acc + (e - w0 * epw);
      *a = first ? v : *a + v;
    }
  }
  return true;
}

// o[i] = a[i] + b[i] (fp32). o may be a or b (in place: each vector is loaded before the
// store to the same indices). Most of a bulk reduce is this loop reading the peer's data, which
// another core has just written: every line is a cross-core miss, and the build's baseline
// (SSE2) needs four loads per line, so fewer lines are in flight than with 32-byte loads. The
// AVX2 body is picked at run time (alone it measured 0-10% on the 2-core CI VM, within noise
// at some sizes; it is the body of the one-pass reduce below). Results do not depend on the
// body: each element is one IEEE add either way.
#if defined(__x86_64__) && defined(__GNUC__)
// The 2-rank fp32 loops below read the peer's bytes, which sit modified in the other core's
// cache: every line is a cross-core transfer (~200 ns on the CI VM). Each iteration prefetches
// both sources kPrefetchLines lines ahead, so transfers start before the loop's loads reach
// them (the loads of the fused loop wait behind its adds and stores). 16 lines measured best
// on the 2-core CI VM (8 and 32 slower; 16 KB all-reduce -1..3%, 64 KB -6%, fused 1x4096 -4%);
// a burst prefetch of a whole published 16 KB chunk was 7% slower than none. Past the end of
// a chunk or of the payload the hints touch lines not yet (or never) written: a prefetch
// never faults and coherence refreshes the line when the writer stores, so only time is at
// stake, never data.
constexpr int64_t kPrefetchLines = 16;
inline const char* lines_ahead(const float* p) {  // integer arithmetic: may pass the end
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + 64 * kPrefetchLines);
}
inline void prefetch_ahead(const float* a, const float* b, int64_t i) {
  _mm_prefetch(lines_ahead(a + i), _MM_HINT_T0);
  _mm_prefetch(lines_ahead(b + i), _MM_HINT_T0);
}

__attribute__((target("avx2"))) void add_f32_avx2(const float* a, const float* b, float* o,
                                                  int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead(a, b, i);
    prefetch_ahead(a, b, i + 16);
    __m256 a0 = _mm256_loadu_ps(a + i), a1 = _mm256_loadu_ps(a + i + 8);
    __m256 a2 = _mm256_loadu_ps(a + i + 16), a3 = _mm256_loadu_ps(a + i + 24);
    __m256 b0 = _mm256_loadu_ps(b + i), b1 = _mm256_loadu_ps(b + i + 8);
    __m256 b2 = _mm256_loadu_ps(b + i + 16), b3 = _mm256_loadu_ps(b + i + 24);
    _mm256_storeu_ps(o + i, _mm256_add_ps(a0, b0));
    _mm256_storeu_ps(o + i + 8, _mm256_add_ps(a1, b1));
    _mm256_storeu_ps(o + i + 16, _mm256_add_ps(a2, b2));
    _mm256_storeu_ps(o + i + 24, _mm256_add_ps(a3, b3));
  }
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) o[i] = a[i] + b[i];
}
const bool kHaveAvx2 = [] {
  __builtin_cpu_init();  // static initialisers may run before libgcc's own
  return __builtin_cpu_supports("avx2") != 0;
}();
const bool kHaveAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}();
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// Fused 2-rank fp32 add_rms_norm body, per 16-element group: r = (x0 + x1) [+ res], stored to
// ro, and part[l] += r[l]^2 for lanes l = 0..15 (part[0..7] and part[8..15] are the two
// vectors). That is exactly the order of epilogue.cpp's sum_squares (16 lanes, element j of a
// row into lane j % 16, in increasing j), so the bits are the same. n is a multiple of 16.
__attribute__((target("avx2"))) void add_res_sumsq_f32_avx2(const float* x0, const float* x1,
                                                            const float* res, float* ro,
                                                            int64_t n, float* part) {
  __m256 p0 = _mm256_loadu_ps(part), p1 = _mm256_loadu_ps(part + 8);
  if (res != nullptr) {
    for (int64_t i = 0; i < n; i += 16) {
      prefetch_ahead(x0, x1, i);
      __m256 r0 = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x0 + i), _mm256_loadu_ps(x1 + i)),
                                _mm256_loadu_ps(res + i));
      __m256 r1 = _mm256_add_ps(
          _mm256_add_ps(_mm256_loadu_ps(x0 + i + 8), _mm256_loadu_ps(x1 + i + 8)),
          _mm256_loadu_ps(res + i + 8));
      _mm256_storeu_ps(ro + i, r0);
      _mm256_storeu_ps(ro + i + 8, r1);
      p0 = _mm256_add_ps(p0, _mm256_mul_ps(r0, r0));
      p1 = _mm256_add_ps(p1, _mm256_mul_ps(r1, r1));
    }
  } else {
    for (int64_t i = 0; i < n; i += 16) {
      prefetch_ahead(x0, x1, i);
      __m256 r0 = _mm256_add_ps(_mm256_loadu_ps(x0 + i), _mm256_loadu_ps(x1 + i));
      __m256 r1 = _mm256_add_ps(_mm256_loadu_ps(x0 + i + 8), _mm256_loadu_ps(x1 + i + 8));
      _mm256_storeu_ps(ro + i, r0);
      _mm256_storeu_ps(ro + i + 8, r1);
      p0 = _mm256_add_ps(p0, _mm256_mul_ps(r0, r0));
      p1 = _mm256_add_ps(p1, _mm256_mul_ps(r1, r1));
    }
  }
  _mm256_storeu_ps(part, p0);
  _mm256_storeu_ps(part + 8, p1);
}

// add_res_sumsq_f32_avx2 with the 16 lanes in one 64-byte vector: the same lane of every
// element, the same adds in the same order, so the same bits. With scale_row_f32_avx512 it
// measured 3% (1x4096) to 11% (1x8192) faster than the AVX2 bodies on the 2-core CI VM; the
// plain all-reduce add did not gain from 64-byte vectors (0 to 7% slower), so it stays AVX2.
__attribute__((target("avx512f"))) void add_res_sumsq_f32_avx512(const float* x0,
                                                                const float* x1,
                                                                const float* res, float* ro,
                                                                int64_t n, float* part) {
  __m512 p = _mm512_loadu_ps(part);
  if (res != nullptr) {
    for (int64_t i = 0; i < n; i += 16) {
      prefetch_ahead(x0, x1, i);
      __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(x0 + i), _mm512_loadu_ps(x1 + i)),
                               _mm512_loadu_ps(res + i));
      _mm512_storeu_ps(ro + i, r);
      p = _mm512_add_ps(p, _mm512_mul_ps(r, r));
    }
  } else {
    for (int64_t i = 0; i < n; i += 16) {
      prefetch_ahead(x0, x1, i);
      __m512 r = _mm512_add_ps(_mm512_loadu_ps(x0 + i), _mm512_loadu_ps(x1 + i));
      _mm512_storeu_ps(ro + i, r);
      p = _mm512_add_ps(p, _mm512_mul_ps(r, r));
    }
  }
  _mm512_storeu_ps(part, p);
}

// out[j] = (r[j] * inv) * (w[j] + offset), as epilogue.cpp's add_rms_norm_rows (fp32).
__attribute__((target("avx512f"))) void scale_row_f32_avx512(const float* r, const float* w,
                                                            float* out, int64_t n, float inv,
                                                            float offset) {
  const __m512 vi = _mm512_set1_ps(inv), vo = _mm512_set1_ps(offset);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(r + j), vi),
                                            _mm512_add_ps(_mm512_loadu_ps(w + j), vo)));
  for (; j < n; ++j) out[j] = (r[j] * inv) * (w[j] + offset);
}

// out[j] = (r[j] * inv) * (w[j] + offset), as epilogue.cpp's add_rms_norm_rows (fp32).
__attribute__((target("avx2"))) void scale_row_f32_avx2(const float* r, const float* w,
                                                        float* out, int64_t n, float inv,
                                                        float offset) {
  const __m256 vi = _mm256_set1_ps(inv), vo = _mm256_set1_ps(offset);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 a0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + j), vi),
                              _mm256_add_ps(_mm256_loadu_ps(w + j), vo));
    __m256 a1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + j + 8), vi),
                              _mm256_add_ps(_mm256_loadu_ps(w + j + 8), vo));
    _mm256_storeu_ps(out + j, a0);
    _mm256_storeu_ps(out + j + 8, a1);
  }
  for (; j < n; ++j) out[j] = (r[j] * inv) * (w[j] + offset);
}
#endif

inline void add_f32(const float* a, const float* b, float* o, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHaveAvx2) return add_f32_avx2(a, b, o, n);
#endif
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] + b[i];
}

// Copies a bulk chunk into a peer's slot. The destination lines were last read by that peer,
// so each store first has to take the line back from its cache. `rep movsb` (ERMS/FSRM) does
// whole-line stores without reading the old line, and measured ~10-25% faster than memcpy for
// 8-32 KB payloads on the 2-core CI VM, but ~5% slower at 64 KB: used up to kRepMovsbMaxBytes.
constexpr size_t kRepMovsbMaxBytes = 32 * 1024;
inline void copy_chunk(uint8_t* dst, const uint8_t* src, size_t len, bool rep_movsb) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (rep_movsb) {
    asm volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(len) : : "memory");
    return;
  }
#endif
  std::memcpy(dst, src, len);
}

// acc[i] (+)= element i of a raw buffer, for i < count. Specialised per dtype so the
// compiler vectorises the loops.
inline void accumulate_raw(const uint8_t* src, int64_t count, DType dt, bool first,
                           float* __restrict acc) {
  switch (dt) {
    case DType::kFloat32: {
      const float* f = reinterpret_cast<const float*>(src);
      if (first) {
        std::memcpy(acc, f, 4 * count);
      } else {
        add_f32(acc, f, acc, count);
      }
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
      if (first) {
        for (int64_t i = 0; i < count; ++i) acc[i] = bf16_to_f32(h[i]);
      } else {
        for (int64_t i = 0; i < count; ++i) acc[i] += bf16_to_f32(h[i]);
      }
      break;
    }
    default: {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
      if (first) {
        for (int64_t i = 0; i < count; ++i) acc[i] = f16_to_f32(h[i]);
      } else {
        for (int64_t i = 0; i < count; ++i) acc[i] += f16_to_f32(h[i]);
      }
      break;
    }
  }
}

// Bulk protocol: raw bytes of payload words [w0, w1) go to the slot's data area (offset
// relative to base_w), then one release-stored flag per bulk_chunk_words(w1 - w0) publishes
// them. A reader of the slot derives the same chunk from the same slot size.
inline void push_bulk(LL8Packet* slot, const MailboxLayout& L, const uint8_t* in, size_t nbytes,
                      int64_t w0, int64_t w1, int64_t base_w, uint32_t flag) {
  uint8_t* data = MailboxLayout::bulk_data(slot, L.data_offset);
  const bool rep_movsb =
      std::min(nbytes, static_cast<size_t>(w1) * 4) - static_cast<size_t>(w0) * 4 <=
      kRepMovsbMaxBytes;
  const int64_t chunk = bulk_chunk_words(w1 - w0);
  for (int64_t cw0 = w0; cw0 < w1; cw0 += chunk) {
    int64_t cw1 = std::min<int64_t>(w1, cw0 + chunk);
    size_t off = static_cast<size_t>(cw0) * 4;
    size_t len = std::min(nbytes, static_cast<size_t>(cw1) * 4) - off;
    copy_chunk(data + off - static_cast<size_t>(base_w) * 4, in + off, len, rep_movsb);
    slot[L.flags_offset + (cw0 - base_w) / chunk].store_release(0, flag);
  }
}

// Bulk protocol, reader side: waits until the flag of chunk k (payload words [k * chunk,
// (k + 1) * chunk) from the slot's first word, chunk = bulk_chunk_words(slot words), as the
// writer's push_bulk) carries the call's flag. The flag was release-stored after the chunk's
// bytes and is loaded with acquire, so the bytes are visible once it matches.
inline bool wait_bulk_chunk(const LL8Packet* slot, const MailboxLayout& L, int64_t k,
                            uint32_t flag, Spinner& s) {
  uint32_t d;
  return wait_word(slot + L.flags_offset + k, flag, s, &d);
}

}  // namespace

HostMailbox::HostMailbox(int rank, int world, std::vector<uintptr_t> bases,
                         size_t capacity_bytes, double timeout_s)
    : rank_(rank), world_(world), layout_(MailboxLayout::make(world, capacity_bytes)) {
  if (world < 1 || world > kMaxWorld) throw std::invalid_argument("world size out of range");
  if (rank < 0 || rank >= world) throw std::invalid_argument("rank out of range");
  if (static_cast<int>(bases.size()) != world)
    throw std::invalid_argument("need one region base per rank");
  for (uintptr_t b : bases) bases_.push_back(reinterpret_cast<uint8_t*>(b));
  ctrl_ = reinterpret_cast<ControlBlock*>(bases_[rank_]);
  set_timeout(timeout_s);
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  // With more ranks than cores a spinning rank steals the core its peer needs: yield at once.
  // ~256 pauses is a few microseconds: long enough for a peer that is running, short enough
  // that a descheduled peer (a busy machine) gets the core back quickly.
  spin_before_yield_ = (cores > 0 && world <= cores) ? 256 : 8;
  set_ll_max_bytes(kDefaultLLMaxBytes);
}

void HostMailbox::set_ll_max_bytes(size_t bytes) {
  ll_max_bytes_ = std::min({bytes, kLLAreaBytes, layout_.capacity_bytes});
}

uint64_t HostMailbox::seq() const { return __atomic_load_n(&ctrl_->seq, __ATOMIC_RELAXED); }

void HostMailbox::set_seq(uint64_t seq) { __atomic_store_n(&ctrl_->seq, seq, __ATOMIC_RELAXED); }

HostMailbox::Call HostMailbox::begin_call() {
  Call c;
  c.seq = seq() + 1;
  set_seq(c.seq);
  // Slots alternate between two phases by seq parity. Reuse is safe: we write a phase-p slot
  // again at call seq + 2 only after call seq + 1 received every peer's push, and a peer
  // pushes call seq + 1 only after it finished reading call seq (of phase p).
  c.phase = static_cast<int>(c.seq & 1);
  c.flag = static_cast<uint32_t>(c.seq);
  c.deadline_ns = now_ns() + timeout_ns_;
  c.scrub = (c.seq & kScrubPeriodMask) < 2;
  err_ = LastError{};
  return c;
}

float* HostMailbox::scratch(size_t n) {
  if (scratch_.size() < n) scratch_.resize(n);
  return scratch_.data();
}

int HostMailbox::timeout_error(const Call& c, int waiting_on) {
  uint64_t mask = 0;
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    const LL8Packet* hdr = layout_.hop1_slot(bases_[rank_], c.phase, r);
    if (LL8Packet::flag_of(hdr->load()) != c.flag) mask |= 1ull << r;
  }
  if (waiting_on >= 0) mask |= 1ull << waiting_on;
  err_.code = kTimeout;
  err_.missing_mask = mask;
  err_.message = "timed out waiting for peers";
  __atomic_store_n(&ctrl_->status, static_cast<uint64_t>(kTimeout), __ATOMIC_RELAXED);
  return kTimeout;
}

int HostMailbox::exchange_headers(const Call& c, const OpHeader& hdr) {
  Spinner s(c.deadline_ns, spin_before_yield_);
  for (int i = 1; i < world_; ++i) {
    int r = (rank_ + i) % world_;
    const LL8Packet* slot = layout_.hop1_slot(bases_[rank_], c.phase, r);
    OpHeader theirs{};
    for (int k = 0; k < kHeaderWords; ++k) {
      uint32_t d;
      if (!wait_word(slot + k, c.flag, s, &d)) return timeout_error(c, r);
      theirs.set_word(k, d);
    }
    if (theirs != hdr && err_.code == kOk) {
      err_.code = kMismatch;
      err_.mismatch_rank = r;
      err_.mine = hdr;
      err_.theirs = theirs;
    }
  }
  return err_.code;
}

static void push_header(LL8Packet* slot, const OpHeader& hdr, uint32_t flag) {
  for (int k = 0; k < kHeaderWords; ++k) slot[k].store(hdr.word(k), flag);
}

namespace {
struct ShardPlan {
  int64_t words;        // payload words in total
  int64_t shard_words;  // words per shard (the last shards may be shorter or empty)
  int64_t begin(int i) const { return std::min<int64_t>(words, i * shard_words); }
  int64_t end(int i) const { return std::min<int64_t>(words, (i + 1) * shard_words); }
};
inline ShardPlan plan_shards(size_t nbytes, int world) {
  ShardPlan p;
  p.words = static_cast<int64_t>((nbytes + 3) / 4);
  p.shard_words = static_cast<int64_t>(round_up((p.words + world - 1) / world, 8));
  return p;
}
}  // namespace

// Pushes the header and this rank's payload: the whole payload to every peer (one-shot) or
// shard i to its owner i (two-shot). Peers are visited starting after our own rank so that
// all ranks do not hammer rank 0 first.
void HostMailbox::push_payload(const Call& c, const OpHeader& hdr, const uint8_t* in,
                               int64_t numel, DType dt, Algo algo) {
  const size_t nbytes = static_cast<size_t>(numel) * dtype_size(dt);
  const ShardPlan plan = plan_shards(nbytes, world_);
  const bool bulk = nbytes > ll_max_bytes_;
  for (int i = 1; i < world_; ++i) {
    int p = (rank_ + i) % world_;
    LL8Packet* slot = layout_.hop1_slot(bases_[p], c.phase, rank_);
    push_header(slot, hdr, c.flag);
    int64_t w0 = 0, w1 = 0;
    if (in != nullptr) {
      w0 = algo == Algo::kOneShot ? 0 : plan.begin(p);
      w1 = algo == Algo::kOneShot ? plan.words : plan.end(p);
      if (bulk) {
        push_bulk(slot, layout_, in, nbytes, w0, w1, w0, c.flag);
      } else {
        push_words(slot + layout_.ll_offset, in, nbytes, w0, w1, c.flag);
      }
    }
    if (c.scrub) {
      // Unused words get flag-2: recent enough to keep every flag within 2^31 calls, and
      // never the current flag, so a reader that expects more words than were sent (or
      // another protocol) waits and times out instead of reading zeros as data.
      const uint32_t stale = c.flag - 2;
      const size_t ll_used = bulk ? 0 : static_cast<size_t>(w1 - w0);
      const int64_t chunk = bulk_chunk_words(w1 - w0);
      const size_t flags_used = bulk ? static_cast<size_t>((w1 - w0 + chunk - 1) / chunk) : 0;
      push_tail(slot + layout_.ll_offset, ll_used, layout_.ll_words, stale);
      push_tail(slot + layout_.flags_offset, flags_used, layout_.flag_words, stale);
      // Two-shot owners overwrite the used part of hop 2 with the current flag later; doing
      // the whole slot here keeps the scrub even when the call ends early (mismatch).
      push_tail(layout_.hop2_slot(bases_[p], c.phase, rank_), 0, layout_.hop2_words, stale);
    }
  }
}

template <typename Sink>
int HostMailbox::reduce(const Call& c, const OpHeader& hdr, const uint8_t* in, int64_t n,
                        DType dt, Algo algo, Sink&& sink, float* direct) {
  push_payload(c, hdr, in, n, dt, algo);
  if (int st = exchange_headers(c, hdr); st != kOk) return st;

  Spinner s(c.deadline_ns, spin_before_yield_);
  const int epw = elems_per_word(dt);
  const size_t esize = dtype_size(dt);
  const size_t nbytes = static_cast<size_t>(n) * esize;
  alignas(64) float acc[kChunkWords * 2];
  uint8_t* mine = bases_[rank_];

  const bool bulk = nbytes > ll_max_bytes_;
  // Reduces payload words [w0, w1) whose hop-1 data sits at slot offset (w - base_w).
  auto reduce_words = [&](int64_t w0, int64_t w1, int64_t base_w, auto&& chunk_sink) -> int {
    const int64_t chunk = bulk_chunk_words(w1 - base_w);  // the slot holds [base_w, w1)
    for (int64_t cw0 = w0; cw0 < w1; cw0 += kChunkWords) {
      int64_t cw1 = std::min<int64_t>(w1, cw0 + static_cast<int64_t>(kChunkWords));
      int64_t e0 = cw0 * epw, e1 = std::min<int64_t>(n, cw1 * epw);
      for (int r = 0; r < world_; ++r) {
        if (r == rank_) {
          accumulate_raw(in + e0 * esize, e1 - e0, dt, r == 0, acc);
          continue;
        }
        LL8Packet* slot = layout_.hop1_slot(mine, c.phase, r);
        if (bulk) {
          // A hit on the same flag for every step of a flag chunk but the first.
          if (!wait_bulk_chunk(slot, layout_, (cw0 - base_w) / chunk, c.flag, s))
            return timeout_error(c, r);
          const uint8_t* data = MailboxLayout::bulk_data(slot, layout_.data_offset);
          accumulate_raw(data + (cw0 - base_w) * 4, e1 - e0, dt, r == 0, acc);
        } else {
          const LL8Packet* src = slot + layout_.ll_offset + (cw0 - base_w);
          if (!accumulate_packets(src, cw0, cw1, n, dt, c.flag, r == 0, acc, s))
            return timeout_error(c, r);
        }
      }
      chunk_sink(e0, e1, acc);
    }
    return kOk;
  };

  const ShardPlan plan = plan_shards(nbytes, world_);
  if (direct != nullptr && bulk && world_ == 2 && dt == DType::kFloat32 &&
      algo == Algo::kOneShot) {
    // Two fp32 sources: one pass, x0 + x1 straight into the destination, instead of copying
    // the first source to acc, adding the second and copying acc out (sink). Same adds in the
    // same order (rank 0's value first), so the same bits.
    const int peer = 1 - rank_;
    LL8Packet* slot = layout_.hop1_slot(mine, c.phase, peer);
    const float* theirs =
        reinterpret_cast<const float*>(MailboxLayout::bulk_data(slot, layout_.data_offset));
    const float* ours = reinterpret_cast<const float*>(in);
    const float* x0 = rank_ == 0 ? ours : theirs;
    const float* x1 = rank_ == 0 ? theirs : ours;
    const int64_t chunk = bulk_chunk_words(plan.words);
    for (int64_t cw0 = 0; cw0 < plan.words; cw0 += chunk) {
      const int64_t cw1 = std::min<int64_t>(plan.words, cw0 + chunk);
      if (!wait_bulk_chunk(slot, layout_, cw0 / chunk, c.flag, s))
        return timeout_error(c, peer);
      add_f32(x0 + cw0, x1 + cw0, direct + cw0, cw1 - cw0);
    }
    return kOk;
  }
  if (algo == Algo::kOneShot || world_ == 1) return reduce_words(0, plan.words, 0, sink);

  // Two-shot. Hop 1 delivered shard `rank_` of every source to us: reduce it, push the fp32
  // sums to every peer (hop 2), and hand them to the sink.
  const int64_t mw0 = plan.begin(rank_), mw1 = plan.end(rank_);
  const int64_t me0 = mw0 * epw;
  auto push_and_sink = [&](int64_t e0, int64_t e1, const float* a) {
    for (int i = 1; i < world_; ++i) {
      int p = (rank_ + i) % world_;
      LL8Packet* dst = layout_.hop2_slot(bases_[p], c.phase, rank_) + (e0 - me0);
      for (int64_t e = e0; e < e1; ++e) dst[e - e0].store(float_bits(a[e - e0]), c.flag);
    }
    sink(e0, e1, a);
  };
  if (int st = reduce_words(mw0, mw1, mw0, push_and_sink); st != kOk) return st;
  // Gather the other owners' reduced shards (fp32, one per packet).
  for (int i = 1; i < world_; ++i) {
    int owner = (rank_ + i) % world_;
    const int64_t oe0 = plan.begin(owner) * epw;
    const int64_t oe1 = std::min<int64_t>(n, plan.end(owner) * epw);
    const LL8Packet* src = layout_.hop2_slot(mine, c.phase, owner);
    for (int64_t e0 = oe0; e0 < oe1; e0 += kChunkWords) {
      int64_t e1 = std::min<int64_t>(oe1, e0 + static_cast<int64_t>(kChunkWords));
      for (int64_t e = e0; e < e1; ++e) {
        uint32_t d;
        if (!wait_word(src + (e - oe0), c.flag, s, &d)) return timeout_error(c, owner);
        acc[e - e0] = bits_to_f32(d);
      }
      sink(e0, e1, acc);
    }
  }
  return kOk;
}

uint8_t HostMailbox::call_flags(int64_t numel, DType dt, int algo, int op_flags) const {
  const size_t nbytes = static_cast<size_t>(numel) * dtype_size(dt);
  return static_cast<uint8_t>((op_flags & (kHdrOpMask | kHdrResidual | kHdrGemma)) |
                              (algo == static_cast<int>(Algo::kTwoShot) ? kHdrTwoShot : 0) |
                              (nbytes > ll_max_bytes_ ? kHdrBulk : 0));
}

namespace {
OpHeader make_header(OpCode op, DType dt, uint8_t flags, int64_t numel, uint32_t cols,
                     float eps) {
  OpHeader h;
  h.op_dtype_flags = (static_cast<uint32_t>(op) << 24) | (static_cast<uint32_t>(dt) << 16) |
                     static_cast<uint32_t>(flags);
  h.numel = static_cast<uint32_t>(numel);
  h.cols = cols;
  h.eps_bits = float_bits(eps);
  return h;
}
}  // namespace

int HostMailbox::all_reduce(uintptr_t in_p, uintptr_t out_p, int64_t numel, int dtype,
                            int algo, int op_flags) {
  const DType dt = static_cast<DType>(dtype);
  Call c = begin_call();
  const OpHeader hdr =
      make_header(OpCode::kAllReduce, dt, call_flags(numel, dt, algo, op_flags), numel, 0, 0.0f);
  const uint8_t* in = reinterpret_cast<const uint8_t*>(in_p);
  uint8_t* out = reinterpret_cast<uint8_t*>(out_p);
  return reduce(
      c, hdr, in, numel, dt, static_cast<Algo>(algo),
      [&](int64_t e0, int64_t e1, const float* a) {
        store_from_fp32(dt, a, out + e0 * dtype_size(dt), e1 - e0);
      },
      dt == DType::kFloat32 ? reinterpret_cast<float*>(out) : nullptr);
}

int HostMailbox::add_rms_norm(uintptr_t x_p, uintptr_t residual_p, uintptr_t weight_p,
                              uintptr_t out_p, uintptr_t residual_out_p, int64_t rows,
                              int64_t cols, int dtype, float eps, bool gemma, int algo) {
  const DType dt = static_cast<DType>(dtype);
  const int64_t n = rows * cols;
  Call c = begin_call();
  const uint8_t flags =
      call_flags(n, dt, algo, (residual_p ? kHdrResidual : 0) | (gemma ? kHdrGemma : 0));
  const OpHeader hdr =
      make_header(OpCode::kAddRmsNorm, dt, flags, n, static_cast<uint32_t>(cols), eps);
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHaveAvx2 && world_ == 2 && dt == DType::kFloat32 &&
      algo == static_cast<int>(Algo::kOneShot) && (flags & kHdrBulk) && residual_out_p != 0 &&
      cols % 16 == 0 && rows > 0)
    return add_rms_norm_2rank_f32(c, hdr, reinterpret_cast<const float*>(x_p),
                                  reinterpret_cast<const float*>(residual_p),
                                  reinterpret_cast<const float*>(weight_p),
                                  reinterpret_cast<float*>(out_p),
                                  reinterpret_cast<float*>(residual_out_p), rows, cols, eps,
                                  gemma ? 1.0f : 0.0f);
#endif
  float* sums = scratch(static_cast<size_t>(n));
  int st = reduce(
      c, hdr, reinterpret_cast<const uint8_t*>(x_p), n, dt, static_cast<Algo>(algo),
      [&](int64_t e0, int64_t e1, const float* a) { std::memcpy(sums + e0, a, 4 * (e1 - e0)); },
      sums);
  if (st != kOk) return st;

  add_rms_norm_rows(dt, sums, reinterpret_cast<const void*>(residual_p),
                    reinterpret_cast<const void*>(weight_p), reinterpret_cast<void*>(out_p),
                    reinterpret_cast<void*>(residual_out_p), rows, cols, eps,
                    gemma ? 1.0f : 0.0f);
  return kOk;
}

#if defined(__x86_64__) && defined(__GNUC__)
// 2 ranks, fp32, one-shot bulk: one pass over the peer's chunks computes r = (x0 + x1) [+ res]
// straight into residual_out and accumulates the row's sum of squares in registers (no fp32
// scratch round trip), then a second pass over residual_out (fp32: exactly r) normalises a
// row as soon as it is complete. Same adds, same lane order, same formula as reduce() +
// add_rms_norm_rows, so the same bits. Needs cols % 16 == 0 (chunks split rows on 16-lane
// groups).
int HostMailbox::add_rms_norm_2rank_f32(const Call& c, const OpHeader& hdr, const float* x,
                                        const float* res, const float* w, float* out,
                                        float* ro, int64_t rows, int64_t cols, float eps,
                                        float offset) {
  const int64_t n = rows * cols;
  push_payload(c, hdr, reinterpret_cast<const uint8_t*>(x), n, DType::kFloat32,
               Algo::kOneShot);
  if (int st = exchange_headers(c, hdr); st != kOk) return st;
  Spinner s(c.deadline_ns, spin_before_yield_);
  const int peer = 1 - rank_;
  LL8Packet* slot = layout_.hop1_slot(bases_[rank_], c.phase, peer);
  const float* theirs =
      reinterpret_cast<const float*>(MailboxLayout::bulk_data(slot, layout_.data_offset));
  const float* x0 = rank_ == 0 ? x : theirs;
  const float* x1 = rank_ == 0 ? theirs : x;
  alignas(64) float part[16] = {};
  int64_t row = 0, row_end = cols;
  const auto add_res_sumsq = kHaveAvx512 ? add_res_sumsq_f32_avx512 : add_res_sumsq_f32_avx2;
  const auto scale_row = kHaveAvx512 ? scale_row_f32_avx512 : scale_row_f32_avx2;
  const int64_t chunk = bulk_chunk_words(n);  // one fp32 element per payload word
  for (int64_t e0 = 0; e0 < n; e0 += chunk) {
    const int64_t e1 = std::min<int64_t>(n, e0 + chunk);
    if (!wait_bulk_chunk(slot, layout_, e0 / chunk, c.flag, s))
      return timeout_error(c, peer);
    for (int64_t a = e0; a < e1;) {
      const int64_t b = std::min(e1, row_end);
      add_res_sumsq(x0 + a, x1 + a, res ? res + a : nullptr, ro + a, b - a, part);
      a = b;
      if (a == row_end) {
        for (int wd = 8; wd > 0; wd /= 2)
          for (int l = 0; l < wd; ++l) part[l] += part[l + wd];
        const float inv = 1.0f / std::sqrt(part[0] / static_cast<float>(cols) + eps);
        const int64_t base = row * cols;
        scale_row(ro + base, w, out + base, cols, inv, offset);
        std::memset(part, 0, sizeof(part));
        ++row;
        row_end += cols;
      }
    }
  }
  return kOk;
}
#endif

int HostMailbox::qk_rms_norm(uintptr_t q_p, int64_t q_stride, uintptr_t k_p, int64_t k_stride,
                             uintptr_t q_weight_p, uintptr_t k_weight_p, uintptr_t q_out_p,
                             uintptr_t k_out_p, int64_t q_out_stride, int64_t k_out_stride,
                             int64_t rows, int64_t q_cols, int64_t k_cols, int dtype, float eps) {
  const DType dt = static_cast<DType>(dtype);
  // Local sums of squares, [rows, 2] fp32: the only thing that crosses ranks.
  float* partial = scratch(static_cast<size_t>(rows) * 4);
  float* sums = partial + 2 * rows;
  sum_squares_rows(dt, reinterpret_cast<const void*>(q_p), q_stride, rows, q_cols, partial, 0);
  sum_squares_rows(dt, reinterpret_cast<const void*>(k_p), k_stride, rows, k_cols, partial, 1);
  Call c = begin_call();
  const uint32_t cols = (static_cast<uint32_t>(q_cols & 0xffff) << 16) |
                        static_cast<uint32_t>(k_cols & 0xffff);
  const OpHeader hdr = make_header(OpCode::kQkRmsNorm, dt,
                                   call_flags(2 * rows, DType::kFloat32, 0, 0), rows, cols, eps);
  int st = reduce(c, hdr, reinterpret_cast<const uint8_t*>(partial), 2 * rows, DType::kFloat32,
                  Algo::kOneShot, [&](int64_t e0, int64_t e1, const float* a) {
                    std::memcpy(sums + e0, a, 4 * (e1 - e0));
                  });
  if (st != kOk) return st;

  // Full dimension = local dimension x world: every rank holds an equal shard.
  const float q_full = static_cast<float>(q_cols * world_);
  const float k_full = static_cast<float>(k_cols * world_);
  for (int64_t t = 0; t < rows; ++t) {
    sums[2 * t] = 1.0f / std::sqrt(sums[2 * t] / q_full + eps);
    sums[2 * t + 1] = 1.0f / std::sqrt(sums[2 * t + 1] / k_full + eps);
  }
  scale_rows(dt, reinterpret_cast<const void*>(q_p), q_stride, sums, 0,
             reinterpret_cast<const void*>(q_weight_p), reinterpret_cast<void*>(q_out_p),
             q_out_stride, rows, q_cols);
  scale_rows(dt, reinterpret_cast<const void*>(k_p), k_stride, sums, 1,
             reinterpret_cast<const void*>(k_weight_p), reinterpret_cast<void*>(k_out_p),
             k_out_stride, rows, k_cols);
  return kOk;
}

int HostMailbox::handshake(int op, int dtype, int64_t numel, int64_t cols, float eps,
                           int op_flags) {
  Call c = begin_call();
  const OpHeader hdr = make_header(static_cast<OpCode>(op), static_cast<DType>(dtype),
                                   static_cast<uint8_t>(kHdrDelegated | (op_flags & (kHdrOpMask | kHdrResidual | kHdrGemma))),
                                   numel, static_cast<uint32_t>(cols), eps);
  push_payload(c, hdr, nullptr, 0, DType::kFloat32, Algo::kOneShot);
  return exchange_headers(c, hdr);
}

}  // namespace ccl
