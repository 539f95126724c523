#!/usr/bin/env python3
"""A few calls of one kernel at the decode shapes, for Nsight Compute (bench/one_gpu_run.sh):
``linear_kernel`` (the INT4 M=8 tl.dot GEMV, K 1536, N 3072) or ``moe_gate_up_kernel`` (INT4,
H 3072, I 768 per rank, top-8 of 256 experts, one token)."""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from ccl.fused_linear import Int4Weights, device_linear_partial, device_moe_gate_up  # noqa: E402

dev = torch.device("cuda", 0)
g = torch.Generator(device=dev).manual_seed(0)


def int4(lead, k, n):
    q = torch.randint(-(1 << 31), 1 << 31, (*lead, k // 8, n), generator=g, device=dev,
                      dtype=torch.int64).to(torch.int32)
    return Int4Weights(q, (torch.rand(*lead, k // 128, n, generator=g, device=dev) * 0.01)
                       .to(torch.bfloat16), 128)


which = sys.argv[1] if len(sys.argv) > 1 else "linear_kernel"
if which == "linear_kernel":
    w, x = int4((), 1536, 3072), torch.randn(8, 1536, device=dev).to(torch.bfloat16)
else:
    w, x = int4((256,), 3072, 2 * 768), torch.randn(1, 3072, device=dev).to(torch.bfloat16)
for _ in range(5):
    if which == "linear_kernel":
        device_linear_partial(x, quant=w)
    else:
        device_moe_gate_up(x, torch.randperm(256, generator=g, device=dev)[:8].view(1, 8), None,
                           quant=w)
torch.cuda.synchronize()
