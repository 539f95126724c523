"""ccl.fused_moe.route_topk's device kernel (ccl.kernels.triton_route) against the torch
path, run by the Triton interpreter on CPU tensors (the same kernel source GPUs run)."""

import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import os, torch
from ccl import fused_moe as F
seed = int.from_bytes(os.urandom(4), "little")
g = torch.Generator().manual_seed(seed)
for m, e, k, renorm in ((1, 256, 8, True), (3, 64, 8, True), (5, 40, 3, False), (2, 8, 8, True),
                        (4, 300, 1, True)):
    logits = torch.randn(m, e, generator=g) * 3
    if e >= 64:
        logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie: the lower index first
    got_ids, got_w = F._route_topk_device(logits, k, renorm)
    p = torch.softmax(logits.float(), -1)
    ref_w, ref_ids = torch.topk(p, k, -1)
    if renorm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32
    if e >= 64:
        assert got_ids[0, :2].tolist() == [5, 9][:k], (seed, got_ids[0])
    # the same experts with the same weights (ties may come in another order in torch)
    assert torch.equal(got_ids.sort(-1).values, ref_ids.sort(-1).values), (seed, got_ids, ref_ids)
    assert torch.allclose(got_w, torch.gather(p, 1, got_ids) / (
        torch.gather(p, 1, got_ids).sum(-1, keepdim=True) if renorm else 1), rtol=1e-5, atol=1e-7)
    assert torch.allclose(got_w.sort(-1).values, ref_w.sort(-1).values, rtol=1e-5, atol=1e-7)
    assert (got_w[:, :-1] >= got_w[:, 1:]).all(), got_w  # descending, as torch.topk
print("ok", seed)
"""


def test_route_topk_kernel_matches_torch():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_route_topk_stays_on_torch_for_cpu_tensors():
    import torch

    from ccl.fused_moe import _route_on_device, route_topk

    logits = torch.randn(2, 16)
    assert not _route_on_device(logits, 4)
    ids, w = route_topk(logits, 4)
    ref_w, ref_ids = torch.topk(torch.softmax(logits, -1), 4, -1)
    assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w / ref_w.sum(-1, keepdim=True))
