// Element-wise epilogues of the CPU ops (after the fp32 sums are known): dtype conversion,
// residual-add + RMSNorm, Q/K scaling. Written as typed loops so the compiler vectorises them;
// x86 builds also carry an AVX2/F16C clone picked at load time. Rounding does not depend on
// the clone: the build disables FMA contraction (-ffp-contract=off) and sums of squares use a
// fixed 16-lane order, so every rank computes bit-identical results on any x86-64.
#pragma once

#include <cstdint>

namespace ccl {

enum class DType : uint8_t;

// out[i] = dtype(a[i]) for i < count.
void store_from_fp32(DType dt, const float* a, void* out, int64_t count);

// In place on sums[rows*cols]: r = sums + residual; residual_out = dtype(r) (if given);
// out = dtype(r * rsqrt(mean(r^2) + eps) * (weight + offset)).
void add_rms_norm_rows(DType dt, float* sums, const void* residual, const void* weight,
                       void* out, void* residual_out, int64_t rows, int64_t cols, float eps,
                       float weight_offset);

// ss[t * 2 + slot] = sum_j x[t, j]^2 (fp32, fixed lane order) for rows with a row stride.
void sum_squares_rows(DType dt, const void* x, int64_t stride, int64_t rows, int64_t cols,
                      float* ss, int slot);

// out[t, j] = dtype(x[t, j] * inv[t * 2 + slot] * w[j]).
void scale_rows(DType dt, const void* x, int64_t stride, const float* inv, int slot,
                const void* w, void* out, int64_t out_stride, int64_t rows, int64_t cols);

}  // namespace ccl
