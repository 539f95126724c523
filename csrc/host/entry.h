// C entry points of the HostMailbox ops in ccl._C, for ccl._C_torch's tensor fast path.
//
// ccl._C stays free of libtorch; ccl._C_torch (built against torch) can read tensor metadata
// in C++ for a few nanoseconds, but must not run its own compiled copy of HostMailbox on an
// object that ccl._C created. So ccl._C hands out plain function addresses (and the
// address of each HostMailbox), and the fast path calls through them: ccl._C's code always
// runs on ccl._C's objects. Bump kHostEntryAbi whenever a signature below changes.
#pragma once

#include <cstdint>

namespace ccl {

constexpr int kHostEntryAbi = 1;

extern "C" {
typedef int (*HostAllReduceFn)(void* mailbox, uintptr_t in, uintptr_t out, int64_t numel,
                               int dtype, int algo);
typedef int (*HostAddRmsNormFn)(void* mailbox, uintptr_t x, uintptr_t residual,
                                uintptr_t weight, uintptr_t out, uintptr_t residual_out,
                                int64_t rows, int64_t cols, int dtype, float eps, int gemma,
                                int algo);
typedef int (*HostQkRmsNormFn)(void* mailbox, uintptr_t q, int64_t q_stride, uintptr_t k,
                               int64_t k_stride, uintptr_t q_weight, uintptr_t k_weight,
                               uintptr_t q_out, uintptr_t k_out, int64_t q_out_stride,
                               int64_t k_out_stride, int64_t rows, int64_t q_cols,
                               int64_t k_cols, int dtype, float eps);
}

}  // namespace ccl
