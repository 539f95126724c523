"""linear_all_reduce_add_rms_norm / moe_all_reduce_add_rms_norm (ccl.fused_linear,
ccl.fused_moe) with 2 real rank processes on the host transport, and the Triton fused-linear
kernel under TRITON_INTERPRET=1 with 2 real processes over host shared memory.

Fresh random inputs per run (seed printed; CCL_TEST_SEED pins it), outputs poisoned with
NaN, results compared with a dequantise-then-matmul reference in float64, and bitwise
equality of every output across ranks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
import traceback

import pytest
import torch

from _harness import bits_equal, digest, first_diff, gen, mix, poison_like

pytestmark = pytest.mark.timeout(120)

EPS = 1e-6
DTYPES = ["bfloat16", "float16", "float32"]
WEIGHTS = ["dense_kn", "dense_nk", "int4_g32", "int4_g128"]


def _tol(dtype) -> dict:
    # One rounding of the output dtype, plus the fp32 GEMV (different summation order than
    # the float64 reference) over K ~ 256 products.
    return {torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3),
            torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]


def _weight(kind: str, seed: int, rank: int, k: int, n: int, dtype):
    """(weight, quant, fp32 reference W [K, N]) of one rank's shard."""
    from ccl.fused_linear import Int4Weights

    w = gen(seed, ("w", kind, rank, k, n), (k, n), torch.float32, scale=k ** -0.5)
    if kind == "dense_kn":
        wt = w.to(dtype)
        return wt, None, wt.float()
    if kind == "dense_nk":  # an nn.Linear weight [N, K], passed as its transpose
        wt = w.t().contiguous().to(dtype).t()
        return wt, None, wt.float()
    group = int(kind.split("_g")[1])
    scale_dtype = torch.float16 if dtype == torch.float32 else dtype
    q = Int4Weights.quantize(w, group, scale_dtype)
    return None, q, q.dequantize()


def _reference(partials, residual, norm_weight, gemma=False):
    """float64: residual_out = sum partials + residual, out = RMSNorm(residual_out)."""
    acc = sum(p.double() for p in partials)
    if residual is not None:
        acc = acc + residual.double()
    w = norm_weight.double() + (1.0 if gemma else 0.0)
    return acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + EPS) * w, acc


def _check(name, got, ref, dtype):
    diff = first_diff(got, ref.to(dtype), **_tol(dtype))
    assert diff is None, f"{name}: {diff}"


# ============================================================================ host transport
def _rank_linear(ctx, seed, cases):
    """Every case on this rank; returns one digest per case (outputs) for the cross-rank
    check. Each case: (dtype, kind, shape of x's leading dims, K, N, variant)."""
    from ccl import NormStyle
    from ccl.fused_linear import linear_all_reduce_add_rms_norm

    comm = ctx.comm()
    digests = []
    for i, (dtype_name, kind, lead, k, n, variant) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        xs = [gen(seed, ("x", i, r), (*lead, k), dtype) for r in range(ctx.world)]
        parts = []
        mine = None
        for r in range(ctx.world):
            weight, quant, wref = _weight(kind, seed + i, r, k, n, dtype)
            parts.append(xs[r].float() @ wref)
            if r == ctx.rank:
                mine = (weight, quant)
        residual = None if variant == "no_residual" else gen(seed, ("res", i), (*lead, n), dtype)
        norm_w = gen(seed, ("nw", i), (n,), dtype, scale=0.5)
        gemma = variant == "gemma"
        ref_o, ref_r = _reference(parts, residual, norm_w, gemma)
        x_before = xs[ctx.rank].clone()
        if variant == "inplace":  # outputs alias the residual (vLLM's fused_add_rms_norm)
            res_in = residual.clone()
            out = poison_like(res_in)
            o, r = linear_all_reduce_add_rms_norm(
                comm, xs[ctx.rank], mine[0], res_in, norm_w, EPS, quant=mine[1], out=out,
                residual_out=res_in)
            assert r is res_in and o is out
        elif variant == "allocate":
            o, r = linear_all_reduce_add_rms_norm(comm, xs[ctx.rank], mine[0], residual, norm_w,
                                                  EPS, quant=mine[1])
        else:
            out, res_out = poison_like(ref_o.to(dtype)), poison_like(ref_o.to(dtype))
            o, r = linear_all_reduce_add_rms_norm(
                comm, xs[ctx.rank], mine[0], residual, norm_w, EPS, quant=mine[1],
                norm_style=NormStyle.GEMMA if gemma else NormStyle.STANDARD,
                out=out, residual_out=res_out)
            assert o is out and r is res_out
        assert bits_equal(xs[ctx.rank], x_before), "x modified"
        what = f"case {i} {dtype_name} {kind} x{lead}x{k} N={n} {variant}"
        _check(f"{what} residual_out", r, ref_r, dtype)
        _check(f"{what} out", o, ref_o, dtype)
        digests.append(digest(o, r))
    return digests


def _cases(seed, n_cases):
    rnd = random.Random(seed)
    cases = []
    for dtype in DTYPES:
        for kind in WEIGHTS:
            lead = rnd.choice([(1,), (2,), (5,), (2, 3), (16,), (64,)])
            k = rnd.choice([128, 256, 384]) if "g128" in kind else rnd.choice([96, 256, 520])
            if "int4" in kind:
                k = k // 128 * 128 if "g128" in kind else k // 32 * 32
            n = rnd.choice([16, 100, 512, 777, 1030])
            variant = rnd.choice(["plain", "plain", "no_residual", "gemma", "inplace", "allocate"])
            cases.append((dtype, kind, lead, k, n, variant))
    return cases[:n_cases]


