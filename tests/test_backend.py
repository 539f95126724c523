"""The torch.distributed backend "mbx" (ccl.backend, ccl._C_torch) in real rank processes.

Bare rank pools (no process group at start): each rank function calls
``init_process_group`` itself on a fresh FileStore, runs its checks and destroys the group,
so one pool serves every backend string and both implementations ("c10d": the C++
c10d::Backend, "python": the fallback ProcessGroup). Inputs are random per run (seed printed;
``CCL_TEST_SEED`` pins it); results are compared with the reference (bitwise where the spec
is exact: fp32 sums in rank order), bitwise across ranks in the parent, and the backend's
counters prove which path ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

import _harness
from _harness import bits_equal, digest, first_diff, gen, ref_sum

CAPACITY = 64 * 1024  # small mailboxes keep the over-capacity cases cheap on 2 cores
# (numel, dtype) of all-reduces through the mailboxes: odd sizes, the LL/bulk boundary, a
# decode row, and sizes above the 3-rank two-shot threshold once CCL_TWO_SHOT_ABOVE is low.
SMALL = [(1, "float32"), (257, "float32"), (4096, "bfloat16"), (16384, "float32"),
         (3, "float16"), (32768, "bfloat16")]
LARGE = [(CAPACITY // 4 + 1, "float32"), (40000, "bfloat16")]  # over capacity: delegated
IMPLS = ["c10d", "python"]


@pytest.fixture(scope="module")
def bare_pools():
    pools: dict[int, _harness.RankPool] = {}

    def get(world: int) -> _harness.RankPool:
        p = pools.get(world)
        if p is None or not p.healthy or p._busy:  # _busy: a test timed out mid-run
            if p is not None:
                p.close()
            p = pools[world] = _harness.RankPool(world, boot="none", env={
                r: {"CCL_MAX_BYTES": CAPACITY, "CCL_TWO_SHOT_ABOVE": 16 * 1024}
                for r in range(world)})
        return p

    yield get
    for p in pools.values():
        p.close()


@pytest.fixture
def seed() -> int:
    s = _harness.fresh_seed()
    print(f"seed={s}  (rerun with CCL_TEST_SEED={s} to reproduce)")
    return s


# ====================================================================== rank side
def _init(ctx, store_path: str, backend: str = "mbx", impl: str = "c10d", node: str = ""):
    import torch.distributed as dist

    import ccl.backend

    ccl.backend.register()
    os.environ["CCL_BACKEND_IMPL"] = impl
    if node:
        os.environ["CCL_NODE_ID"] = node
    else:
        os.environ.pop("CCL_NODE_ID", None)
    dist.init_process_group(
        backend, store=dist.FileStore(store_path, ctx.world), rank=ctx.rank,
        world_size=ctx.world, timeout=timedelta(seconds=60),
    )
    assert dist.get_backend() == backend


def _done():
    import torch.distributed as dist

    dist.destroy_process_group()
    os.environ.pop("CCL_NODE_ID", None)


def _all_reduce_cases(ctx, seed, results: dict, group=None, tag: str = "") -> dict:
    """Every SMALL / LARGE case with SUM and AVG, plus delegated ops and dtypes.
    Returns the expected counter increments."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    group_ranks = list(range(ctx.world)) if group is None else dist.get_process_group_ranks(group)
    n = len(group_ranks)

    def parts(key, numel, dtype):
        return [gen(seed, (key, r), (numel,), dtype) for r in group_ranks]

    expect = dict(mailbox=0, delegated=0)
    for numel, dt in SMALL + LARGE:
        dtype = getattr(torch, dt)
        small = numel * dtype.itemsize <= CAPACITY
        for op in ("sum", "avg"):
            p = parts((tag, numel, dt, op), numel, dtype)
            expected = ref_sum(p)
            if op == "avg":
                expected = expected.div_(n)
            x = p[group_ranks.index(ctx.rank)].clone()
            rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.AVG
            dist.all_reduce(x, op=rop, group=group)
            where = f"{tag}all_reduce {op} {dt} numel={numel}"
            if small:  # the mailbox spec is exact: fp32 sums in rank order
                d = first_diff(x, expected)
                expect["mailbox"] += 1
            else:  # gloo sums in the tensor's dtype in its own order
                d = _close(x, p, avg=op == "avg")
                expect["delegated"] += 1
            assert d is None, f"{where}: {d}"
            results[where] = digest(x)
    # Functional collectives (the path torch.compile traces) reach the same mailboxes.
    for op in ("sum", "avg"):
        p = parts((tag, "functional", op), 1000, torch.float32)
        expected = ref_sum(p)
        if op == "avg":
            expected = expected.div_(n)
        g = group if group is not None else dist.group.WORLD
        y = fc.all_reduce(p[group_ranks.index(ctx.rank)], op, g)
        y = fc.wait_tensor(y) if hasattr(fc, "wait_tensor") else y
        d = first_diff(y, expected)
        assert d is None, f"{tag}functional all_reduce {op}: {d}"
        results[f"{tag}functional {op}"] = digest(y)
        expect["mailbox"] += 1
    # Not for the mailboxes: MAX, integer SUM, a non-contiguous tensor.
    p = parts((tag, "max"), 100, torch.float32)
    x = p[group_ranks.index(ctx.rank)].clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    assert torch.equal(x, torch.stack(p).amax(0)), f"{tag}MAX"
    ints = [torch.arange(10, dtype=torch.int64) * (r + 1) for r in group_ranks]
    x = ints[group_ranks.index(ctx.rank)].clone()
    dist.all_reduce(x, group=group)
    assert torch.equal(x, sum(ints)), f"{tag}int64 SUM: {x}"
    p = parts((tag, "strided"), 64, torch.float32)
    x = p[group_ranks.index(ctx.rank)].clone().view(8, 8).t()
    dist.all_reduce(x, group=group)
    d = _close(x, [q.view(8, 8).t() for q in p])
    assert d is None, f"{tag}non-contiguous SUM: {d}"
    expect["delegated"] += 3
    return expect


