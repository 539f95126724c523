// CPU GEMV kernels of the fused row-parallel projections (DESIGN.md §4,
// `linear_all_reduce_add_rms_norm`) and of the MoE stand-in, plus the host entry points that
// push their fp32 partial through a HostMailbox and finish residual-add + RMSNorm.
//
// The partial is produced in fp32 and travels in fp32 (one element per LL8 word / 4 bulk
// bytes): nothing is rounded between the GEMV and the norm. Every rank receives the same
// partials and sums them in rank order (HostMailbox::all_reduce), so the outputs are bitwise
// identical on every rank whatever order a rank's own GEMV used.
//
// Weight formats (K = input features of this rank, N = output features):
//   kDenseKN  w[k * ldw + n]                 fp32 / bf16 / fp16, "K-major" ([K, N] row-major)
//   kDenseNK  w[n * ldw + k]                 the nn.Linear layout ([N, K] row-major)
//   kInt4     GPTQ / AutoRound symmetric int4 as vLLM loads it (auto_gptq.py, quant_utils.py
//             pack_rows): qweight int32 [K/8, N], row stride ldw; element (k, n) is nibble
//             (k % 8) of qweight[k / 8, n], i.e. bits 4*(k%8) .. 4*(k%8)+3, unsigned 0..15;
//             scales [K/G, N] (fp16 / bf16 / fp32), row stride lds; G = group size (K % G == 0,
//             G % 8 == 0); value = (nibble - 8) * scales[k / G, n] (zero point 8: uint4b8).
//             No act-order (g_idx) permutation.
#pragma once

#include <cstdint>

#include "host/mailbox.h"

namespace ccl {

enum class WeightKind : int { kDenseKN = 0, kDenseNK = 1, kInt4 = 2 };

struct LinearWeights {
  WeightKind kind = WeightKind::kDenseKN;
  DType dtype = DType::kBFloat16;  // dense: the weight dtype; int4: the scales dtype
  const void* w = nullptr;         // dense weight, or int4 qweight (int32)
  int64_t ldw = 0;                 // row stride of w, in elements (int32 words for qweight)
  const void* scales = nullptr;    // int4 only
  int64_t lds = 0;                 // row stride of scales, in elements
  int64_t group = 0;               // int4 group size
  int64_t K = 0;
  int64_t N = 0;
  // Expert stacks ([E, ...]): element offset between consecutive experts' w / scales.
  int64_t expert_stride_w = 0;
  int64_t expert_stride_s = 0;

  LinearWeights expert(int64_t e) const;
};

// out[m * ldo + n] = (accumulate ? out[..] : 0) + (row_scale ? row_scale[m] : 1) *
//                    sum_k x[m, k] * W[k, n]         for m < M, n < N (fp32 math).
// x: [M, K] of x_dtype with row stride ldx. Returns kBadArgument for an unsupported layout.
int linear_f32(DType x_dtype, const void* x, int64_t ldx, int64_t M, const LinearWeights& w,
               float* out, int64_t ldo, const float* row_scale, bool accumulate);

// Same with fp32 activations already in memory (no conversion pass).
int linear_f32_from_f32(const float* x, int64_t ldx, int64_t M, const LinearWeights& w,
                        float* out, int64_t ldo, const float* row_scale, bool accumulate);

// MoE stand-in, one rank's partial. For token m and its top-k experts e = ids[m*topk + j]
// with router weight p = topk_weights[m*topk + j]:
//   g, u = x[m] @ w13[e][:, :I], x[m] @ w13[e][:, I:]      (w13: K = H, N = 2I, gate first)
//   h    = silu(g) * u                                     (fp32, not rounded)
//   out[m] += p * (h @ w2[e])                              (w2: K = I, N = H)
// out: [M, H] fp32, overwritten. Tokens routed to the same expert share one pass over its
// weights; experts are visited in increasing id, so the per-rank order is deterministic.
// ids outside [0, num_experts) are skipped (expert parallel "not mine" sentinel).
int moe_f32(DType x_dtype, const void* x, int64_t ldx, int64_t M, const int64_t* ids,
            const float* topk_weights, int64_t topk, int64_t num_experts,
            const LinearWeights& w13, const LinearWeights& w2, float* out);

// residual-add + RMSNorm of fp32 sums (in place on `sums`), outputs in `dtype`
// (epilogue.h add_rms_norm_rows).
void add_rms_norm_f32(DType dtype, float* sums, const void* residual, const void* weight,
                      void* out, void* residual_out, int64_t rows, int64_t cols, float eps,
                      bool gemma);

// One call: the rank's fp32 partial (linear_f32) -> HostMailbox::all_reduce (fp32, in place,
// sources in rank order) -> residual-add + RMSNorm in x's dtype. Collective.
// The payload (M * N * 4 bytes) must fit the mailbox; above it the caller composes
// linear_f32 + the wrapped backend + add_rms_norm_f32. Returns a HostMailbox status.
int linear_add_rms_norm(HostMailbox& mb, DType dtype, const void* x, int64_t ldx, int64_t M,
                        const LinearWeights& w, const void* residual, const void* norm_weight,
                        void* out, void* residual_out, float eps, bool gemma, int algo);

// The same for the MoE stand-in's partial (moe_f32). Collective.
int moe_add_rms_norm(HostMailbox& mb, DType dtype, const void* x, int64_t ldx, int64_t M,
                     const int64_t* ids, const float* topk_weights, int64_t topk,
                     int64_t num_experts, const LinearWeights& w13, const LinearWeights& w2,
                     const void* residual, const void* norm_weight, void* out,
                     void* residual_out, float eps, bool gemma, int algo);

}  // namespace ccl
