"""MoE routing in one Triton launch: softmax over the experts, top-k, renormalise (vLLM's
``fused_topk``; ``ccl.fused_moe.route_topk`` on devices). Torch needs five or six kernels for
it (softmax, topk with its sort, sum, divide, the int64 cast): about 17 us per MoE layer on
H200 at decode sizes, for a few hundred values.

One program per token: the row's logits in one block, softmax in fp32, then ``TOPK`` rounds
of "largest remaining probability, lowest expert index among equals" (so the choice is a
pure function of the logits: every rank routes alike), then the weights divided by their
sum. Selected experts come out in descending probability order, as ``torch.topk``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ccl.kernels import ll

__all__ = ["route_topk_kernel"]


@triton.jit
def route_topk_kernel(logits_ptr, ld, ids_ptr, w_ptr, E,
                      TOPK: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr,
                      RENORM: tl.constexpr):
    """Row ``m``: ``ids[m, :TOPK]`` (int64) and ``w[m, :TOPK]`` (fp32) of the ``TOPK``
    largest softmax probabilities of ``logits[m, :E]`` (``BE >= E`` and ``KP >= TOPK``:
    powers of two)."""
    m = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    valid = e < E
    z = tl.load(logits_ptr + m * ld + e, mask=valid, other=float("-inf")).to(tl.float32)
    p = tl.exp(z - tl.max(z, 0))
    p = tl.where(valid, p, 0.0)
    p = p / tl.sum(p, 0)
    p = tl.where(valid, p, -1.0)  # never chosen
    k = tl.arange(0, KP)
    top_w = tl.zeros([KP], tl.float32)
    top_i = tl.zeros([KP], tl.int64)
    for j in tl.static_range(TOPK):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, BE), 0)
        top_w = tl.where(k == j, best, top_w)
        top_i = tl.where(k == j, idx.to(tl.int64), top_i)
        p = tl.where(e == idx, -1.0, p)
    if RENORM:
        top_w = top_w / tl.sum(tl.where(k < TOPK, top_w, 0.0), 0)
    tl.store(ids_ptr + m * TOPK + k, top_i, mask=k < TOPK)
    tl.store(w_ptr + m * TOPK + k, top_w, mask=k < TOPK)


ll.interpreter_fast_calls(globals(), keep=("route_topk_kernel",))