def _close(x, parts, avg: bool = False) -> str | None:
    """None when ``x`` is within the rounding bound of a sum computed in the tensor's dtype
    in any order (how gloo sums): |x - exact| <= 2 n u sum_r |p_r| (+ the AVG division)."""
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[x.dtype]
    stack = torch.stack([p.double() for p in parts])
    n = len(parts)
    exact, bound = stack.sum(0), 2 * n * u * stack.abs().sum(0)
    if avg:
        exact, bound = exact / n, bound / n + u * (exact / n).abs()
    bad = (x.double() - exact).abs() > bound + 1e-30
    if not bool(bad.any()):
        return None
    i = int(bad.flatten().nonzero()[0])
    return (f"{int(bad.sum())}/{bad.numel()} elements outside the rounding bound, first [{i}] "
            f"{x.flatten()[i].item()!r} vs {exact.flatten()[i].item()!r}")


def _rank_all_reduce(ctx, seed, store_path, backend, impl):
    import ccl.backend

    _init(ctx, store_path, backend, impl)
    try:
        before = ccl.backend.stats()
        assert before["impl"] == impl, before
        results: dict = {}
        expect = _all_reduce_cases(ctx, seed, results)
        after = ccl.backend.stats()
        assert after["mailbox_all_reduce"] - before["mailbox_all_reduce"] == expect["mailbox"], \
            (before, after, expect)
        assert after["delegated_all_reduce"] - before["delegated_all_reduce"] == \
            expect["delegated"], (before, after, expect)
        assert after["hierarchical_all_reduce"] == 0, after
        return results
    finally:
        _done()


def _rank_collectives(ctx, seed, store_path, impl):
    """Everything but all_reduce goes to the wrapped backend and keeps working."""
    import torch.distributed as dist

    import ccl.backend

    _init(ctx, store_path, "mbx", impl)
    try:
        w, r = ctx.world, ctx.rank
        xs = [gen(seed, ("c", k), (5, 3), torch.float32) for k in range(w)]
        dist.barrier()
        # broadcast from the last rank
        b = xs[r].clone()
        dist.broadcast(b, src=w - 1)
        assert bits_equal(b, xs[w - 1]), "broadcast"
        # all_gather (list) and all_gather_into_tensor
        outs = [torch.full((5, 3), float("nan")) for _ in range(w)]
        dist.all_gather(outs, xs[r])
        assert all(bits_equal(o, x) for o, x in zip(outs, xs)), "all_gather"
        flat = torch.full((w * 5, 3), float("nan"))
        dist.all_gather_into_tensor(flat, xs[r])
        assert bits_equal(flat, torch.cat(xs)), "all_gather_into_tensor"
        # reduce_scatter: rank r gets the sum over ranks of everyone's chunk r
        chunks = [[gen(seed, ("rs", src, k), (7,), torch.float32) for k in range(w)]
                  for src in range(w)]
        out = torch.full((7,), float("nan"))
        dist.reduce_scatter(out, chunks[r])
        d = _close(out, [chunks[s][r] for s in range(w)])
        assert d is None, f"reduce_scatter: {d}"
        # send / recv around a ring
        nxt, prv = (r + 1) % w, (r - 1) % w
        got = torch.full((5, 3), float("nan"))
        if r % 2 == 0:
            dist.send(xs[r], nxt)
            dist.recv(got, prv)
        else:
            dist.recv(got, prv)
            dist.send(xs[r], nxt)
        assert bits_equal(got, xs[prv]), "send/recv"
        # object collectives ride on the CPU backend too
        objs = [None] * w
        dist.all_gather_object(objs, {"rank": r})
        assert objs == [{"rank": k} for k in range(w)], objs
        # new_group: a default-backend (mbx) subgroup with its own mailboxes, and a gloo one
        members = [0, w - 1]
        sub = dist.new_group(members)
        gloo = dist.new_group(members, backend="gloo")
        results: dict = {}
        if r in members:
            before = ccl.backend.stats(sub)
            expect = _all_reduce_cases(ctx, seed, results, group=sub, tag="sub ")
            after = ccl.backend.stats(sub)
            assert after["mailbox_all_reduce"] - before["mailbox_all_reduce"] == \
                expect["mailbox"], (before, after)
            x = torch.ones(3) * (r + 1)
            dist.all_reduce(x, group=gloo)
            assert torch.equal(x, torch.full((3,), float(1 + w))), x
            assert dist.get_backend(gloo) == "gloo"
            with pytest.raises(ValueError):
                ccl.backend.stats(gloo)
        dist.barrier()
        s = ccl.backend.stats()
        if impl == "c10d":  # barrier, broadcast, 2 all_gathers, reduce_scatter, send, recv, ...
            assert s["delegated_other"] >= 7, s
        return results
    finally:
        _done()


