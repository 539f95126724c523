#include "host/gemv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "host/epilogue.h"

// Clones: AVX-512 (x86-64-v4), AVX2/F16C/FMA (x86-64-v3), baseline. The GEMV loops may use
// FMA (see the pragma below), so a rank's partial may round differently from one clone to
// another; that is harmless: each partial is computed once, by its rank, and sent as is, and
// the cross-rank sum and the epilogue (plain -ffp-contract=off code) are bitwise identical on
// every rank.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CCL_GEMV_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CCL_GEMV_MULTIVERSION
#endif
#define CCL_INLINE inline __attribute__((always_inline))
// The 64-byte vector helpers are always inlined: no vector crosses a call boundary, so the
// "AVX512F vector return changes the ABI" note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ccl {

LinearWeights LinearWeights::expert(int64_t e) const {
  LinearWeights r = *this;
  const size_t wsize = kind == WeightKind::kInt4 ? 4 : (dtype == DType::kFloat32 ? 4 : 2);
  const size_t ssize = dtype == DType::kFloat32 ? 4 : 2;
  r.w = static_cast<const uint8_t*>(w) + static_cast<size_t>(e * expert_stride_w) * wsize;
  if (scales != nullptr)
    r.scales =
        static_cast<const uint8_t*>(scales) + static_cast<size_t>(e * expert_stride_s) * ssize;
  return r;
}