def test_linear_host_2ranks(pools, seed):
    pool = pools.get(2)
    cases = _cases(seed, 100)
    per_rank = pool.run(_rank_linear, seed, cases, timeout=100)
    assert per_rank[0] == per_rank[1], "outputs differ between ranks (bitwise)"


def _rank_qkv(ctx, seed):
    """linear_qk_rms_norm on CPU tensors (the projection, then comm.qk_rms_norm): every rank
    its own column shard, against an fp32 reference over every rank's rounded shard; bad
    column splits rejected before any communication."""
    from ccl.fused_linear import linear_qk_rms_norm

    comm = ctx.comm()
    for i, (dtype_name, kind, m, k, qc, kc, n) in enumerate(
            [("bfloat16", "dense_nk", 1, 96, 32, 16, 64), ("float32", "int4_g32", 3, 64, 24, 8, 40),
             ("float16", "dense_kn", 2, 128, 48, 16, 96)]):
        dtype = getattr(torch, dtype_name)
        x = gen(seed, ("hqx", i), (m, k), dtype)
        qkv, mine = [], None
        for r in range(ctx.world):
            weight, quant, wref = _weight(kind, seed + 200 + i, r, k, n, dtype)
            qkv.append((x.float() @ wref).to(dtype).float())
            mine = (weight, quant) if r == ctx.rank else mine
        qw = gen(seed, ("hqw", i, ctx.rank), (qc,), dtype)
        kw = gen(seed, ("hkw", i, ctx.rank), (kc,), dtype)
        ssq = sum(p[:, :qc].pow(2).sum(-1) for p in qkv)
        ssk = sum(p[:, qc:qc + kc].pow(2).sum(-1) for p in qkv)
        ref = qkv[ctx.rank].clone()
        ref[:, :qc] *= torch.rsqrt(ssq / (qc * ctx.world) + EPS)[:, None] * qw.float()
        ref[:, qc:qc + kc] *= torch.rsqrt(ssk / (kc * ctx.world) + EPS)[:, None] * kw.float()
        out = poison_like(torch.empty(m, n, dtype=dtype))
        q, kk, v = linear_qk_rms_norm(comm, x, mine[0], qw, kw, EPS, q_cols=qc, k_cols=kc,
                                      quant=mine[1], out=out)
        assert q.data_ptr() == out.data_ptr() and v.shape == (m, n - qc - kc)
        _check(f"host qkv case {i}", out, ref.to(dtype), dtype)
    with pytest.raises(ValueError, match="q_cols"):
        linear_qk_rms_norm(comm, x, mine[0], qw, kw, EPS, q_cols=n, k_cols=kc, quant=mine[1])
    return True


def test_linear_qk_rms_norm_host_2ranks(pools, seed):
    assert pools.get(2).run(_rank_qkv, seed, timeout=60) == [True, True]


def _rank_fallback_and_mismatch(ctx, seed):
    """A partial above max_bytes goes through the wrapped backend (same results); a shape
    disagreement is a CollectiveMismatch on every rank and the communicator stays usable."""
    from ccl import CollectiveMismatch
    from ccl.fused_linear import linear_all_reduce_add_rms_norm

    comm = ctx.comm(max_bytes=2048)
    dtype, k, n, m = torch.bfloat16, 256, 200, 4  # 3200 B of fp32 partial > 2048
    xs = [gen(seed, ("fx", r), (m, k), dtype) for r in range(ctx.world)]
    parts, mine = [], None
    for r in range(ctx.world):
        weight, quant, wref = _weight("int4_g32", seed, r, k, n, dtype)
        parts.append(xs[r].float() @ wref)
        mine = (weight, quant) if r == ctx.rank else mine
    residual = gen(seed, "fres", (m, n), dtype)
    nw = gen(seed, "fnw", (n,), dtype)
    ref_o, ref_r = _reference(parts, residual, nw)
    o, r = linear_all_reduce_add_rms_norm(comm, xs[ctx.rank], None, residual, nw, EPS,
                                          quant=mine[1], out=poison_like(residual),
                                          residual_out=poison_like(residual))
    _check("fallback residual_out", r, ref_r, dtype)
    _check("fallback out", o, ref_o, dtype)
    # mismatch: N differs by rank
    nn_ = 32 + 8 * ctx.rank
    w = torch.zeros(k, nn_, dtype=dtype)
    out = poison_like(torch.empty(1, nn_, dtype=dtype))
    with pytest.raises(CollectiveMismatch):
        linear_all_reduce_add_rms_norm(comm, xs[ctx.rank][:1], w, None,
                                       torch.ones(nn_, dtype=dtype), EPS, out=out)
    assert bool(out.isnan().all()), "outputs written despite a mismatch"
    o2, _ = linear_all_reduce_add_rms_norm(comm, xs[ctx.rank][:1], torch.zeros(k, 8, dtype=dtype),
                                           None, torch.ones(8, dtype=dtype), EPS)
    assert bool((o2 == 0).all())
    return digest(o, r)


def test_fallback_and_mismatch(pools, seed):
    d = pools.get(2).run(_rank_fallback_and_mismatch, seed, timeout=60)
    assert d[0] == d[1]