def _rank_device_maps(ctx, seed, store_path):
    """'cpu:mbx' is the mailbox backend for CPU; 'cpu:gloo,cuda:mbx' and 'cpu:gloo,xpu:mbx'
    leave CPU tensors to gloo (the mbx backend serves the accelerator, absent here)."""
    import torch.distributed as dist

    import ccl.backend

    out = {}
    for i, backend in enumerate(["cpu:mbx", "cpu:gloo,cuda:mbx", "cpu:gloo,xpu:mbx"]):
        _init(ctx, f"{store_path}.{i}", backend, "c10d")
        try:
            p = [gen(seed, (backend, k), (300,), torch.bfloat16) for k in range(ctx.world)]
            x = p[ctx.rank].clone()
            dist.all_reduce(x)
            s = ccl.backend.stats()
            if backend == "cpu:mbx":
                assert first_diff(x, ref_sum(p)) is None
                assert s["mailbox_all_reduce"] == 1, s
            else:  # CPU went to the group's gloo, not through mbx
                assert _close(x, p) is None
                assert s["mailbox_all_reduce"] == 0 and s["delegated_all_reduce"] == 0, s
                assert dist.get_process_group_ranks(dist.group.WORLD) == list(range(ctx.world))
            out[backend] = digest(x)
        finally:
            _done()
    return out


