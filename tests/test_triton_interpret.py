"""The Triton mailbox kernels (ccl/kernels/triton_mailbox.py) under TRITON_INTERPRET=1, with
2 and 3 real processes whose "device memory" is host shared memory.

Each rank is a spawned process; its mailbox region is a memfd (ccl._C.host.shm_create)
and the peers' regions are mapped from fds passed over SCM_RIGHTS (ccl.rendezvous.exchange_fds
through a FileStore). The pointer table handed to the kernels holds these host addresses:
the interpreter loads and stores through raw addresses, so the same kernels that run on a GPU
run here unchanged (docs/TRITON.md lists what the interpreter could not run).

Checked against ccl/kernels/reference.py with fresh random inputs (the seed is drawn per run
and printed on failure), poisoned outputs, bitwise equality across ranks and between one-shot
and two-shot, a few hundred calls with varying sizes and grids, sequence-number wraparound
(seq seeded near 2^31 and 2^32, scrub checked in memory), header mismatches, and the timeout
path (one rank skips a call; the others' kernels exit and name it).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import time
import traceback

import pytest
import torch

CAP = 2048  # mailbox capacity in bytes: keeps the interpreter fast
TIMEOUT_S = 240.0

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------- worker side
class _ShmRegion:
    """A rank's "device" region in host shared memory (memfd), and its peers' mappings."""

    def __init__(self, world, rank, nbytes):
        from ccl import _C

        fd, addr, _ = _C.host.shm_create(f"ccl-dev-r{rank}", nbytes)
        self.fd, self.nbytes, self.rank = fd, nbytes, rank
        self.bases = [0] * world
        self.bases[rank] = addr

    def import_peer(self, peer, fd):
        from ccl import _C

        try:
            assert _C.host.fd_size(fd) == self.nbytes
            self.bases[peer] = _C.host.shm_map(fd, self.nbytes)
        finally:
            os.close(fd)

    def close(self):
        from ccl import _C

        for i, addr in enumerate(self.bases):
            if addr:
                _C.host.shm_unmap(addr, self.nbytes)
                self.bases[i] = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _setup(rank, world, store_path, tag, backend=None, cap=CAP):
    from ccl.device_mailbox import DeviceMailbox
    from ccl.rendezvous import StoreExchange, exchange_fds

    store = torch.distributed.FileStore(store_path, world)
    ex = StoreExchange(store, rank, world, f"ccl-test/{tag}")
    region = _ShmRegion(world, rank, DeviceMailbox.region_bytes(world, cap))
    DeviceMailbox.init_region(region.bases[rank], region.nbytes, "cpu")  # before the fd leaves
    for peer, fd in exchange_fds(ex, region.fd, timeout_s=60).items():
        region.import_peer(peer, fd)
    # Interpreter spins cost ~0.1 ms: a generous bound, so a loaded CI machine never trips it.
    mb = DeviceMailbox(rank, world, region.bases, cap, "cpu", timeout=TIMEOUT_S, backend=backend)
    return ex, region, mb


def _gen(seed, call, rank):
    return torch.Generator().manual_seed((seed * 1_000_003 + call * 101 + rank) % (1 << 62))


def _rand(g, shape, dtype):
    return (torch.randn(shape, generator=g) * 2).to(dtype)


def _poison(t):
    t.fill_(float("nan"))
    return t


def _tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


def _digest(*ts):
    h = hashlib.sha1()
    for t in ts:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run_ops(rank, world, seed, mb, n_calls, digests):
    """A random schedule (identical on every rank) of every op, dtype, algorithm, size and
    grid; every result checked against the reference; digests for the cross-rank check."""
    from ccl.kernels.reference import (
        add_rms_norm_reference_parts,
        all_reduce_reference,
        qk_rms_norm_reference,
    )

    sched = random.Random(seed)
    for call in range(n_calls):
        op = sched.choice(["ar", "ar", "norm", "norm", "qk"])
        dtype = sched.choice(_DTYPES)
        esize = torch.tensor([], dtype=dtype).element_size()
        mb.max_block = sched.choice([32, 64, 128, 1024])  # varies the grid between calls
        mb.fast_poll = sched.random() < 0.5  # and the poll variant (one-reduction polls)
        g = [_gen(seed, call, r) for r in range(world)]
        if op == "ar":
            numel = sched.randint(1, CAP // esize)
            parts = [_rand(g[r], (numel,), dtype) for r in range(world)]
            ref = all_reduce_reference(parts)
            x = parts[rank].clone()
            outs = []
            for algo in ("one_shot", "two_shot"):
                inplace = sched.random() < 0.3
                out = x.clone() if inplace else _poison(torch.empty_like(x))
                got = mb.all_reduce(out if inplace else x, None if inplace else out, algorithm=algo)
                assert torch.equal(got, ref), (call, algo, dtype, numel, (got - ref).abs().max())
                outs.append(got)
            assert torch.equal(x, parts[rank])
            digests.append(_digest(outs[0]))
        elif op == "norm":
            epw = 4 // esize
            cols = sched.randint(1, (CAP // esize) // 2)
            wpr = (cols + epw - 1) // epw
            rows = sched.randint(1, min(4, mb.layout.cap_words // wpr))
            has_res = sched.random() < 0.75
            gemma = sched.random() < 0.3
            alias = sched.random() < 0.4
            eps = sched.choice([1e-6, 1e-5])
            parts = [_rand(g[r], (rows, cols), dtype) for r in range(world)]
            residual = _rand(g[0], (rows, cols), dtype) if has_res else None  # same on all ranks
            weight = _rand(g[0], (cols,), dtype)
            ref_o, ref_r = add_rms_norm_reference_parts(parts, residual, weight, eps, gemma=gemma)
            results = []
            for algo in ("one_shot", "two_shot"):
                x = parts[rank].clone()
                res = residual.clone() if has_res else None
                if alias:
                    out, res_out = x, (res if has_res else _poison(torch.empty_like(x)))
                else:
                    out, res_out = _poison(torch.empty_like(x)), _poison(torch.empty_like(x))
                o, r = mb.add_rms_norm(
                    x, res, weight, eps, gemma=gemma, out=out, residual_out=res_out, algorithm=algo
                )
                assert o is out and r is res_out
                assert torch.equal(r, ref_r), (call, algo, dtype, rows, cols)
                torch.testing.assert_close(
                    o.float(),
                    ref_o.float(),
                    rtol=_tol(dtype),
                    atol=_tol(dtype),
                    msg=lambda m: f"{call} {algo}: {m}",
                )
                results.append((o.clone(), r.clone()))
            assert torch.equal(results[0][0], results[1][0]), "one-shot != two-shot (norm)"
            digests.append(_digest(*results[0]))
        else:
            tokens = sched.randint(1, 4)
            qc = sched.randint(1, 48)
            kc = sched.randint(1, 24)
            eps = 1e-6
            fused = [_rand(g[r], (tokens, qc + kc + 3), dtype) for r in range(world)]
            q_parts = [f[:, :qc] for f in fused]
            k_parts = [f[:, qc : qc + kc] for f in fused]
            q_ws = [_rand(_gen(seed, call, 100 + r), (qc,), dtype) for r in range(world)]
            k_ws = [_rand(_gen(seed, call, 200 + r), (kc,), dtype) for r in range(world)]
            ref_q, ref_k = qk_rms_norm_reference(q_parts, k_parts, q_ws, k_ws, eps)[rank]
            mine = fused[rank].clone()
            q, k = mine[:, :qc], mine[:, qc : qc + kc]
            if sched.random() < 0.3:
                q_out, k_out = q, k  # in place, strided
            else:
                q_out, k_out = (
                    _poison(torch.empty(tokens, qc, dtype=dtype)),
                    _poison(torch.empty(tokens, kc, dtype=dtype)),
                )
            qo, ko = mb.qk_rms_norm(q, k, q_ws[rank], k_ws[rank], eps, q_out=q_out, k_out=k_out)
            torch.testing.assert_close(
                qo.float(), ref_q.float(), rtol=_tol(dtype), atol=_tol(dtype)
            )
            torch.testing.assert_close(
                ko.float(), ref_k.float(), rtol=_tol(dtype), atol=_tol(dtype)
            )
            digests.append("qk")  # outputs are rank-local shards; checked against the reference
        mb.raise_if_failed()


def _region_words(addr, nbytes):
    import ctypes

    import numpy as np

    buf = (ctypes.c_int64 * (nbytes // 8)).from_address(addr)
    return torch.from_numpy(np.ctypeslib.as_array(buf))


def _run_wraparound(rank, world, seed, ex, region, mb, digests):
    """Calls across seq 2^31 (scrub of both phases) and 2^32 (32-bit flag wraps to 0)."""
    from ccl.kernels.reference import all_reduce_reference

    lay = mb.layout
    for start in ((1 << 31) - 3, (1 << 32) - 3):
        mb.set_seq(start)
        ex.all_gather(None)  # every rank seeded before anyone calls
        for i in range(6):
            seq = start + 1 + i
            numel = [5, 500, 3, 64, 1, 300][i]
            parts = [_rand(_gen(seed, seq, r), (numel,), torch.float32) for r in range(world)]
            out = _poison(torch.empty(numel))
            mb.all_reduce(parts[rank], out, algorithm="two_shot" if i % 2 else "one_shot")
            mb.raise_if_failed()
            assert torch.equal(out, all_reduce_reference(parts)), (seq, numel)
            assert mb.seq == seq
            digests.append(_digest(out))
            if seq & ((1 << 31) - 1) < 2:
                # Scrub: every peer rewrote the unused tail of its slots in our region with
                # this call's flag (checked after everyone finished the call).
                ex.all_gather(None)
                words = _region_words(region.bases[rank], lay.region_bytes)
                flag = seq & 0xFFFFFFFF
                phase = seq & 1
                for src in range(world):
                    if src == rank:
                        continue
                    s1 = lay.hop1_offset // 8 + (phase * world + src) * lay.slot_words
                    tail = words[s1 + 16 + numel : s1 + lay.slot_words]
                    assert bool(((tail >> 32) & 0xFFFFFFFF).eq(flag).all()), ("hop1 scrub", src)
                    s2 = lay.hop2_offset // 8 + (phase * world + src) * lay.hop2_words
                    h2 = words[s2 : s2 + lay.hop2_words]
                    assert bool(((h2 >> 32) & 0xFFFFFFFF).eq(flag).all()), ("hop2 scrub", src)
                ex.all_gather(None)


def _run_mismatch(rank, world, mb):
    """Ranks disagree on the size: every rank raises CollectiveMismatch, outputs untouched,
    and the mailbox stays usable."""
    from ccl.errors import CollectiveMismatch

    numel = 16 + rank  # differs on every rank
    x = torch.ones(numel)
    out = _poison(torch.empty(numel))
    mb.all_reduce(x, out)
    with pytest.raises(CollectiveMismatch) as e:
        mb.raise_if_failed()
    assert e.value.peer != rank
    assert "numel=" in str(e.value)
    assert bool(out.isnan().all()), "outputs written despite a mismatch"
    x = torch.full((40,), float(rank + 1))
    mb.all_reduce(x)
    mb.raise_if_failed()
    assert bool((x == world * (world + 1) / 2).all())


def _worker(rank, world, store_path, seed, scenario, q):
    try:
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)
        if scenario == "ops":
            digests: list[str] = []
            ex, region, mb = _setup(rank, world, store_path, "ops")
            _run_ops(
                rank,
                world,
                seed,
                mb,
                n_calls=int(os.environ.get("CCL_TEST_CALLS", "60")),
                digests=digests,
            )
            _run_wraparound(rank, world, seed, ex, region, mb, digests)
            _run_mismatch(rank, world, mb)
            # The XPU publish/poll variants (cache modifiers and fences, atomic polling) on the
            # same wire: the interpreter runs their code paths in ccl/kernels/ll.py.
            ex2, region2, mb2 = _setup(rank, world, store_path, "xpu", backend="xpu")
            _run_ops(rank, world, seed + 1, mb2, n_calls=5, digests=digests)
            mb2.backend = __import__("ccl.kernels.ll", fromlist=["x"]).backend_for(
                "cpu", "xpu_atomic"
            )
            _run_ops(rank, world, seed + 2, mb2, n_calls=4, digests=digests)
            every = ex.all_gather(digests)
            for r, d in enumerate(every):
                assert d == digests, f"rank {r}'s results differ from rank {rank}'s"
            # Everybody done before any region goes away.
            ex.all_gather(None)
            for m, reg in ((mb, region), (mb2, region2)):
                m.close()
                reg.close()
            q.put((rank, "ok", mb and len(digests)))
        elif scenario == "timeout":
            from ccl.errors import CollectiveTimeout

            ex, region, mb = _setup(rank, world, store_path, "timeout")
            x = torch.ones(100)
            mb.all_reduce(x)
            mb.raise_if_failed()
            assert bool((x == world).all())
            skipper = world - 1
            ex.all_gather(None)
            if rank != skipper:
                mb.set_timeout(0.3)
                t0 = time.monotonic()
                # the same algorithm on every rank (one-shot with 2 ranks, two-shot with 3)
                mb.all_reduce(torch.ones(100), algorithm="one_shot" if world == 2 else "two_shot")
                with pytest.raises(CollectiveTimeout) as e:
                    mb.raise_if_failed()
                took = time.monotonic() - t0
                assert e.value.missing_ranks == [skipper], e.value.missing_ranks
                assert e.value.rank == rank and f"rank(s) [{skipper}]" in str(e.value)
                q.put((rank, "ok", took))
            else:
                q.put((rank, "ok", 0.0))
            ex.all_gather(None)
            mb.close()
            region.close()
        else:
            raise ValueError(scenario)
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", traceback.format_exc()))


def _spawn(world, scenario, tmp_path, timeout_s=270):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    seed = random.SystemRandom().randrange(1 << 30)
    store_path = str(tmp_path / f"store-{scenario}-{world}")
    procs = [
        ctx.Process(target=_worker, args=(r, world, store_path, seed, scenario, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"seed {seed}: ranks {sorted(set(range(world)) - set(results))} "
                    f"did not finish in {timeout_s}s (hang?)"
                )
            try:
                rank, status, detail = q.get(timeout=min(left, 5.0))
            except Exception:  # queue.Empty
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and len(results) < world and q.empty():
                    raise AssertionError(f"seed {seed}: rank(s) {dead} died") from None
                continue
            if status != "ok":
                raise AssertionError(f"seed {seed}, rank {rank}:\n{detail}")
            results[rank] = detail
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def world_size(request):
    return request.param


def test_ll_variant_names():
    """CCL_LL_VARIANT / backend= names map to the kernels' BACKEND codes; an unknown name is
    refused with the list of valid ones (not silently replaced by the default)."""
    pytest.importorskip("triton")
    from ccl.kernels import ll

    assert ll.backend_for("cuda", "cuda_xchg") == ll.BACKEND_CUDA_XCHG.value
    assert ll.backend_for("xpu", None) == ll.BACKEND_XPU.value
    assert ll.backend_for("cpu", None) == ll.BACKEND_INTERPRET.value
    with pytest.raises(ValueError, match="unknown LL backend variant 'bogus'.*cuda_fenced"):
        ll.backend_for("cuda", "bogus")


def test_device_layout():
    from ccl.device_mailbox import DeviceLayout

    for world in (1, 2, 3, 8):
        for cap in (1, 8, 1000, 4096, 1 << 20):
            lay = DeviceLayout.make(world, cap)
            assert lay.cap_words * 4 >= cap
            assert lay.slot_words >= 16 + lay.cap_words and lay.slot_words % 16 == 0
            assert lay.hop2_words >= 2 * ((lay.cap_words + world - 1) // world)
            assert lay.hop2_words % 16 == 0 and lay.hop1_offset % 128 == 0
            end = lay.hop2_offset + 8 * 2 * world * lay.hop2_words
            assert lay.hop2_offset == lay.hop1_offset + 8 * 2 * world * lay.slot_words
            assert end <= lay.region_bytes and lay.region_bytes % 4096 == 0


def test_ops_wraparound_mismatch(world_size, tmp_path):
    _spawn(world_size, "ops", tmp_path)


def test_timeout_names_the_missing_rank(world_size, tmp_path):
    took = _spawn(world_size, "timeout", tmp_path)
    assert max(took.values()) < 60, took


def _compile_check(args, env=None):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_compile_check.py")
    env = dict(os.environ, **(env or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_kernels_compile_for_cuda():
    """What the interpreter accepts must also compile for a GPU: every kernel, ahead of time,
    for sm_90 with Triton's bundled ptxas (no GPU or driver needed)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("this Triton has no bundled ptxas (no NVIDIA backend)")
    r = _compile_check(["--quick", "--target", "cuda:90"])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    import json

    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows and all(row["ok"] for row in rows)
    # Publishes are strong system-scope stores and polls volatile loads (ccl/kernels/ll.py).
    assert all(row["st_relaxed_sys"] > 0 and row["ld_volatile"] > 0 for row in rows), rows
    # Every spin loop's exit is agreed across warps (ll.all_warps_max): a block replicated
    # across warps polled per warp made warps leave a loop at different polls on 2x H200.
    assert all(row["warp_max"] > 0 for row in rows), rows