def test_bad_input():
    from ccl.fused_linear import Int4Weights, linear_partial

    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="exactly one"):
        linear_partial(x)
    with pytest.raises(ValueError, match="K=64"):
        linear_partial(x, torch.randn(32, 8))
    with pytest.raises(ValueError, match="group_size"):
        Int4Weights(torch.zeros(8, 4, dtype=torch.int32), torch.zeros(2, 4), 48)
    with pytest.raises(ValueError, match="do not match"):
        Int4Weights(torch.zeros(8, 4, dtype=torch.int32), torch.zeros(3, 4), 32)
    q = Int4Weights.quantize(torch.randn(64, 8), 32)
    with pytest.raises(ValueError, match="act-order"):
        Int4Weights.from_gptq(q.qweight, q.scales, g_idx=torch.arange(64).flip(0) // 32)
    with pytest.raises(ValueError, match="symmetric"):
        Int4Weights.from_gptq(q.qweight, q.scales, qzeros=torch.full((2, 1), 0x12345678,
                                                                      dtype=torch.int32))
    ok = Int4Weights.from_gptq(q.qweight, q.scales,
                               qzeros=torch.full((2, 1), 0x77777777, dtype=torch.int32))
    assert ok.group_size == 32


@pytest.mark.parametrize("m", [1, 3, 4, 5, 9])
def test_linear_partial_layouts(m, seed):
    """The local GEMV alone (no communication), every layout and dtype, odd K and N (the
    row-streaming tails, the register path for M <= 4 and the buffered path above)."""
    from ccl.fused_linear import linear_partial

    for i, (dtype, kind, k, n) in enumerate([
            (torch.bfloat16, "dense_kn", 100, 37), (torch.float16, "dense_kn", 264, 530),
            (torch.float32, "dense_nk", 77, 19), (torch.bfloat16, "dense_nk", 512, 64),
            (torch.float16, "int4_g32", 96, 1030), (torch.bfloat16, "int4_g128", 256, 17),
            (torch.float32, "int4_g32", 64, 512)]):
        x = gen(seed, ("lp", m, i), (m, k), dtype)
        weight, quant, wref = _weight(kind, seed, i, k, n, dtype)
        got = linear_partial(x, weight, quant=quant)
        ref = x.double() @ wref.double()
        diff = first_diff(got.double(), ref, rtol=1e-5, atol=1e-5)
        assert diff is None, f"{dtype} {kind} M={m} K={k} N={n}: {diff}"
        acc = torch.ones(m, n)
        from ccl.fused_linear import _native, _weight_desc

        desc, _ = _weight_desc(weight, quant, k, x.device)
        scale = torch.rand(m)
        xc = x.contiguous()
        st = _native().linear_f32({torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype],
                                  xc.data_ptr(), k, m, desc, acc.data_ptr(), n,
                                  scale.data_ptr(), True)
        assert st == 0
        diff = first_diff(acc.double(), 1 + scale.double()[:, None] * ref, rtol=1e-5, atol=1e-5)
        assert diff is None, f"accumulate/row_scale {dtype} {kind}: {diff}"


def test_int4_layout_matches_vllm_pack_rows():
    """Our packing is vLLM's ``pack_rows`` (gptq_pack): nibble i of qweight[j, n] is row
    8j + i; values stored with the +8 bias (uint4b8)."""
    from ccl.fused_linear import Int4Weights

    g = torch.Generator().manual_seed(mix("layout"))
    k, n = 64, 24
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    packed = torch.zeros(k // 8, n, dtype=torch.int32)
    for i in range(8):  # vllm quant_utils.pack_rows
        packed |= q[i::8, :] << (4 * i)
    scales = torch.rand(k // 32, n, generator=g).half() + 0.5
    w = Int4Weights(packed, scales, 32).dequantize()
    assert torch.equal(w, (q - 8).float() * scales.float().repeat_interleave(32, 0))
    x = torch.randn(3, k, generator=g)
    from ccl.fused_linear import linear_partial

    torch.testing.assert_close(linear_partial(x, quant=Int4Weights(packed, scales, 32)),
                               x @ w, rtol=1e-5, atol=1e-5)


# ============================================================================ MoE (host)
def _rank_moe(ctx, seed, cases):
    from ccl.fused_linear import Int4Weights
    from ccl.fused_moe import ExpertWeights, moe_all_reduce_add_rms_norm, route_topk

    comm = ctx.comm()
    digests = []
    for i, (quant, m, e, h, inter, topk) in enumerate(cases):
        dtype = torch.bfloat16
        experts = []
        for r in range(ctx.world):
            w13 = gen(seed, ("w13", i, r), (e, h, 2 * inter), torch.float32, scale=h ** -0.5)
            w2 = gen(seed, ("w2", i, r), (e, inter, h), torch.float32, scale=inter ** -0.5)
            if quant:
                experts.append(ExpertWeights(Int4Weights.quantize(w13, 32, dtype),
                                             Int4Weights.quantize(w2, 32, dtype)))
            else:
                experts.append(ExpertWeights(w13.to(dtype), w2.to(dtype)))
        x = gen(seed, ("mx", i), (m, h), dtype)
        ids, tw = route_topk(gen(seed, ("logits", i), (m, e), torch.float32), topk)
        if m > 1:
            ids[0, 0] = -1  # an expert-parallel "not mine" entry is skipped
        residual = gen(seed, ("mres", i), (m, h), dtype)
        nw = gen(seed, ("mnw", i), (h,), dtype)
        parts = []
        for ex in experts:
            w13, w2 = ex.dequantized()
            p = torch.zeros(m, h, dtype=torch.float64)
            for t in range(m):
                for j in range(topk):
                    eid = int(ids[t, j])
                    if eid < 0:
                        continue
                    gu = x[t].double() @ w13[eid].double()
                    hh = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
                    p[t] += float(tw[t, j]) * (hh @ w2[eid].double())
            parts.append(p)
        ref_o, ref_r = _reference(parts, residual, nw)
        o, r = moe_all_reduce_add_rms_norm(comm, x, ids, tw, experts[ctx.rank], residual, nw,
                                           EPS, out=poison_like(residual),
                                           residual_out=poison_like(residual))
        _check(f"moe case {i} residual_out", r, ref_r, dtype)
        _check(f"moe case {i} out", o, ref_o, dtype)
        digests.append(digest(o, r))
    return digests


def test_moe_partial_out(seed):
    """moe_partial's ``out``: fp32, or x's dtype holding the fp32 partial rounded once; any
    other dtype / size is refused before anything is written."""
    from ccl.fused_linear import Int4Weights
    from ccl.fused_moe import ExpertWeights, moe_partial, route_topk

    m, e, h, inter, topk, dtype = 3, 8, 64, 32, 2, torch.bfloat16
    w13 = gen(seed, ("po13",), (e, h, 2 * inter), torch.float32, scale=h ** -0.5)
    w2 = gen(seed, ("po2",), (e, inter, h), torch.float32, scale=inter ** -0.5)
    experts = ExpertWeights(Int4Weights.quantize(w13, 32, dtype),
                            Int4Weights.quantize(w2, 32, dtype))
    x = gen(seed, ("pox",), (m, h), dtype)
    ids, tw = route_topk(gen(seed, ("pol",), (m, e), torch.float32), topk)
    ref = moe_partial(x, ids, tw, experts)
    assert ref.dtype == torch.float32 and ref.shape == (m, h)
    out16 = poison_like(torch.empty(m, h, dtype=dtype))
    assert moe_partial(x, ids, tw, experts, out=out16) is out16
    assert torch.equal(out16, ref.to(dtype))
    out32 = poison_like(torch.empty(m, h))
    moe_partial(x, ids, tw, experts, out=out32)
    assert torch.equal(out32, ref)
    for bad in (torch.empty(m, h, dtype=torch.float16), torch.empty(m, h + 1)):
        keep = poison_like(bad)
        with pytest.raises(ValueError, match="out must be"):
            moe_partial(x, ids, tw, experts, out=keep)
        assert bool(keep.isnan().all()), "a refused out was written"


def test_moe_host_2ranks(pools, seed):
    cases = [(True, 1, 8, 128, 64, 2), (True, 5, 16, 96, 96, 4), (False, 3, 8, 64, 32, 3)]
    per_rank = pools.get(2).run(_rank_moe, seed, cases, timeout=60)
    assert per_rank[0] == per_rank[1]


# ============================================================================ Triton interpret
CAP = 16384  # bytes of fp32 partial per call


def _interp_worker(rank, world, store_path, seed, q):
    try:
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)
        import test_triton_interpret as TI

        from ccl.fused_linear import device_linear_add_rms_norm

        ex, region, mb = TI._setup(rank, world, store_path, "fused-linear", cap=CAP)
        # (dtype, weight, M, K, N, tiles): explicit narrow tiles (several column tiles, K tiles
        # and INT4 groups per K tile), or None = the library's defaults for M (one row at a
        # time for M = 1, tl.dot above)
        from ccl.fused_linear import GemvTiles

        row16 = GemvTiles(bn=16, bk=32)
        dot16 = GemvTiles(bn=16, bk=32, use_dot=True, bm=16)
        cases = [("bfloat16", "dense_kn", 1, 64, 48, row16), ("float32", "int4_g32", 3, 64, 40, dot16),
                 ("bfloat16", "int4_g32", 17, 64, 24, dot16), ("float16", "dense_nk", 2, 40, 33, row16),
                 ("bfloat16", "int4_g32", 1, 192, 72, None),
                 ("bfloat16", "int4_g32", 8, 320, 40, None),
                 ("float16", "dense_nk", 6, 300, 36, None),
                 ("bfloat16", "dense_nk", 1, 96, 1100, None),
                 ("bfloat16", "int4_g128", 1, 256, 40, GemvTiles(bn=16, bk=64))]
        digests = []
        for i, (dtype_name, kind, m, k, n, tiles) in enumerate(cases):
            dtype = getattr(torch, dtype_name)
            xs = [gen(seed, ("ix", i, r), (m, k), dtype) for r in range(world)]
            parts, mine = [], None
            for r in range(world):
                weight, quant, wref = _weight(kind, seed + i, r, k, n, dtype)
                parts.append(xs[r].float() @ wref)
                mine = (weight, quant) if r == rank else mine
            residual = gen(seed, ("ires", i), (m, n), dtype)
            nw = gen(seed, ("inw", i), (n,), dtype)
            ref_o, ref_r = _reference(parts, residual, nw)
            out, res_out = poison_like(residual), poison_like(residual)
            device_linear_add_rms_norm(mb, xs[rank], mine[0], mine[1], residual, nw, EPS,
                                       out=out, residual_out=res_out, tiles=tiles)
            mb.raise_if_failed()
            _check(f"interp case {i} residual_out", res_out, ref_r, dtype)
            _check(f"interp case {i} out", out, ref_o, dtype)
            digests.append(digest(out, res_out))
        digests.append(_interp_moe(mb, rank, world, seed))
        _interp_qkv(mb, rank, world, seed)
        digests.append(_interp_epilogue_split(mb, rank, world, seed))
        # ranks disagree on N: both kernels record a mismatch and write nothing
        from ccl.errors import CollectiveMismatch

        n_bad = 8 + 8 * rank
        out = poison_like(torch.empty(1, n_bad))
        device_linear_add_rms_norm(mb, torch.ones(1, 16), torch.ones(16, n_bad), None, None,
                                   torch.ones(n_bad), EPS, out=out, residual_out=None)
        with pytest.raises(CollectiveMismatch):
            mb.raise_if_failed()
        assert bool(out.isnan().all()), "outputs written despite a mismatch"
        # ranks on different handoffs (one would add the residual twice or never): the
        # header says which, both refuse
        out = poison_like(torch.empty(1, 24))
        device_linear_add_rms_norm(mb, torch.ones(1, 16), torch.ones(16, 24), None,
                                   torch.ones(1, 24), torch.ones(24), EPS, out=out,
                                   residual_out=None,
                                   handoff="direct" if rank == 0 else "counter")
        with pytest.raises(CollectiveMismatch, match="direct handoff"):
            mb.raise_if_failed()
        assert bool(out.isnan().all()), "outputs written despite a handoff mismatch"
        with pytest.raises(ValueError, match="handoff"):  # refused before any collective
            device_linear_add_rms_norm(mb, torch.ones(1, 16), torch.ones(16, 24), None, None,
                                       torch.ones(24), EPS, out=out, residual_out=None,
                                       handoff="fast")
        # the plain mailbox ops still work after (same sequence numbers and slots)
        x = torch.full((40,), float(rank + 1))
        mb.all_reduce(x)
        mb.raise_if_failed()
        assert bool((x == world * (world + 1) / 2).all())
        every = ex.all_gather(digests)
        assert all(d == digests for d in every), "fused-linear outputs differ across ranks"
        ex.all_gather(None)
        mb.close()
        region.close()
        q.put((rank, "ok", None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", traceback.format_exc()))


def _interp_moe(mb, rank, world, seed):
    """MoE through the device kernels: gate/up (moe_gate_up_kernel) then the down projection
    fused with the all-reduce + add + norm (routing in the fused kernel), INT4 and dense
    experts, against a dequantise-then-matmul fp32 reference; also the unfused down
    projection (linear_kernel with routing) against the same partial."""
    from ccl.fused_linear import GemvTiles, Int4Weights, device_linear_add_rms_norm
    from ccl.fused_linear import device_linear_partial, device_moe_gate_up

    out_digests = []
    for j, (int4, m, topk, e, hdim, inter) in enumerate([(True, 2, 3, 5, 64, 32),
                                                        (False, 1, 2, 4, 48, 16)]):
        dtype = torch.bfloat16
        x = gen(seed, ("mx", j), (m, hdim), dtype)  # replicated (normed hidden state)
        logits = gen(seed, ("mr", j), (m, e), torch.float32)
        tw, ids = torch.topk(torch.softmax(logits, -1), topk, -1)
        tw = tw.contiguous()
        ids[0, -1] = e  # an expert-parallel sentinel: outside [0, E), skipped
        valid = (ids < e).float()
        safe = ids.clamp(max=e - 1)
        parts = []
        for r in range(world):
            w13 = gen(seed, ("m13", j, r), (e, hdim, 2 * inter), torch.float32) * hdim ** -0.5
            w2 = gen(seed, ("m2", j, r), (e, inter, hdim), torch.float32) * inter ** -0.5
            if int4:
                q13, q2 = Int4Weights.quantize(w13, 32, dtype), Int4Weights.quantize(w2, 32, dtype)
                f13, f2 = q13.dequantize(), q2.dequantize()
                args13, args2 = (None, q13), (None, q2)
            else:
                f13, f2 = w13.to(dtype).float(), w2.to(dtype).float()
                args13, args2 = (f13.to(dtype), None), (f2.to(dtype), None)
            # reference: h rounded to bf16 as the kernel stores it
            g = torch.einsum("mh,mkhi->mki", x.float(), f13[safe])
            h = (torch.nn.functional.silu(g[..., :inter]) * g[..., inter:] * valid[..., None]).to(dtype)
            y = torch.einsum("mki,mkih->mkh", h.float(), f2[safe])
            parts.append((y * (tw * valid).unsqueeze(-1)).sum(1))
            if r == rank:
                mine = (args13, args2, h)
        (w13_d, q13_m), (w2_d, q2_m), h_ref = mine
        h = device_moe_gate_up(x, ids, w13_d, quant=q13_m)
        torch.testing.assert_close(h.float(), h_ref.reshape(h.shape).float(), rtol=2e-2, atol=2e-2)
        partial = device_linear_partial(h, w2_d, quant=q2_m, topk_ids=ids, topk_weights=tw)
        torch.testing.assert_close(partial, parts[rank], rtol=2e-2, atol=2e-2)
        # several K steps per slot (every slot's step in one tile), and the partial stored
        # in x's dtype: the fp32 partial rounded once
        steps = GemvTiles(bn=16, bk=16 if int4 else 8, num_warps=2)
        out16 = poison_like(torch.empty(m, hdim, dtype=dtype))
        device_linear_partial(h, w2_d, quant=q2_m, topk_ids=ids, topk_weights=tw, tiles=steps,
                              out=out16)
        torch.testing.assert_close(out16.float(), parts[rank], rtol=2e-2, atol=2e-2)
        again = device_linear_partial(h, w2_d, quant=q2_m, topk_ids=ids, topk_weights=tw,
                                      tiles=steps)
        assert torch.equal(out16, again.to(dtype)), f"moe case {j}: 16-bit out != fp32 rounded"
        residual = gen(seed, ("mres", j), (m, hdim), dtype)
        nw = gen(seed, ("mnw", j), (hdim,), dtype)
        # the fused kernel adds the partials computed from this rank's h: use the same h on
        # every rank's reference (h differs from the bf16 reference by at most one rounding)
        ref_o, ref_r = _reference(parts, residual, nw)
        out, res_out = poison_like(residual), poison_like(residual)
        device_linear_add_rms_norm(mb, h, w2_d, q2_m, residual, nw, EPS, out=out,
                                   residual_out=res_out, topk_ids=ids, topk_weights=tw)
        mb.raise_if_failed()
        _check(f"moe case {j} residual_out", res_out, ref_r, dtype)
        _check(f"moe case {j} out", out, ref_o, dtype)
        out_digests.append(digest(out, res_out))
    return out_digests


def _interp_qkv(mb, rank, world, seed):
    """QKV projection with the TP Q/K norm in its epilogue (linear_qk_rms_norm_kernel):
    every rank projects its own column shard; the q / k sums of squares are all-reduced
    inside the kernel. Against an fp32 reference built from every rank's rounded shard, and
    against the unfused device path (linear_kernel, then qk_rms_norm_kernel)."""
    from ccl.fused_linear import GemvTiles, device_linear_partial, device_linear_qk_rms_norm

    cases = [("bfloat16", "dense_kn", 1, 64, 16, 8, 40, GemvTiles(bn=16, bk=32)),
             ("float16", "int4_g32", 3, 64, 24, 16, 48,
              GemvTiles(bn=16, bk=32, use_dot=True, bm=16)),
             ("bfloat16", "dense_nk", 2, 96, 32, 16, 64, None)]
    for i, (dtype_name, kind, m, k, qc, kc, n, tiles) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        x = gen(seed, ("qx", i), (m, k), dtype)  # replicated activations
        qkv, mine = [], None
        for r in range(world):
            weight, quant, wref = _weight(kind, seed + 100 + i, r, k, n, dtype)
            qkv.append((x.float() @ wref).to(dtype).float())
            mine = (weight, quant) if r == rank else mine
        qw = [gen(seed, ("qw", i, r), (qc,), dtype) for r in range(world)]
        kw = [gen(seed, ("kw", i, r), (kc,), dtype) for r in range(world)]
        ssq = sum(p[:, :qc].pow(2).sum(-1) for p in qkv)
        ssk = sum(p[:, qc:qc + kc].pow(2).sum(-1) for p in qkv)
        mine_ref = qkv[rank].clone()
        mine_ref[:, :qc] *= torch.rsqrt(ssq / (qc * world) + EPS)[:, None] * qw[rank].float()
        mine_ref[:, qc:qc + kc] *= torch.rsqrt(ssk / (kc * world) + EPS)[:, None] * kw[rank].float()
        out = poison_like(torch.empty(m, n, dtype=dtype))
        device_linear_qk_rms_norm(mb, x, mine[0], mine[1], qw[rank], kw[rank], EPS, q_cols=qc,
                                  k_cols=kc, out=out, tiles=tiles)
        mb.raise_if_failed()
        _check(f"qkv case {i}", out, mine_ref.to(dtype), dtype)
        # the unfused device path: the projection, then the standalone Q/K norm kernel
        ref = device_linear_partial(x, mine[0], quant=mine[1], tiles=tiles).to(dtype)
        mb.qk_rms_norm(ref[:, :qc], ref[:, qc:qc + kc], qw[rank], kw[rank], EPS,
                       q_out=ref[:, :qc], k_out=ref[:, qc:qc + kc])
        mb.raise_if_failed()
        assert torch.equal(out[:, qc + kc:], ref[:, qc + kc:]), f"qkv case {i}: v differs"
        _check(f"qkv case {i} vs unfused", out, ref, dtype)
    # ranks disagree on the q / k split: both record a mismatch and normalise nothing
    from ccl.errors import CollectiveMismatch

    x = torch.ones(1, 16)
    w = torch.ones(16, 24)
    out = poison_like(torch.empty(1, 24))
    device_linear_qk_rms_norm(mb, x, w, None, torch.ones(8 + rank), torch.ones(4), EPS,
                              q_cols=8 + rank, k_cols=4, out=out)
    with pytest.raises(CollectiveMismatch):
        mb.raise_if_failed()
    assert bool((out == 16.0).all()), "q / k normalised despite a mismatch"


# epilogue programs per row to try (0: the library's default); chunks of 16-column multiples,
# so 3 and 5 give uneven last chunks, 8 more parts than 16-column chunks for short rows
SPLITS = (1, 2, 3, 5, 8, 0)


def _check_counters_reset(mb):
    """After a fused launch its last program has reset the ticket, the failure flag and
    every row counter (a row's counter has several readers, so none of them resets it)."""
    from ccl.fused_linear import _DEVICE_STATES
    from ccl.kernels import triton_fused_linear as F

    def at(c):  # a tl.constexpr index
        return int(getattr(c, "value", c))

    aux = _DEVICE_STATES[mb].aux
    assert int(aux[at(F.AUX_TICKET)]) == 0 and int(aux[at(F.AUX_FAILED)]) == 0, aux[:2].tolist()
    rows = aux[at(F.AUX_ROWS):at(F.AUX_ROWS) + F.MAX_ROWS]
    assert int(rows.abs().sum()) == 0, f"row counters not reset: {rows.tolist()}"


def _interp_epilogue_split(mb, rank, world, seed):
    """The fused kernels with each row's epilogue split over several programs (the fused
    linear with the direct handoff, which the interpreter runs with one program per row, and
    once with the counter handoff): every split (and the default) against the float64
    reference, and bitwise equal to each other (every part adds the tiles' sums of squares
    the same way) and, through the digests, across ranks. Fresh inputs and poisoned outputs per call; one case with outputs aliasing the
    residual, the QKV kernel (every part publishes the row's q / k sums) too."""
    from ccl.fused_linear import GemvTiles, device_linear_add_rms_norm, device_linear_qk_rms_norm

    digests = []
    # (dtype, weight, M, K, N, tiles, alias): N not a multiple of 16, several column tiles
    for i, (dtype_name, kind, m, k, n, tiles, alias) in enumerate([
            ("bfloat16", "dense_kn", 1, 64, 100, GemvTiles(bn=16, bk=32), False),
            ("float16", "int4_g32", 3, 64, 72, GemvTiles(bn=16, bk=32, use_dot=True, bm=16), True),
            ("float32", "dense_nk", 2, 48, 40, GemvTiles(bn=16, bk=32), False)]):
        dtype = getattr(torch, dtype_name)
        for split in SPLITS:
            key = ("es", i, split)
            xs = [gen(seed, key + ("x", r), (m, k), dtype) for r in range(world)]
            parts, mine = [], None
            for r in range(world):
                weight, quant, wref = _weight(kind, seed + 300 + i, r, k, n, dtype)
                parts.append(xs[r].float() @ wref)
                mine = (weight, quant) if r == rank else mine
            residual = gen(seed, key + ("res",), (m, n), dtype)
            nw = gen(seed, key + ("nw",), (n,), dtype)
            ref_o, ref_r = _reference(parts, residual, nw)
            out = poison_like(residual)
            res_out = residual.clone() if alias else poison_like(residual)
            device_linear_add_rms_norm(mb, xs[rank], mine[0], mine[1],
                                       res_out if alias else residual, nw, EPS, out=out,
                                       residual_out=res_out, tiles=tiles, epi_split=split,
                                       handoff="direct")
            mb.raise_if_failed()
            _check_counters_reset(mb)
            what = f"epilogue split {split} case {i} {dtype_name} M{m} N{n}"
            _check(f"{what} residual_out", res_out, ref_r, dtype)
            _check(f"{what} out", out, ref_o, dtype)
            digests.append(digest(out, res_out))
            # the same inputs once more, with one program per row: the same bits
            out1 = poison_like(residual)
            res1 = residual.clone() if alias else poison_like(residual)
            device_linear_add_rms_norm(mb, xs[rank], mine[0], mine[1], res1 if alias else residual,
                                       nw, EPS, out=out1, residual_out=res1, tiles=tiles,
                                       epi_split=1, handoff="direct")
            mb.raise_if_failed()
            assert bits_equal(out1, out) and bits_equal(res1, res_out), \
                f"{what}: differs from the same call with one epilogue program per row"
            if split == SPLITS[0]:  # the counter handoff (the A/B alternative) is right too
                out2 = poison_like(residual)
                res2 = residual.clone() if alias else poison_like(residual)
                device_linear_add_rms_norm(mb, xs[rank], mine[0], mine[1],
                                           res2 if alias else residual, nw, EPS, out=out2,
                                           residual_out=res2, tiles=tiles, handoff="counter")
                mb.raise_if_failed()
                _check_counters_reset(mb)
                _check(f"{what} counter handoff residual_out", res2, ref_r, dtype)
                _check(f"{what} counter handoff out", out2, ref_o, dtype)
                digests.append(digest(out2, res2))
    # QKV: the parts of a row normalise q and k columns of one chunk each
    for i, (dtype_name, m, k, qc, kc, n) in enumerate([("bfloat16", 2, 64, 40, 24, 80),
                                                       ("float32", 1, 32, 16, 16, 48)]):
        dtype = getattr(torch, dtype_name)
        outs = []
        x = gen(seed, ("esq", i, "x"), (m, k), dtype)
        qkv, mine = [], None
        for r in range(world):
            weight, quant, wref = _weight("dense_kn", seed + 400 + i, r, k, n, dtype)
            qkv.append((x.float() @ wref).to(dtype).float())
            mine = (weight, quant) if r == rank else mine
        qw = gen(seed, ("esq", i, "qw", rank), (qc,), dtype)
        kw = gen(seed, ("esq", i, "kw", rank), (kc,), dtype)
        ssq = sum(p[:, :qc].pow(2).sum(-1) for p in qkv)
        ssk = sum(p[:, qc:qc + kc].pow(2).sum(-1) for p in qkv)
        ref = qkv[rank].clone()
        ref[:, :qc] *= torch.rsqrt(ssq / (qc * world) + EPS)[:, None] * qw.float()
        ref[:, qc:qc + kc] *= torch.rsqrt(ssk / (kc * world) + EPS)[:, None] * kw.float()
        for split in SPLITS:
            out = poison_like(torch.empty(m, n, dtype=dtype))
            device_linear_qk_rms_norm(mb, x, mine[0], mine[1], qw, kw, EPS, q_cols=qc,
                                      k_cols=kc, out=out, tiles=GemvTiles(bn=16, bk=32),
                                      epi_split=split)
            mb.raise_if_failed()
            _check_counters_reset(mb)
            _check(f"qkv epilogue split {split} case {i}", out, ref.to(dtype), dtype)
            outs.append(out)
        assert all(bits_equal(o, outs[0]) for o in outs[1:]), \
            f"qkv case {i}: epilogue splits {SPLITS} give different bits"
    return digests


def test_epilogue_split_shapes(monkeypatch):
    """The host's epilogue split: chunks of 16-column multiples covering the row exactly
    once, one block each (a power of two, at most 4096 lanes), at least the requested
    programs where the row allows, and CCL_FUSED_EPILOGUE_SPLIT validated."""
    from ccl import fused_linear as FL
    from ccl.errors import ConfigError

    for cols in (1, 15, 16, 17, 100, 512, 3072, 4096, 4097, 7168, 16384):
        for split in (0, 1, 2, 3, 5, 8, 64, 1000):
            parts, chunk, block = FL.epilogue_split(cols, split)
            assert chunk % 16 == 0 and (parts - 1) * chunk < cols <= parts * chunk, \
                (cols, split, parts, chunk)
            assert block >= chunk and block & (block - 1) == 0 and block <= 4096
            want = split if split else min(2, max(1, cols // 512))
            assert parts <= max(want, -(-cols // 4096)), (cols, split, parts)
            if -(-cols // 16) >= want:  # enough 16-column chunks: each part at most ~1/want
                assert chunk <= -(-cols // want) + 15
    assert FL.epilogue_split(3072, 1) == (1, 3072, 4096)  # one program per row
    assert FL.epilogue_split(3072, 0)[0] == 2  # the default: two programs per row
    assert FL.epilogue_split(300, 0)[0] == 1  # (one for rows under 1024 columns)
    for raw, ok in (("4", 4), ("", 0), ("0", 0), ("-1", None), ("two", None)):
        monkeypatch.setenv("CCL_FUSED_EPILOGUE_SPLIT", raw)
        FL._env_epilogue_split.cache_clear()
        try:
            if ok is None:
                with pytest.raises(ConfigError, match="CCL_FUSED_EPILOGUE_SPLIT"):
                    FL.epilogue_split(100)
            else:
                assert FL._env_epilogue_split() == ok
        finally:
            FL._env_epilogue_split.cache_clear()


def test_direct_split_and_handoff_env(monkeypatch):
    """The direct handoff's epilogue programs per row: a power of two whose 16-column chunks
    cover the row with exactly that many programs (their sum-of-squares words are one block),
    one per 1024 columns by default, always 1 under the interpreter; CCL_FUSED_HANDOFF
    validated."""
    from ccl import fused_linear as FL
    from ccl.errors import ConfigError

    for cols in (1, 16, 17, 100, 1000, 1025, 3072, 4096, 7168, 16384):
        for split in (None, 0, 1, 2, 3, 8, 64):
            p = FL.direct_split(cols, False, split)
            assert p & (p - 1) == 0 and FL.epilogue_split(cols, p)[0] == p, (cols, split, p)
            assert FL.direct_split(cols, True, split) == 1
    assert FL.direct_split(3072, False) == 4 and FL.direct_split(1000, False) == 1
    for raw, ok in (("direct", "direct"), ("COUNTER", "counter"), ("", FL._DEFAULT_HANDOFF),
                    ("tickets", None)):
        monkeypatch.setenv("CCL_FUSED_HANDOFF", raw)
        FL._env_handoff.cache_clear()
        try:
            if ok is None:
                with pytest.raises(ConfigError, match="CCL_FUSED_HANDOFF"):
                    FL._env_handoff()
            else:
                assert FL._env_handoff() == ok
        finally:
            FL._env_handoff.cache_clear()


def test_row_limit_matches_the_kernel():
    """ccl.fused_linear keeps its own copy of the kernel's MAX_ROWS (no Triton import at
    import time): they must agree, or the counters in aux overflow."""
    pytest.importorskip("triton")
    from ccl import fused_linear
    from ccl.kernels import triton_fused_linear

    assert fused_linear._MAX_ROWS == triton_fused_linear.MAX_ROWS


def test_triton_fused_linear_interpret(tmp_path, seed):
    pytest.importorskip("triton")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world = 2
    procs = [ctx.Process(target=_interp_worker, args=(r, world, str(tmp_path / "store"), seed, q))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + 100
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            assert left > 0, f"seed {seed}: ranks {sorted(set(range(world)) - set(results))} hung"
            try:
                rank, status, detail = q.get(timeout=min(left, 2.0))
            except Exception:  # queue.Empty
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                assert not dead, f"seed {seed}: rank(s) {dead} died"
                continue
            assert status == "ok", f"seed {seed}, rank {rank}:\n{detail}"
            results[rank] = detail
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def test_gemv_tile_overrides(monkeypatch):
    """CCL_GEMV_TILES overrides the GEMV tiles per path (tuning on new hardware); a bad entry
    is refused with the expected format, never half-applied."""
    from ccl.errors import ConfigError
    from ccl.fused_linear import gemv_tiles

    default_int4, default_bf16 = gemv_tiles(1, True), gemv_tiles(1, False)
    default_up = gemv_tiles(1, True, moe="up")
    monkeypatch.setenv("CCL_GEMV_TILES", "row_int4=32x1024x8")
    t = gemv_tiles(1, True)
    assert (t.bn, t.bk, t.num_warps, t.use_dot) == (32, 1024, 8, False)
    assert gemv_tiles(1, False) == default_bf16 and gemv_tiles(8, True) != t
    default_down = gemv_tiles(1, True, moe="down")
    assert gemv_tiles(1, True, moe="up") != t and default_down != t
    monkeypatch.setenv("CCL_GEMV_TILES", "down_int4=32x128x4, up=64x64x2")
    assert (gemv_tiles(1, True, moe="down").bn, gemv_tiles(1, True, moe="down").bk) == (32, 128)
    assert gemv_tiles(1, False, moe="up").num_warps == 2
    assert gemv_tiles(1, True, moe="up") == default_up
    with pytest.raises(ValueError, match="up.*down"):
        gemv_tiles(1, True, moe="gate")
    monkeypatch.setenv("CCL_GEMV_TILES", "dot=64x64x4")
    d = gemv_tiles(8, False)
    assert (d.bn, d.bk, d.num_warps, d.use_dot, d.bm) == (64, 64, 4, True, 16)
    assert gemv_tiles(1, True) == default_int4
    monkeypatch.setenv("CCL_GEMV_TILES", "dot=16x128x4x3")
    d = gemv_tiles(8, False)
    assert (d.bn, d.bk, d.num_warps, d.stages) == (16, 128, 4, 3)
    for bad in ("row_int4=16x500x4", "rows=16x512x4", "row_int4=16x512", "dot_fp8=16x64x4",
                "dot=16x128x4x9", "dot=16x128x4x2x1"):
        monkeypatch.setenv("CCL_GEMV_TILES", bad)
        with pytest.raises(ConfigError, match="CCL_GEMV_TILES"):
            gemv_tiles(1, True)