def _rank_nodes(ctx, seed, store_path, layout, impl):
    """Several 'nodes' on this machine (CCL_NODE_ID): hierarchical all-reduce."""
    import torch.distributed as dist

    import ccl.backend

    _init(ctx, store_path, "mbx", impl, node=f"node{layout[ctx.rank]}")
    try:
        results = {}
        n = ctx.world
        for numel, dt in [(1, "float32"), (1000, "bfloat16"), (4096, "float32"),
                          (CAPACITY // 4 + 3, "float32")]:
            dtype = getattr(torch, dt)
            for op in ("sum", "avg"):
                p = [gen(seed, ("n", numel, dt, op, k), (numel,), dtype) for k in range(n)]
                x = p[ctx.rank].clone()
                dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.AVG)
                d = _close(x, p, avg=op == "avg")
                assert d is None, f"layout {layout} {op} {dt} numel={numel}: {d}"
                results[f"{op} {dt} {numel}"] = digest(x)
        import torch.distributed._functional_collectives as fc

        y = fc.all_reduce(torch.full((10,), float(ctx.rank)), "sum",
                                                    dist.group.WORLD)
        assert torch.equal(y, torch.full((10,), float(sum(range(n))))), y
        s = ccl.backend.stats()
        assert s["hierarchical_all_reduce"] == 7 and s["delegated_all_reduce"] == 2, s
        assert s["mailbox_all_reduce"] == 0, s
        # every other collective still spans all nodes
        objs = [None] * n
        dist.all_gather_object(objs, os.environ["CCL_NODE_ID"])
        assert objs == [f"node{layout[k]}" for k in range(n)], objs
        return results
    finally:
        _done()


def _rank_mismatch(ctx, store_path):
    """Ranks passing different shapes get an error naming both calls; the group survives."""
    import torch.distributed as dist

    _init(ctx, store_path, "mbx", "c10d")
    try:
        x = torch.ones(4 + ctx.rank)
        try:
            dist.all_reduce(x)
        except ValueError as e:
            msg = str(e)
        else:
            raise AssertionError("no error for mismatched all_reduce shapes")
        y = torch.ones(8)
        dist.all_reduce(y)
        assert torch.equal(y, torch.full((8,), float(ctx.world)))
        return msg
    finally:
        _done()


def _rank_timeout(ctx, store_path, absent: int, timeout_s: float):
    """Rank ``absent`` skips an all_reduce: the others get DistBackendError naming it, and the
    group stays broken for mailbox calls afterwards."""
    import time

    import torch.distributed as dist

    os.environ["CCL_TIMEOUT_S"] = str(timeout_s)
    try:
        _init(ctx, store_path, "mbx", "c10d")
    finally:
        del os.environ["CCL_TIMEOUT_S"]
    try:
        if ctx.rank == absent:
            time.sleep(timeout_s + 1)
            return None
        errors = []
        for _ in range(2):
            t0 = time.monotonic()
            try:
                dist.all_reduce(torch.ones(16))
            except dist.DistBackendError as e:
                errors.append((str(e), time.monotonic() - t0))
        return errors
    finally:
        _done()


# ====================================================================== tests
def _cross_rank(res: list[dict], what: str) -> None:
    for r, d in enumerate(res[1:], start=1):
        assert d.keys() == res[0].keys(), what
        for k, v in d.items():
            assert v == res[0][k], f"{what}: {k}: rank {r} differs from rank 0 bitwise"


def test_import_registers_backend():
    """``import ccl`` alone makes "mbx" known to torch.distributed."""
    code = ("import torch.distributed as d, ccl; "
            "assert 'mbx' in d.Backend.backend_list, d.Backend.backend_list; "
            "import ccl.backend as b; b.register(); b.register()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cpp_extension_is_built():
    """The build produced ccl._C_torch for this torch (otherwise the fallback WARNING)."""
    from ccl import _C_torch

    assert _C_torch.TORCH_VERSION == torch.__version__


@pytest.mark.timeout(150)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"w{w}")
def test_all_reduce(bare_pools, tmp_path, seed, world, impl):
    if impl == "python" and world == 3:
        pytest.skip("one world size is enough for the fallback")
    res = bare_pools(world).run(_rank_all_reduce, seed, str(tmp_path / "store"), "mbx", impl,
                                note=f"seed={seed}")
    _cross_rank(res, f"all_reduce w{world} {impl}")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"w{w}")
def test_other_collectives(bare_pools, tmp_path, seed, world, impl):
    if impl == "python" and world == 3:
        pytest.skip("one world size is enough for the fallback")
    res = bare_pools(world).run(_rank_collectives, seed, str(tmp_path / "store"), impl,
                                note=f"seed={seed}")
    members = [res[0], res[-1]]
    _cross_rank(members, f"subgroup all_reduce w{world} {impl}")


@pytest.mark.timeout(150)
def test_device_maps(bare_pools, tmp_path, seed):
    res = bare_pools(2).run(_rank_device_maps, seed, str(tmp_path / "store"), note=f"seed={seed}")
    _cross_rank(res, "device maps")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("impl", IMPLS)
def test_two_nodes(bare_pools, tmp_path, seed, impl):
    """2 "nodes" of 2 ranks (contiguous, then interleaved), and 3 + 1 ranks."""
    layouts = [(0, 0, 1, 1), (0, 1, 0, 1), (0, 0, 0, 1)]
    if impl == "python":
        layouts = layouts[:1]
    pool = bare_pools(4)
    for i, layout in enumerate(layouts):
        res = pool.run(_rank_nodes, seed, str(tmp_path / f"store{i}"), layout, impl,
                       note=f"seed={seed} layout={layout}")
        _cross_rank(res, f"nodes {layout} {impl}")


@pytest.mark.timeout(60)
def test_mismatched_shapes_raise(bare_pools, tmp_path):
    msgs = bare_pools(2).run(_rank_mismatch, str(tmp_path / "store"))
    for m in msgs:
        assert "numel=4" in m and "numel=5" in m and "same call" in m, m


@pytest.mark.timeout(60)
def test_timeout_names_missing_rank(bare_pools, tmp_path):
    res = bare_pools(2).run(_rank_timeout, str(tmp_path / "store"), 1, 1.5)
    (first, waited), (second, again) = res[0]
    assert "waiting for rank(s) [1]" in first and "timed out after" in first, first
    assert 1.0 < waited < 20, waited
    assert second == first and again < 1.0, (second, again)  # broken: fails fast