@pytest.mark.skipif(
    not os.environ.get("CCL_TRITON_XPU_PATH"),
    reason="set CCL_TRITON_XPU_PATH to a directory holding the triton-xpu wheel's "
    "package (pip install --target DIR triton-xpu==3.3.0b1)",
)
def test_kernels_compile_to_spirv():
    """Every kernel compiles to SPIR-V with Intel's Triton, without an XPU (docs/TRITON.md)."""
    r = _compile_check(
        ["--quick", "--target", "xpu"], env={"PYTHONPATH": os.environ["CCL_TRITON_XPU_PATH"]}
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def test_pdl_kwargs_only_where_asked_and_supported(monkeypatch):
    """Programmatic dependent launch is opt-in (CCL_PDL=1), CUDA sm_90+ only, and only for
    kernels that take the PDL constexpr (the others launch as before)."""
    import torch

    from ccl.kernels import ll
    from ccl.kernels import triton_fused_linear as F
    from ccl.kernels import triton_mailbox as K
    from ccl.kernels.triton_route import route_topk_kernel

    cuda = torch.device("cuda", 0)
    assert ll.pdl_kwargs(K.all_reduce_kernel, torch.device("cpu")) == {}
    ll._pdl_device.cache_clear()
    monkeypatch.setenv("CCL_PDL", "0")
    assert ll.pdl_kwargs(K.all_reduce_kernel, cuda) == {}  # (not asked: no device query)
    ll._pdl_device.cache_clear()
    monkeypatch.setattr(ll, "_pdl_device", lambda index: True)  # as on an sm_90 GPU
    for k in (K.all_reduce_kernel, K.add_rms_norm_kernel, K.qk_rms_norm_kernel,
              F.linear_add_rms_norm_kernel, F.linear_qk_rms_norm_kernel, F.linear_kernel,
              F.moe_gate_up_kernel):
        assert ll.pdl_kwargs(k, cuda) == {"PDL": True, "launch_pdl": True}, k
    assert ll.pdl_kwargs(route_topk_kernel, cuda) == {}
    assert ll.pdl_kwargs(K.all_reduce_kernel, torch.device("cpu")) == {}
