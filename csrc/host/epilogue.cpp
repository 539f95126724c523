#include "host/epilogue.h"

#include <cmath>
#include <cstring>

#include "host/mailbox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CCL_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CCL_MULTIVERSION
#endif

namespace ccl {
namespace {

struct F32 {
  using T = float;
  static inline float load(T v) { return v; }
  static inline T store(float f) { return f; }
};
struct BF16 {
  using T = uint16_t;
  static inline float load(T h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline T store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<T>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
    return static_cast<T>(u >> 16);
  }
};
struct F16 {
  using T = _Float16;
  static inline float load(T h) { return static_cast<float>(h); }
  static inline T store(float f) { return static_cast<T>(f); }
};

constexpr int kLanes = 16;

// Sum of v[j]^2 with kLanes independent partial sums combined pairwise: vectorisable, and
// the same order on every rank. mailbox.cpp's fused 2-rank fp32 add_rms_norm
// (add_res_sumsq_f32_avx2) reproduces this exact order: change both together.
inline float sum_squares(const float* v, int64_t n) {
  float part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += v[j + l] * v[j + l];
  for (int l = 0; j < n; ++j, ++l) part[l] += v[j] * v[j];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

template <typename IO>
inline float sum_squares_typed(const typename IO::T* x, int64_t n) {
  float part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      float v = IO::load(x[j + l]);
      part[l] += v * v;
    }
  for (int l = 0; j < n; ++j, ++l) {
    float v = IO::load(x[j]);
    part[l] += v * v;
  }
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}


// Typed bodies take every size by value: with -fno-strict-aliasing a store through a float*
// could alias a captured loop bound, which stops GCC from vectorising (seen in lambdas).
template <typename IO>
inline void store_from_fp32_t(const float* a, void* out, int64_t count) {
  auto* o = static_cast<typename IO::T*>(out);
  for (int64_t i = 0; i < count; ++i) o[i] = IO::store(a[i]);
}

template <typename IO>
inline void add_rms_norm_rows_t(float* sums, const void* residual, const void* weight, void* out,
                                void* residual_out, int64_t rows, int64_t cols, float eps,
                                float weight_offset) {
  using T = typename IO::T;
  const T* res = static_cast<const T*>(residual);
  const T* w = static_cast<const T*>(weight);
  T* o = static_cast<T*>(out);
  T* ro = static_cast<T*>(residual_out);
  for (int64_t row = 0; row < rows; ++row) {
    float* __restrict r = sums + row * cols;
    const int64_t base = row * cols;
    if (res != nullptr)
      for (int64_t j = 0; j < cols; ++j) r[j] += IO::load(res[base + j]);
    if (ro != nullptr)
      for (int64_t j = 0; j < cols; ++j) ro[base + j] = IO::store(r[j]);
    const float inv = 1.0f / std::sqrt(sum_squares(r, cols) / static_cast<float>(cols) + eps);
    for (int64_t j = 0; j < cols; ++j)
      o[base + j] = IO::store((r[j] * inv) * (IO::load(w[j]) + weight_offset));
  }
}

template <typename IO>
inline void sum_squares_rows_t(const void* x, int64_t stride, int64_t rows, int64_t cols,
                               float* ss, int slot) {
  const auto* p = static_cast<const typename IO::T*>(x);
  for (int64_t t = 0; t < rows; ++t) ss[2 * t + slot] = sum_squares_typed<IO>(p + t * stride, cols);
}

template <typename IO>
inline void scale_rows_t(const void* x, int64_t stride, const float* inv, int slot,
                         const void* w, void* out, int64_t out_stride, int64_t rows,
                         int64_t cols) {
  using T = typename IO::T;
  const T* p = static_cast<const T*>(x);
  const T* wp = static_cast<const T*>(w);
  T* o = static_cast<T*>(out);
  for (int64_t t = 0; t < rows; ++t) {
    const float s = inv[2 * t + slot];
    const T* xr = p + t * stride;
    T* orow = o + t * out_stride;
    for (int64_t j = 0; j < cols; ++j) orow[j] = IO::store((IO::load(xr[j]) * s) * IO::load(wp[j]));
  }
}

#define CCL_DISPATCH_DTYPE(dt, fn, ...)                      \
  switch (dt) {                                              \
    case DType::kFloat32: fn<F32>(__VA_ARGS__); break;       \
    case DType::kBFloat16: fn<BF16>(__VA_ARGS__); break;     \
    default: fn<F16>(__VA_ARGS__); break;                    \
  }

}  // namespace

CCL_MULTIVERSION
void store_from_fp32(DType dt, const float* a, void* out, int64_t count) {
  CCL_DISPATCH_DTYPE(dt, store_from_fp32_t, a, out, count);
}

CCL_MULTIVERSION
void add_rms_norm_rows(DType dt, float* sums, const void* residual, const void* weight,
                       void* out, void* residual_out, int64_t rows, int64_t cols, float eps,
                       float weight_offset) {
  CCL_DISPATCH_DTYPE(dt, add_rms_norm_rows_t, sums, residual, weight, out, residual_out, rows,
                     cols, eps, weight_offset);
}

CCL_MULTIVERSION
void sum_squares_rows(DType dt, const void* x, int64_t stride, int64_t rows, int64_t cols,
                      float* ss, int slot) {
  CCL_DISPATCH_DTYPE(dt, sum_squares_rows_t, x, stride, rows, cols, ss, slot);
}

CCL_MULTIVERSION
void scale_rows(DType dt, const void* x, int64_t stride, const float* inv, int slot,
                const void* w, void* out, int64_t out_stride, int64_t rows, int64_t cols) {
  CCL_DISPATCH_DTYPE(dt, scale_rows_t, x, stride, inv, slot, w, out, out_stride, rows, cols);
}

}  // namespace ccl
