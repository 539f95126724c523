// Bindings of the CPU GEMV / MoE kernels and the fused host entry points (csrc/host/gemv.h).
//
// Two doors to the same C++ code:
//  * register_gemv(m): the submodule ccl._C.gemv (house style, csrc/bindings/<area>.cpp),
//    including the one-call fused ops that take the HostMailbox.
//  * a small C ABI (ccl_gemv_*, default visibility) that ccl.fused_linear reaches through
//    ctypes while module.cpp does not call register_gemv yet. It has no HostMailbox entry
//    point: that path composes gemv -> Communicator.all_reduce -> epilogue (same results,
//    bit for bit).
//
// A weight descriptor is 11 int64: (kind, dtype, w, ldw, scales, lds, group, K, N,
// expert_stride_w, expert_stride_s), see LinearWeights. Pointers are raw addresses (the
// Python side validates tensors and passes data_ptr()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "host/gemv.h"

namespace py = pybind11;
using namespace ccl;

namespace {

constexpr int kDescWords = 11;

LinearWeights weights_from(const int64_t* d) {
  LinearWeights w;
  w.kind = static_cast<WeightKind>(d[0]);
  w.dtype = static_cast<DType>(d[1]);
  w.w = reinterpret_cast<const void*>(static_cast<uintptr_t>(d[2]));
  w.ldw = d[3];
  w.scales = reinterpret_cast<const void*>(static_cast<uintptr_t>(d[4]));
  w.lds = d[5];
  w.group = d[6];
  w.K = d[7];
  w.N = d[8];
  w.expert_stride_w = d[9];
  w.expert_stride_s = d[10];
  return w;
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int ccl_gemv_abi_version() { return 1; }

__attribute__((visibility("default"))) int ccl_gemv_linear_f32(
    int x_dtype, uintptr_t x, int64_t ldx, int64_t M, const int64_t* desc, uintptr_t out,
    int64_t ldo, uintptr_t row_scale, int accumulate) {
  return linear_f32(static_cast<DType>(x_dtype), ptr<const void>(x), ldx, M,
                    weights_from(desc), ptr<float>(out), ldo, ptr<const float>(row_scale),
                    accumulate != 0);
}

__attribute__((visibility("default"))) int ccl_gemv_moe_f32(
    int x_dtype, uintptr_t x, int64_t ldx, int64_t M, uintptr_t ids, uintptr_t topk_weights,
    int64_t topk, int64_t num_experts, const int64_t* w13, const int64_t* w2, uintptr_t out) {
  return moe_f32(static_cast<DType>(x_dtype), ptr<const void>(x), ldx, M,
                 ptr<const int64_t>(ids), ptr<const float>(topk_weights), topk, num_experts,
                 weights_from(w13), weights_from(w2), ptr<float>(out));
}

__attribute__((visibility("default"))) void ccl_gemv_add_rms_norm_f32(
    int dtype, uintptr_t sums, uintptr_t residual, uintptr_t weight, uintptr_t out,
    uintptr_t residual_out, int64_t rows, int64_t cols, float eps, int gemma) {
  add_rms_norm_f32(static_cast<DType>(dtype), ptr<float>(sums), ptr<const void>(residual),
                   ptr<const void>(weight), ptr<void>(out), ptr<void>(residual_out), rows, cols,
                   eps, gemma != 0);
}

}  // extern "C"

void register_gemv(py::module_& root) {
  py::module_ m = root.def_submodule("gemv", "CPU GEMV / MoE kernels and fused host ops");
  m.attr("DESC_WORDS") = kDescWords;
  using Desc = std::array<int64_t, kDescWords>;

  m.def(
      "linear_f32",
      [](int x_dtype, uintptr_t x, int64_t ldx, int64_t M, const Desc& d, uintptr_t out,
         int64_t ldo, uintptr_t row_scale, bool accumulate) {
        return ccl_gemv_linear_f32(x_dtype, x, ldx, M, d.data(), out, ldo, row_scale,
                                   accumulate);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "moe_f32",
      [](int x_dtype, uintptr_t x, int64_t ldx, int64_t M, uintptr_t ids, uintptr_t tw,
         int64_t topk, int64_t num_experts, const Desc& w13, const Desc& w2, uintptr_t out) {
        return ccl_gemv_moe_f32(x_dtype, x, ldx, M, ids, tw, topk, num_experts, w13.data(),
                                w2.data(), out);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "add_rms_norm_f32",
      [](int dtype, uintptr_t sums, uintptr_t residual, uintptr_t weight, uintptr_t out,
         uintptr_t residual_out, int64_t rows, int64_t cols, float eps, bool gemma) {
        ccl_gemv_add_rms_norm_f32(dtype, sums, residual, weight, out, residual_out, rows, cols,
                                  eps, gemma);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "linear_add_rms_norm",
      [](HostMailbox& mb, int dtype, uintptr_t x, int64_t ldx, int64_t M, const Desc& d,
         uintptr_t residual, uintptr_t norm_weight, uintptr_t out, uintptr_t residual_out,
         float eps, bool gemma, int algo) {
        return linear_add_rms_norm(mb, static_cast<DType>(dtype), ptr<const void>(x), ldx, M,
                                   weights_from(d.data()), ptr<const void>(residual),
                                   ptr<const void>(norm_weight), ptr<void>(out),
                                   ptr<void>(residual_out), eps, gemma, algo);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "moe_add_rms_norm",
      [](HostMailbox& mb, int dtype, uintptr_t x, int64_t ldx, int64_t M, uintptr_t ids,
         uintptr_t tw, int64_t topk, int64_t num_experts, const Desc& w13, const Desc& w2,
         uintptr_t residual, uintptr_t norm_weight, uintptr_t out, uintptr_t residual_out,
         float eps, bool gemma, int algo) {
        return moe_add_rms_norm(mb, static_cast<DType>(dtype), ptr<const void>(x), ldx, M,
                                ptr<const int64_t>(ids), ptr<const float>(tw), topk,
                                num_experts, weights_from(w13.data()), weights_from(w2.data()),
                                ptr<const void>(residual), ptr<const void>(norm_weight),
                                ptr<void>(out), ptr<void>(residual_out), eps, gemma, algo);
      },
      py::call_guard<py::gil_scoped_release>());
}