namespace {

// 16 fp32 lanes (one zmm, two ymm or four xmm depending on the clone).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

constexpr int kRowBlock = 4;            // activation rows per register block

struct F32 {
  using T = float;
  static CCL_INLINE float load(T v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static CCL_INLINE float load(T h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
struct F16 {
  using T = _Float16;
  static CCL_INLINE float load(T h) { return static_cast<float>(h); }
};

CCL_INLINE v16f loadv(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
CCL_INLINE v16i loadvi(const int32_t* p) {
  v16i v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16 consecutive weights as fp32 lanes, straight into a register.
typedef uint16_t v16u16 __attribute__((vector_size(32)));
template <typename WIO>
CCL_INLINE v16f decode16(const typename WIO::T* p);
template <>
CCL_INLINE v16f decode16<F32>(const float* p) {
  return loadv(p);
}
template <>
CCL_INLINE v16f decode16<BF16>(const uint16_t* p) {
  v16u16 h;
  std::memcpy(&h, p, sizeof(h));
  v16i u = __builtin_convertvector(h, v16i) << 16;  // zero-extended, then the fp32 bits
  return reinterpret_cast<v16f&>(u);
}
// fp16 -> fp32 with integer operations (GCC scalarises a _Float16 vector conversion):
// exponent/mantissa shifted into place and rescaled by 2^112 (exact for normals and
// subnormals), sign OR-ed back, Inf/NaN given the all-ones exponent.
template <>
CCL_INLINE v16f decode16<F16>(const _Float16* p) {
  v16u16 h;
  std::memcpy(&h, p, sizeof(h));
  const v16i u = __builtin_convertvector(h, v16i);
  const v16i em = u & 0x7fff;
  v16i e13 = em << 13;
  v16f f = reinterpret_cast<v16f&>(e13) * 0x1p112f;
  v16i bits = reinterpret_cast<v16i&>(f) | ((u & 0x8000) << 16);
  bits = em >= 0x7c00 ? (bits | 0x7f800000) : bits;
  return reinterpret_cast<v16f&>(bits);
}

CCL_INLINE void storev(float* p, const v16f& v) { std::memcpy(p, &v, sizeof(v)); }

// The GEMV inner loops may contract a * b + c into FMA (on clones that have it). This only
// changes the rounding of a rank's own partial, which is computed once and sent as is: the
// cross-rank sum and everything after it stay bitwise identical on every rank.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// ---------------------------------------------------------------- [K, N] layouts
// "Row streaming": for each chunk of kChunkN output columns, 8 rows of W at a time are
// decoded to fp32 once (wbuf, in L1), then every activation row m accumulates
// acc[m, :] += sum_i x[m, k0 + i] * wbuf[i, :] with the 16-column accumulator held in a
// register across the 8 rows. W is read once, contiguously along N (no strided column
// strips: those cost a TLB miss per row), and acc ([M, kChunkN] fp32) stays in L1 / L2.
constexpr int kChunkN = 512;

// Dense rows k0 .. k0 + rows of W[:, n0 : n0 + nc] -> wbuf[i * kChunkN + j] (zero-padded
// to a multiple of 16 columns).
template <typename WIO>
CCL_INLINE void dense_rows8(const typename WIO::T* w, int64_t ldw, int64_t k0, int rows,
                            int64_t n0, int nc, float* wbuf) {
  for (int i = 0; i < rows; ++i) {
    const typename WIO::T* src = w + (k0 + i) * ldw + n0;
    float* dst = wbuf + i * kChunkN;
    int j = 0;
    for (; j + 16 <= nc; j += 16) storev(dst + j, decode16<WIO>(src + j));
    for (; j < nc; ++j) dst[j] = WIO::load(src[j]);
    for (; j % 16 != 0; ++j) dst[j] = 0.0f;
  }
}

// INT4: the packed row k0 / 8 gives rows k0 .. k0 + 7: (q - 8) * scale, exact in fp32.
CCL_INLINE void int4_rows8(const int32_t* qw, int64_t ldw, const float* sbuf, int64_t k0,
                           int64_t n0, int nc, float* wbuf) {
  const int32_t* q = qw + (k0 / 8) * ldw + n0;
  const v16i bias = v16i{} + static_cast<int32_t>(0x88888888u);
  int j = 0;
  alignas(64) int32_t tail[16];
  for (; j < nc; j += 16) {
    v16i qv;
    if (j + 16 <= nc) {
      qv = loadvi(q + j);
    } else {
      for (int l = 0; l < 16; ++l) tail[l] = j + l < nc ? q[j + l] : static_cast<int32_t>(0x88888888u);
      qv = loadvi(tail);
    }
    // nibble ^ 8 read as a signed 4-bit number is nibble - 8: two shifts per nibble.
    qv ^= bias;
    const v16f sv = loadv(sbuf + j);
    for (int i = 0; i < 8; ++i)
      storev(wbuf + i * kChunkN + j, __builtin_convertvector((qv << (28 - 4 * i)) >> 28, v16f) * sv);
  }
}

// acc[m, 0 : nc16] += sum_{i < ROWS} x[m, k0 + i] * wbuf[i, :] for MB rows m0 ..
template <int MB, int ROWS>
CCL_INLINE void fma_rows(const float* x, int64_t ldx, int64_t m0, int64_t k0, int rows,
                         const float* wbuf, int nc16, float* acc) {
  const int nr = ROWS > 0 ? ROWS : rows;
  float xs[MB][8];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < 8; ++i) xs[m][i] = i < nr ? x[(m0 + m) * ldx + k0 + i] : 0.0f;
  for (int j = 0; j < nc16; j += 16) {
    v16f av[MB];
    for (int m = 0; m < MB; ++m) av[m] = loadv(acc + (m0 + m) * kChunkN + j);
    for (int i = 0; i < (ROWS > 0 ? ROWS : nr); ++i) {
      const v16f wv = loadv(wbuf + i * kChunkN + j);
      for (int m = 0; m < MB; ++m) av[m] += xs[m][i] * wv;
    }
    for (int m = 0; m < MB; ++m) storev(acc + (m0 + m) * kChunkN + j, av[m]);
  }
}

template <int ROWS>
CCL_INLINE void fma_all_rows(const float* x, int64_t ldx, int64_t M, int64_t k0, int rows,
                             const float* wbuf, int nc16, float* acc) {
  int64_t m0 = 0;
  for (; m0 + kRowBlock <= M; m0 += kRowBlock)
    fma_rows<kRowBlock, ROWS>(x, ldx, m0, k0, rows, wbuf, nc16, acc);
  switch (M - m0) {
    case 3: fma_rows<3, ROWS>(x, ldx, m0, k0, rows, wbuf, nc16, acc); break;
    case 2: fma_rows<2, ROWS>(x, ldx, m0, k0, rows, wbuf, nc16, acc); break;
    case 1: fma_rows<1, ROWS>(x, ldx, m0, k0, rows, wbuf, nc16, acc); break;
    default: break;
  }
}

// Few activation rows (M <= kRowBlock): no reuse to win from a decoded buffer, so dense W is
// decoded straight into registers inside the accumulation loop (still row by row along N).
// wv8(k0) -> at; at(j, w) -> 8 vectors: rows k0 .. k0 + 7, columns n0 + j .. + 16.
template <int MB, typename Wv>
CCL_INLINE void kn_direct(const float* x, int64_t ldx, int64_t K, int64_t n0, int nv,
                          Wv&& wv8, float* acc) {
  for (int m = 0; m < MB; ++m) std::memset(acc + m * kChunkN, 0, sizeof(float) * 16 * nv);
  for (int64_t k0 = 0; k0 < K; k0 += 8) {
    float xs[MB][8];
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < 8; ++i) xs[m][i] = x[m * ldx + k0 + i];
    const auto at = wv8(k0);  // per-row-group pointers, computed once per 8 rows
    for (int j = 0; j < 16 * nv; j += 16) {
      v16f w[8];
      at(j, w);
      v16f av[MB];
      for (int m = 0; m < MB; ++m) av[m] = loadv(acc + m * kChunkN + j);
      for (int i = 0; i < 8; ++i)
        for (int m = 0; m < MB; ++m) av[m] += xs[m][i] * w[i];
      for (int m = 0; m < MB; ++m) storev(acc + m * kChunkN + j, av[m]);
    }
  }
}

std::vector<float>& kn_scratch() {
  thread_local std::vector<float> v;
  return v;
}

// Shared driver of the [K, N] layouts. Rows(k0, rows, n0, nc, wbuf) decodes W rows.
template <bool kDirect, typename Rows, typename Direct>
CCL_INLINE void kn_driver(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t N,
                          Rows&& decode, Direct&& direct, float* out, int64_t ldo,
                          const float* row_scale, bool accumulate) {
  std::vector<float>& scratch = kn_scratch();
  const size_t need = static_cast<size_t>(8 + M) * kChunkN + 16;
  if (scratch.size() < need) scratch.resize(need);
  float* wbuf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
  float* acc = wbuf + 8 * kChunkN;
  for (int64_t n0 = 0; n0 < N; n0 += kChunkN) {
    const int nc = static_cast<int>(std::min<int64_t>(kChunkN, N - n0));
    const int nc16 = (nc + 15) / 16 * 16;
    // Full 16-column vectors of few rows with K % 8 == 0 go straight from W to registers.
    const int nv = (kDirect && M <= kRowBlock && K % 8 == 0) ? nc / 16 : 0;
    if (nv > 0) direct(M, n0, nv, acc);
    for (int64_t m = 0; m < M; ++m)
      std::memset(acc + m * kChunkN + 16 * nv, 0, sizeof(float) * (nc16 - 16 * nv));
    for (int64_t k0 = 0; k0 < K && 16 * nv < nc; k0 += 8) {
      const int rows = static_cast<int>(std::min<int64_t>(8, K - k0));
      const int skip = 16 * nv;  // columns done directly
      decode(k0, rows, n0 + skip, nc - skip, wbuf);
      if (rows == 8) {
        fma_all_rows<8>(x, ldx, M, k0, rows, wbuf, nc16 - skip, acc + skip);
      } else {
        fma_all_rows<0>(x, ldx, M, k0, rows, wbuf, nc16 - skip, acc + skip);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* a = acc + m * kChunkN;
      float* o = out + m * ldo + n0;
      const float s = row_scale != nullptr ? row_scale[m] : 1.0f;
      if (accumulate) {
        for (int j = 0; j < nc; ++j) o[j] += row_scale != nullptr ? a[j] * s : a[j];
      } else {
        for (int j = 0; j < nc; ++j) o[j] = row_scale != nullptr ? a[j] * s : a[j];
      }
    }
  }
}

// ---------------------------------------------------------------- dense [N, K] (nn.Linear)
// out[m, n] = dot(x[m, :], w[n, :]) with 16 partial sums over k (k mod 16) combined
// pairwise, then the k tail in order.
template <typename WIO, int MB>
CCL_INLINE void dense_nk_block(const float* x, int64_t ldx, int64_t m0,
                               const typename WIO::T* w, int64_t ldw, int64_t K, int64_t n0,
                               int nn, float* out, int64_t ldo, const float* row_scale,
                               bool accumulate) {
  constexpr int kN = 4;  // output columns per block
  v16f acc[MB][kN];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < kN; ++j) acc[m][j] = v16f{};
  const float* xr = x + m0 * ldx;
  const int64_t kv = K / 16 * 16;
  for (int64_t k = 0; k < kv; k += 16) {
    v16f wv[kN];
    for (int j = 0; j < kN; ++j) wv[j] = decode16<WIO>(w + (n0 + std::min(j, nn - 1)) * ldw + k);
    for (int m = 0; m < MB; ++m) {
      v16f xv = loadv(xr + m * ldx + k);
      for (int j = 0; j < kN; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < MB; ++m) {
    float* o = out + (m0 + m) * ldo + n0;
    const float s = row_scale != nullptr ? row_scale[m0 + m] : 1.0f;
    for (int j = 0; j < nn; ++j) {
      alignas(64) float part[16];
      std::memcpy(part, &acc[m][j], sizeof(part));
      for (int h = 8; h > 0; h /= 2)
        for (int l = 0; l < h; ++l) part[l] += part[l + h];
      float sum = part[0];
      const typename WIO::T* wr = w + (n0 + j) * ldw;
      for (int64_t k = kv; k < K; ++k) sum += xr[m * ldx + k] * WIO::load(wr[k]);
      if (row_scale != nullptr) sum = sum * s;
      o[j] = accumulate ? o[j] + sum : sum;
    }
  }
}

// Runs Kernel<MB>(m0, ...) over every row block (MB = kRowBlock, then the remainder).
#define CCL_ROW_BLOCKS(M, CALL)                                  \
  do {                                                           \
    int64_t m0_ = 0;                                             \
    for (; m0_ + kRowBlock <= (M); m0_ += kRowBlock) CALL(4, m0_); \
    switch ((M) - m0_) {                                         \
      case 3: CALL(3, m0_); break;                               \
      case 2: CALL(2, m0_); break;                               \
      case 1: CALL(1, m0_); break;                               \
      default: break;                                            \
    }                                                            \
  } while (0)

template <typename WIO>
CCL_INLINE void dense_kn(const float* x, int64_t ldx, int64_t M, const LinearWeights& lw,
                         float* out, int64_t ldo, const float* rs, bool acc) {
  const auto* w = static_cast<const typename WIO::T*>(lw.w);
  const int64_t ldw = lw.ldw;
  auto direct = [&](int64_t M_, int64_t n0, int nv, float* a) {
    auto wv8 = [=](int64_t k0) {
      const typename WIO::T* base = w + k0 * ldw + n0;
      return [=](int j, v16f(&wv)[8]) __attribute__((always_inline)) {
        for (int i = 0; i < 8; ++i) wv[i] = decode16<WIO>(base + i * ldw + j);
      };
    };
    switch (M_) {
      case 1: kn_direct<1>(x, ldx, lw.K, n0, nv, wv8, a); break;
      case 2: kn_direct<2>(x, ldx, lw.K, n0, nv, wv8, a); break;
      case 3: kn_direct<3>(x, ldx, lw.K, n0, nv, wv8, a); break;
      default: kn_direct<4>(x, ldx, lw.K, n0, nv, wv8, a); break;
    }
  };
  kn_driver<true>(x, ldx, M, lw.K, lw.N,
            [w, ldw](int64_t k0, int rows, int64_t n0, int nc, float* wbuf) {
              dense_rows8<WIO>(w, ldw, k0, rows, n0, nc, wbuf);
            },
            direct, out, ldo, rs, acc);
}

template <typename WIO>
CCL_INLINE void dense_nk(const float* x, int64_t ldx, int64_t M, const LinearWeights& lw,
                         float* out, int64_t ldo, const float* rs, bool acc) {
  const auto* w = static_cast<const typename WIO::T*>(lw.w);
  for (int64_t n0 = 0; n0 < lw.N; n0 += 4) {
    const int nn = static_cast<int>(std::min<int64_t>(4, lw.N - n0));
#define CCL_CALL(MB, m0) \
  dense_nk_block<WIO, MB>(x, ldx, m0, w, lw.ldw, lw.K, n0, nn, out, ldo, rs, acc)
    CCL_ROW_BLOCKS(M, CCL_CALL);
#undef CCL_CALL
  }
}

template <typename SIO>
CCL_INLINE void int4_kn(const float* x, int64_t ldx, int64_t M, const LinearWeights& lw,
                        float* out, int64_t ldo, const float* rs, bool acc) {
  const auto* qw = static_cast<const int32_t*>(lw.w);
  const auto* sc = static_cast<const typename SIO::T*>(lw.scales);
  const int64_t ldw = lw.ldw, lds = lw.lds, group = lw.group;
  alignas(64) float sbuf[kChunkN];
  // INT4 keeps the decoded buffer for every M: measured faster here than decoding into
  // registers (scales are decoded once per group and chunk there).
  auto no_direct = [](int64_t, int64_t, int, float*) {};
  kn_driver<false>(x, ldx, M, lw.K, lw.N,
            [&](int64_t k0, int rows, int64_t n0, int nc, float* wbuf) {
              if (k0 % group == 0) {  // group % 8 == 0: a packed row never straddles groups
                const typename SIO::T* srow = sc + (k0 / group) * lds + n0;
                int j = 0;
                for (; j + 16 <= nc; j += 16) storev(sbuf + j, decode16<SIO>(srow + j));
                for (; j < nc; ++j) sbuf[j] = SIO::load(srow[j]);
                for (; j % 16 != 0; ++j) sbuf[j] = 0.0f;
              }
              int4_rows8(qw, ldw, sbuf, k0, n0, nc, wbuf);
            },
            no_direct, out, ldo, rs, acc);
}

bool valid(const LinearWeights& w) {
  if (w.K < 0 || w.N < 0 || w.w == nullptr) return false;
  if (w.kind == WeightKind::kInt4)
    return w.scales != nullptr && w.group > 0 && w.group % 8 == 0 && w.K % w.group == 0 &&
           w.ldw >= w.N && w.lds >= w.N;
  if (w.kind == WeightKind::kDenseKN) return w.ldw >= w.N;
  if (w.kind == WeightKind::kDenseNK) return w.ldw >= w.K;
  return false;
}

template <typename IO>
CCL_INLINE void to_f32_rows(const void* x, int64_t ldx, int64_t M, int64_t K, float* dst) {
  const auto* p = static_cast<const typename IO::T*>(x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) dst[m * K + k] = IO::load(p[m * ldx + k]);
}

// exp(x) for the SiLU of the MoE stand-in, vectorisable: 2^n * p(r), r = x - n ln2,
// |r| <= ln2/2, degree-6 Taylor polynomial (relative error < 2e-7, ~1-2 ulp).
CCL_INLINE float fast_exp(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504f + shift;
  float n = t - shift;
  float r = x - n * 0.693145752f;  // ln2 split in two for an exact n * ln2_hi
  r = r - n * 1.42860677e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ni;
  std::memcpy(&ni, &t, 4);
  ni = (ni - 0x4B400000) + 127;  // the integer n from the shifted float's bits, biased
  uint32_t bits = static_cast<uint32_t>(ni) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

std::vector<float>& scratch_a() {
  thread_local std::vector<float> v;
  return v;
}
std::vector<float>& scratch_b() {
  thread_local std::vector<float> v;
  return v;
}
float* grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace

CCL_GEMV_MULTIVERSION
int linear_f32_from_f32(const float* x, int64_t ldx, int64_t M, const LinearWeights& w,
                        float* out, int64_t ldo, const float* row_scale, bool accumulate) {
  if (!valid(w) || M < 0 || ldo < w.N) return kBadArgument;
  if (M == 0 || w.N == 0) return kOk;
  switch (w.kind) {
    case WeightKind::kDenseKN:
      switch (w.dtype) {
        case DType::kFloat32: dense_kn<F32>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
        case DType::kBFloat16: dense_kn<BF16>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
        default: dense_kn<F16>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
      }
      break;
    case WeightKind::kDenseNK:
      switch (w.dtype) {
        case DType::kFloat32: dense_nk<F32>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
        case DType::kBFloat16: dense_nk<BF16>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
        default: dense_nk<F16>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
      }
      break;
    case WeightKind::kInt4:
      switch (w.dtype) {
        case DType::kFloat32: int4_kn<F32>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
        case DType::kBFloat16: int4_kn<BF16>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
        default: int4_kn<F16>(x, ldx, M, w, out, ldo, row_scale, accumulate); break;
      }
      break;
  }
  return kOk;
}

#pragma GCC pop_options

CCL_GEMV_MULTIVERSION
static void convert_rows(DType dt, const void* x, int64_t ldx, int64_t M, int64_t K,
                         float* dst) {
  switch (dt) {
    case DType::kFloat32: to_f32_rows<F32>(x, ldx, M, K, dst); break;
    case DType::kBFloat16: to_f32_rows<BF16>(x, ldx, M, K, dst); break;
    default: to_f32_rows<F16>(x, ldx, M, K, dst); break;
  }
}

int linear_f32(DType x_dtype, const void* x, int64_t ldx, int64_t M, const LinearWeights& w,
               float* out, int64_t ldo, const float* row_scale, bool accumulate) {
  if (!valid(w) || M < 0 || ldx < w.K) return kBadArgument;
  if (x_dtype == DType::kFloat32)
    return linear_f32_from_f32(static_cast<const float*>(x), ldx, M, w, out, ldo, row_scale,
                               accumulate);
  float* xf = grow(scratch_a(), static_cast<size_t>(M * w.K));
  convert_rows(x_dtype, x, ldx, M, w.K, xf);
  return linear_f32_from_f32(xf, w.K, M, w, out, ldo, row_scale, accumulate);
}

CCL_GEMV_MULTIVERSION
static void silu_mul(const float* gu, int64_t rows, int64_t inter, float* h) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gu + r * 2 * inter;
    const float* u = g + inter;
    float* o = h + r * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = (g[i] / (1.0f + fast_exp(-g[i]))) * u[i];
  }
}

int moe_f32(DType x_dtype, const void* x, int64_t ldx, int64_t M, const int64_t* ids,
            const float* topk_weights, int64_t topk, int64_t num_experts,
            const LinearWeights& w13, const LinearWeights& w2, float* out) {
  const int64_t H = w13.K, inter = w13.N / 2;
  if (!valid(w13) || !valid(w2) || w13.N % 2 != 0 || w2.K != inter || w2.N != H || M < 0 ||
      topk < 0 || ldx < H)
    return kBadArgument;
  std::memset(out, 0, sizeof(float) * static_cast<size_t>(M * H));
  if (M == 0 || topk == 0 || H == 0) return kOk;

  // (expert, token, slot) for every valid routing entry, grouped by expert.
  struct Route {
    int64_t e, m, j;
  };
  thread_local std::vector<Route> routes;
  routes.clear();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < topk; ++j) {
      const int64_t e = ids[m * topk + j];
      if (e >= 0 && e < num_experts) routes.push_back({e, m, j});
    }
  std::stable_sort(routes.begin(), routes.end(),
                   [](const Route& a, const Route& b) { return a.e < b.e; });

  // Scratch: [x fp32 M*H][gathered rows R*H][gate/up R*2I][h R*I][y R*H][row scales R]
  const size_t R = routes.size();
  float* base = grow(scratch_b(), static_cast<size_t>(M * H) +
                                      R * static_cast<size_t>(H + 2 * inter + inter + H + 1));
  float* xf = base;
  float* xg = xf + M * H;
  float* gu = xg + R * H;
  float* hh = gu + R * 2 * inter;
  float* yy = hh + R * inter;
  float* ps = yy + R * H;
  convert_rows(x_dtype, x, ldx, M, H, xf);

  for (size_t a = 0; a < R;) {
    size_t b = a;
    while (b < R && routes[b].e == routes[a].e) ++b;
    const int64_t n = static_cast<int64_t>(b - a);
    for (size_t r = a; r < b; ++r) {
      std::memcpy(xg + (r - a) * H, xf + routes[r].m * H, sizeof(float) * H);
      ps[r - a] = topk_weights[routes[r].m * topk + routes[r].j];
    }
    const int64_t e = routes[a].e;
    int st = linear_f32_from_f32(xg, H, n, w13.expert(e), gu, 2 * inter, nullptr, false);
    if (st != kOk) return st;
    silu_mul(gu, n, inter, hh);
    st = linear_f32_from_f32(hh, inter, n, w2.expert(e), yy, H, ps, false);
    if (st != kOk) return st;
    for (size_t r = a; r < b; ++r) {
      float* o = out + routes[r].m * H;
      const float* y = yy + (r - a) * H;
      for (int64_t c = 0; c < H; ++c) o[c] += y[c];
    }
    a = b;
  }
  return kOk;
}

void add_rms_norm_f32(DType dtype, float* sums, const void* residual, const void* weight,
                      void* out, void* residual_out, int64_t rows, int64_t cols, float eps,
                      bool gemma) {
  add_rms_norm_rows(dtype, sums, residual, weight, out, residual_out, rows, cols, eps,
                    gemma ? 1.0f : 0.0f);
}

namespace {
std::vector<float>& partial_scratch() {
  thread_local std::vector<float> v;
  return v;
}
}  // namespace

int linear_add_rms_norm(HostMailbox& mb, DType dtype, const void* x, int64_t ldx, int64_t M,
                        const LinearWeights& w, const void* residual, const void* norm_weight,
                        void* out, void* residual_out, float eps, bool gemma, int algo) {
  const int64_t n = M * w.N;
  float* partial = grow(partial_scratch(), static_cast<size_t>(n));
  int st = linear_f32(dtype, x, ldx, M, w, partial, w.N, nullptr, false);
  if (st != kOk) return st;
  const uintptr_t p = reinterpret_cast<uintptr_t>(partial);
  st = mb.all_reduce(p, p, n, static_cast<int>(DType::kFloat32), algo);
  if (st != kOk) return st;
  add_rms_norm_f32(dtype, partial, residual, norm_weight, out, residual_out, M, w.N, eps, gemma);
  return kOk;
}

int moe_add_rms_norm(HostMailbox& mb, DType dtype, const void* x, int64_t ldx, int64_t M,
                     const int64_t* ids, const float* topk_weights, int64_t topk,
                     int64_t num_experts, const LinearWeights& w13, const LinearWeights& w2,
                     const void* residual, const void* norm_weight, void* out,
                     void* residual_out, float eps, bool gemma, int algo) {
  const int64_t H = w13.K;
  float* partial = grow(partial_scratch(), static_cast<size_t>(M * H));
  int st = moe_f32(dtype, x, ldx, M, ids, topk_weights, topk, num_experts, w13, w2, partial);
  if (st != kOk) return st;
  const uintptr_t p = reinterpret_cast<uintptr_t>(partial);
  st = mb.all_reduce(p, p, M * H, static_cast<int>(DType::kFloat32), algo);
  if (st != kOk) return st;
  add_rms_norm_f32(dtype, partial, residual, norm_weight, out, residual_out, M, H, eps, gemma);
  return kOk;
}

}  // namespace ccl
