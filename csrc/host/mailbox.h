// CPU mailbox collectives over the host transport (DESIGN.md §3, §4).
//
// One HostMailbox per rank per communicator. It knows every rank's mapped region (its own
// and its peers'), and implements the ops as push-only exchanges of LL8 packets:
//   one-shot : push header + whole payload into every peer's hop-1 slot, reduce locally
//   two-shot : push shard i to its owner (hop 1), the owner reduces it in fp32 and pushes the
//              fp32 sums to every rank (hop 2)
// Both produce the same fp32 sums (sources added in rank order 0..N-1), so the result does not
// depend on the algorithm and is bitwise identical on every rank.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "host/layout.h"

namespace ccl {

enum class DType : uint8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class OpCode : uint8_t {
  kAllReduce = 1,
  kAddRmsNorm = 2,
  kQkRmsNorm = 3,
  kHandshake = 4,  // header-only exchange before a call is delegated to the wrapped backend
};
enum class Algo : int { kOneShot = 0, kTwoShot = 1 };

// Default LL/bulk switch on the host (tuned on the 2-core CI machine class, 2 ranks: the bulk
// protocol was 11-35% faster from 96 B to 256 B, within noise at 64 B, and LL ~5% faster at
// 8-32 B, where one packet line carries the whole payload).
constexpr size_t kDefaultLLMaxBytes = 32;

// Header flag bits (the low byte of OpHeader::op_dtype_flags). Everything that makes ranks
// read the payload differently is in the header, so a disagreement is a CollectiveMismatch.
constexpr uint8_t kHdrResidual = 0x01;
constexpr uint8_t kHdrGemma = 0x02;
constexpr uint8_t kHdrOpMask = 0x0c;  // reduce op of all_reduce: 0 sum, 4 avg, 8 max, 12 min
constexpr uint8_t kHdrBulk = 0x20;
constexpr uint8_t kHdrTwoShot = 0x40;
constexpr uint8_t kHdrDelegated = 0x80;  // handshake before the wrapped backend runs the call

enum Status : int {
  kOk = 0,
  kTimeout = 1,
  kMismatch = 2,
  kBadArgument = 3,
};

struct LastError {
  int code = kOk;
  uint64_t missing_mask = 0;  // ranks that had not delivered when the wait expired
  int mismatch_rank = -1;     // first rank whose header differed from ours
  OpHeader mine{};
  OpHeader theirs{};
  std::string message;
};

class HostMailbox {
 public:
  // bases[r] is rank r's region mapped in this process (bases[rank] is our own).
  HostMailbox(int rank, int world, std::vector<uintptr_t> bases, size_t capacity_bytes,
              double timeout_s);

  // out may alias in. numel elements of dtype.
  // op_flags: kHdrOpMask bits (the reduce op the caller finishes with), so ranks that
  // disagree on SUM/AVG are caught.
  int all_reduce(uintptr_t in, uintptr_t out, int64_t numel, int dtype, int algo,
                 int op_flags = 0);
  // x, out: [rows, cols]; residual / residual_out may be 0 (no residual). weight: [cols].
  int add_rms_norm(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out,
                   uintptr_t residual_out, int64_t rows, int64_t cols, int dtype, float eps,
                   bool gemma, int algo);
  // q: [rows, q_cols] with row stride q_stride (elements), k likewise; outputs with their own
  // row strides (may alias q/k: each element is read before it is written).
  int qk_rms_norm(uintptr_t q, int64_t q_stride, uintptr_t k, int64_t k_stride,
                  uintptr_t q_weight, uintptr_t k_weight, uintptr_t q_out, uintptr_t k_out,
                  int64_t q_out_stride, int64_t k_out_stride, int64_t rows, int64_t q_cols, int64_t k_cols, int dtype, float eps);
  // Header-only exchange: proves every rank makes the same call before a fallback.
  int handshake(int op, int dtype, int64_t numel, int64_t cols, float eps, int op_flags = 0);

  const LastError& last_error() const { return err_; }
  uint64_t seq() const;
  // Test hook: start the next call at seq+1. Every rank must set the same value.
  void set_seq(uint64_t seq);
  void set_timeout(double timeout_s) { timeout_ns_ = static_cast<int64_t>(timeout_s * 1e9); }
  size_t capacity_bytes() const { return layout_.capacity_bytes; }
  int rank() const { return rank_; }
  int world() const { return world_; }
  // Payloads up to this size travel as LL packets, larger ones with the bulk protocol.
  // Every rank must use the same value.
  void set_ll_max_bytes(size_t bytes);
  size_t ll_max_bytes() const { return ll_max_bytes_; }
  // Spins between sched_yield calls; low when ranks outnumber cores.
  void set_spin_before_yield(int spins) { spin_before_yield_ = spins; }

  struct Call;  // per-call state: seq, phase, flag, deadline

 private:
  Call begin_call();
  int exchange_headers(const Call& c, const OpHeader& hdr);
  void push_payload(const Call& c, const OpHeader& hdr, const uint8_t* in, int64_t numel,
                    DType dt, Algo algo);
  // fp32 sums of every rank's payload (sources in rank order 0..N-1), handed to
  // sink(e0, e1, acc) chunk by chunk. Defined and instantiated in mailbox.cpp only.
  // direct: optional fp32 destination of all numel sums; where the call allows a one-pass
  // reduce (2 ranks, fp32, one-shot bulk) the sums are written there and sink is not called.
  template <typename Sink>
  int reduce(const Call& c, const OpHeader& hdr, const uint8_t* in, int64_t numel, DType dt,
             Algo algo, Sink&& sink, float* direct = nullptr);
  int timeout_error(const Call& c, int waiting_on);
  int add_rms_norm_2rank_f32(const Call& c, const OpHeader& hdr, const float* x,
                             const float* res, const float* w, float* out, float* ro,
                             int64_t rows, int64_t cols, float eps, float offset);
  uint8_t call_flags(int64_t numel, DType dt, int algo, int op_flags) const;
  float* scratch(size_t n);

  int rank_;
  int world_;
  std::vector<uint8_t*> bases_;
  MailboxLayout layout_;
  ControlBlock* ctrl_;
  int64_t timeout_ns_;
  int spin_before_yield_;
  size_t ll_max_bytes_ = 0;
  LastError err_;
  std::vector<float> scratch_;
};

}  // namespace ccl
