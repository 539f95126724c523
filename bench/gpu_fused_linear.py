#!/usr/bin/env python3
"""Fused row-parallel linear + all-reduce + residual-add + RMSNorm on 2 GPUs: correctness
and timing under CUDA-graph replay (issue 5).

    python3 bench/gpu_fused_linear.py --out $OUT          # 2x H200, one rank per GPU
    python3 bench/gpu_fused_linear.py --cpu-dry-run       # here: interpreter + gloo, tiny

Cases: weights bf16 (nn.Linear layout ``[N, K]``, passed as ``.t()``) and INT4 (GPTQ
symmetric, group 128 and group 32, bf16 scales), M in {1, 8} tokens, K_total = 3072 split
over the ranks (row-parallel: K = 1536 per rank), N = 3072, bf16 activations.

Per case:
  a) correctness, eager and inside a replayed CUDA graph (fresh random inputs before every
     call / replay, outputs poisoned with NaN before it): against an fp32 reference
     (dequantise, x_r @ W_r in fp32, all-reduce in fp32, + residual, RMSNorm), and bitwise
     equality of both outputs across ranks (all_gather);
  b) timing (CUDA events around replays of a graph of ``--n-inner`` calls, ``--rounds``
     replays; microseconds per call, median): (i) ccl ``linear_all_reduce_add_rms_norm``
     (default tiles; variants of them through ``device_linear_add_rms_norm``), (ii) baseline torch F.linear + NCCL all_reduce (bf16) + torch add +
     RMSNorm (INT4: torch has no INT4 GEMV, so F.linear on the pre-dequantised bf16 weight),
     (iii) the GEMV alone (``device_linear_partial``: the fused kernel's GEMV tiles, same
     blocks, fp32 out) and our plain all-reduce alone (``comm.all_reduce`` of an [M, N]
     tensor: fp32, which is what the fused kernel pushes, and bf16 for reference) and the
     sum GEMV + fp32 all-reduce.
Bars: fused / baseline <= 0.3 and fused / (GEMV + all-reduce) <= 1.0.

Writes ``h200x2-fused-linear.json`` (``cpu-dry-run-fused-linear.json`` for the dry run) in
``--out`` (default $OUT, else bench/results). Exit status: 0 all correct, 1 a rank failed
or a correctness check failed (timing bars are reported, not enforced). Every wait is
bounded: a rank that fails prints its traceback and the run stops within ``--timeout``.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are forced here and in the ranks).
"""

from __future__ import annotations

import os

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_k] = _v

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

EPS = 1e-6
T0 = time.time()
# (block_n, block_k) of the fused kernel; the first is the library default (fused_linear.py).
# Tile variants of the fused kernel around the library's defaults for each (M, weights)
# (ccl.fused_linear.gemv_tiles); "default" goes through the public API.
# "split<P>" (e.g. split1, split4): the default tiles with P epilogue programs per row
# (ccl.fused_linear.epilogue_split; "default" takes CCL_FUSED_EPILOGUE_SPLIT or the library's
# choice), for sweeping it: --variants default,split1,split2,split4,split8.
BLOCKS = ("default", "warps8", "bn_half")
DRY_BLOCKS = ("default", "bn_half", "split1", "split3", "counter", "direct",
              "direct_split3")


def variant_handoff(variant):
    """``counter`` / ``direct`` (optionally ``direct_split<P>``): the default tiles with that
    handoff (ccl.fused_linear CCL_FUSED_HANDOFF), for the A/B in one run; else None (the
    library's)."""
    head = variant.split("_")[0]
    return head if head in ("counter", "direct") else None


def variant_split(variant):
    """Epilogue programs per row of a ``split<P>`` (or ``direct_split<P>``) variant, else None
    (the library's)."""
    last = variant.split("_")[-1]
    return int(last[5:]) if last.startswith("split") else None


def variant_tiles(variant, m, int4):
    """GemvTiles of a named variant (None: the library default)."""
    import dataclasses

    from ccl.fused_linear import gemv_tiles

    t = gemv_tiles(m, int4)
    if variant == "default" or variant_split(variant) is not None or variant_handoff(variant):
        return None
    if variant == "warps8":
        return dataclasses.replace(t, num_warps=8)
    if variant == "bk_half":
        return dataclasses.replace(t, bk=max(32, t.bk // 2))
    if variant == "bn_half":
        return dataclasses.replace(t, bn=max(16 if t.use_dot else 8, t.bn // 2))
    if variant.startswith(("bk", "bn", "w", "st")):  # e.g. bk512, bk512_bn32, bn16_st3
        dims = dict(bk=t.bk, bn=t.bn, w=t.num_warps, st=t.stages)
        for part in variant.split("_"):
            key = part.rstrip("0123456789")
            dims[key] = int(part[len(key):])
        # tl.dot needs 16 columns: a narrower bn applies to the row path only
        return dataclasses.replace(t, bk=dims["bk"], num_warps=dims["w"], stages=dims["st"],
                                   bn=max(16, dims["bn"]) if t.use_dot else dims["bn"])
    raise ValueError(variant)
# bf16 outputs vs the fp32 reference: |got - ref| <= ATOL + RTOL * |ref|. A bf16 ulp is 2^-7
# relative at worst; the kernel's fp32 partials are summed in another order than the
# reference's matmul, so a result may round to the neighbouring bf16 value: 2 ulps of slack.
RTOL, ATOL = 2.0 ** -6, 1e-2


def log(rank, msg, every_rank=False):
    if rank == 0 or every_rank:
        print(f"[{time.time() - T0:7.1f}s r{rank}] {msg}", flush=True)


# ============================================================================ ops per mode
class GpuOps:
    """The public ccl entry points on a CUDA Communicator."""

    @staticmethod
    def make(comm, dev):
        ops = GpuOps.__new__(GpuOps)
        ops.comm, ops.dm, ops.dev = comm, comm._device_mailbox, dev
        return ops

    def fused(self, x, w, q, res, nw, out, res_out, blocks):
        from ccl.fused_linear import device_linear_add_rms_norm, linear_all_reduce_add_rms_norm

        if blocks == "default":  # the public API (its default tiles)
            linear_all_reduce_add_rms_norm(self.comm, x, w, res, nw, EPS, quant=q, out=out,
                                           residual_out=res_out)
        else:
            device_linear_add_rms_norm(self.dm, x, w, q, res, nw, EPS, out=out,
                                       residual_out=res_out,
                                       tiles=variant_tiles(blocks, x.shape[0], q is not None),
                                       epi_split=variant_split(blocks),
                                       handoff=variant_handoff(blocks))

    def gemv(self, x, w, q, out, blocks, launch=None):
        from ccl.fused_linear import device_linear_partial

        device_linear_partial(x, w, quant=q, out=out,
                              tiles=variant_tiles(blocks, x.shape[0], q is not None),
                              launch=launch)

    def all_reduce(self, t, out):
        self.comm.all_reduce(t, out=out)

    def check(self):
        self.comm.synchronize()


class MailboxOps(GpuOps):
    """The same kernels straight on a DeviceMailbox: the dry run's (Triton interpreter on host
    shared memory; a CPU Communicator would run the C++ host path instead), and the CUDA
    fallback should ``ccl.Communicator(device=cuda)`` fail (recorded as ``comm_error``)."""

    @staticmethod
    def make(dm, dev):
        ops = MailboxOps.__new__(MailboxOps)
        ops.comm, ops.dm, ops.dev = None, dm, dev
        return ops

    def fused(self, x, w, q, res, nw, out, res_out, blocks):
        from ccl.fused_linear import device_linear_add_rms_norm

        device_linear_add_rms_norm(self.dm, x, w, q, res, nw, EPS, out=out, residual_out=res_out,
                                   tiles=variant_tiles(blocks, x.shape[0], q is not None),
                                   epi_split=variant_split(blocks),
                                   handoff=variant_handoff(blocks))

    def all_reduce(self, t, out):
        self.dm.all_reduce(t, out)

    def check(self):
        self.dm.raise_if_failed()


class _ShmRegion:
    """Dry run: a rank's "device" region in host shared memory, and its peers' mappings."""

    def __init__(self, world, rank, nbytes, store):
        from ccl import _C
        from ccl.device_mailbox import DeviceMailbox
        from ccl.rendezvous import StoreExchange, exchange_fds

        fd, addr, _ = _C.host.shm_create(f"ccl-fl-r{rank}", nbytes)
        self.fd, self.nbytes = fd, nbytes
        self.bases = [0] * world
        self.bases[rank] = addr
        DeviceMailbox.init_region(addr, nbytes, "cpu")  # before the fd leaves
        ex = StoreExchange(store, rank, world, "gpu-fused-linear/dry", timeout_s=60)
        for peer, pfd in exchange_fds(ex, fd, timeout_s=60).items():
            try:
                self.bases[peer] = _C.host.shm_map(pfd, nbytes)
            finally:
                os.close(pfd)

    def close(self):
        from ccl import _C

        for i, addr in enumerate(self.bases):
            if addr:
                _C.host.shm_unmap(addr, self.nbytes)
                self.bases[i] = 0
        os.close(self.fd)


# ============================================================================ cases
class Case:
    """One (weights, M) case on one rank: this rank's shard and the shared tensors, in
    buffers that graphs capture (refilled in place for every check)."""

    def __init__(self, kind, m, k, n, rank, world, dev, seed):
        import torch

        from ccl.fused_linear import Int4Weights

        self.kind, self.m, self.k, self.n = kind, m, k, n
        self.rank, self.world, self.dev = rank, world, dev
        bf = torch.bfloat16
        self.g = torch.Generator(device=dev).manual_seed(seed * 7919 + rank)  # per rank
        self.gs = torch.Generator(device=dev).manual_seed(seed * 7919 + 1000)  # shared
        scale = (k * world) ** -0.5
        w = torch.randn(n, k, generator=self.g, device=dev) * scale  # nn.Linear [N, K] shard
        if kind == "bf16":
            self.w_lin = w.to(bf).contiguous()  # F.linear's weight
            self.weight, self.quant = self.w_lin.t(), None  # ccl: [K, N] view (NK layout)
            self.w_ref = self.w_lin.float().t()  # [K, N] fp32, exact
        else:
            group = int(kind.split("g")[1])
            qc = Int4Weights.quantize(w.t().contiguous().cpu(), group, bf)  # CPU: any torch
            self.quant = Int4Weights(qc.qweight.to(dev), qc.scales.to(dev), group)
            self.weight = None
            self.w_ref = self.quant.dequantize(torch.float32)  # [K, N] fp32, exact
            self.w_lin = self.w_ref.t().to(bf).contiguous()  # baseline: pre-dequantised
        self.x = torch.empty(m, k, dtype=bf, device=dev)
        self.res = torch.empty(m, n, dtype=bf, device=dev)
        self.nw = torch.empty(n, dtype=bf, device=dev)
        self.out = torch.empty(m, n, dtype=bf, device=dev)
        self.res_out = torch.empty(m, n, dtype=bf, device=dev)
        self.partial = torch.empty(m, n, dtype=torch.float32, device=dev)
        self.ar32 = torch.randn(m, n, generator=self.g, device=dev)  # all-reduce operands:
        self.ar16 = torch.randn(m, n, generator=self.g, device=dev).to(bf)  # no garbage/NaN
        self.ar32_out, self.ar16_out = torch.empty_like(self.ar32), torch.empty_like(self.ar16)
        self.base_y = torch.zeros(m, n, dtype=bf, device=dev)
        self.refill()

    def refill(self):
        """Fresh inputs (x differs per rank; residual and norm weight are shared), poisoned
        outputs."""
        import torch

        bf = torch.bfloat16
        self.x.copy_(torch.randn(self.m, self.k, generator=self.g, device=self.dev).to(bf))
        self.res.copy_(torch.randn(self.m, self.n, generator=self.gs, device=self.dev).to(bf))
        self.nw.copy_((1 + 0.1 * torch.randn(self.n, generator=self.gs, device=self.dev)).to(bf))
        self.out.fill_(float("nan"))
        self.res_out.fill_(float("nan"))

    def reference(self):
        """fp32 (out, residual_out): x_r @ W_r in fp32, all-reduced in fp32 (2 ranks: the sum
        is exact and order-free), + residual, RMSNorm."""
        import torch
        import torch.distributed as dist

        p = self.x.float() @ self.w_ref
        dist.all_reduce(p)
        r = p + self.res.float()
        o = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * self.nw.float()
        return o, r

    def baseline(self):
        """torch GEMV + NCCL all-reduce (bf16, as a TP framework does) + add + RMSNorm."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        y = F.linear(self.x, self.w_lin)
        dist.all_reduce(y)
        r = y.float() + self.res.float()
        self.res_out.copy_(r)
        var = r.pow(2).mean(-1, keepdim=True)
        self.out.copy_(r * torch.rsqrt(var + EPS) * self.nw.float())


def compare(case, world, tag):
    """Errors vs the reference and cross-rank bitwise equality (collective)."""
    import torch
    import torch.distributed as dist

    ref_o, ref_r = case.reference()
    res = {}
    ok = True
    for name, got, ref in (("out", case.out, ref_o), ("residual_out", case.res_out, ref_r)):
        g = got.float()
        err = (g - ref).abs()
        bound = ATOL + RTOL * ref.abs()
        nan = int(torch.isnan(g).sum())
        bad = int((err > bound).sum()) + nan
        res[name] = dict(max_abs=float(err.nan_to_num(float("inf")).max()),
                         max_rel=float((err / ref.abs().clamp(min=1e-3)).nan_to_num(float("inf")).max()),
                         bad=bad, nan=nan)
        ok &= bad == 0
    both = torch.cat([case.out, case.res_out]).contiguous()
    parts = [torch.empty_like(both) for _ in range(world)]
    dist.all_gather(parts, both)
    same = all(torch.equal(parts[0].view(torch.int16), p.view(torch.int16)) for p in parts[1:])
    res["cross_rank_bitwise"] = same
    res["ok"] = bool(ok and same)
    if not res["ok"]:
        log(case.rank, f"  FAIL {tag}: {res}", every_rank=True)
    return res


# ============================================================================ timing
def time_graph(fn, n_inner, rounds, warm=2):
    """Median (and raw) microseconds per call: CUDA events around ``rounds`` replays of a
    graph of ``n_inner`` calls (gpu_validate.py's method)."""
    import torch
    import torch.distributed as dist

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture stream (lazy inits: cuBLAS, NCCL)
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_inner):
            fn()
    dist.barrier()
    torch.cuda.synchronize()
    for _ in range(3):
        g.replay()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
           for _ in range(rounds)]
    for a, b in evs:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    del g
    us = [a.elapsed_time(b) * 1000.0 / n_inner for a, b in evs]
    return dict(p50=round(statistics.median(us), 3), p10=round(sorted(us)[len(us) // 10], 3),
                rounds_us=[round(u, 3) for u in us])


def time_eager(fn, n_inner, rounds, warm=1):
    """Dry run: the same calls without graphs or events (wall clock; numbers meaningless)."""
    for _ in range(warm):
        fn()
    us = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n_inner):
            fn()
        us.append((time.perf_counter() - t0) * 1e6 / n_inner)
    return dict(p50=round(statistics.median(us), 3), p10=round(min(us), 3),
                rounds_us=[round(u, 3) for u in us])


def graph_correctness(case, ops, blocks, replays):
    """Capture one fused call over the case's buffers; before each replay refill the inputs
    and poison the outputs; compare after it."""
    import torch
    import torch.distributed as dist

    fn = lambda: ops.fused(case.x, case.weight, case.quant, case.res, case.nw,  # noqa: E731
                           case.out, case.res_out, blocks)
    fn()
    ops.check()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    results = []
    for i in range(replays):
        case.refill()
        torch.cuda.synchronize()
        dist.barrier()
        g.replay()
        ops.check()
        results.append(compare(case, case.world, f"{case.kind} M{case.m} graph replay {i}"))
    del g
    return results


# ============================================================================ one rank
def rank_main(rank, world, port, args, q):
    try:
        res = _rank(rank, world, port, args)
        q.put((rank, "ok", res))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the run
        tb = traceback.format_exc()
        print(f"[rank {rank}] FAILED:\n{tb}", flush=True)
        q.put((rank, "error", tb))


def _watchdog(rank, seconds):
    import faulthandler

    def fire():
        print(f"[rank {rank}] WATCHDOG: no finish after {seconds:.0f}s; stacks:", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def _rank(rank, world, port, args):
    import datetime

    dry = args.cpu_dry_run
    dog = _watchdog(rank, args.timeout - 10)
    import torch
    import torch.distributed as dist

    if dry:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
    else:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference in fp32
        torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, device_id=dev,
                                timeout=datetime.timedelta(seconds=60))
    import triton

    import ccl
    from ccl.device_mailbox import DeviceMailbox

    info = dict(world=world, torch=torch.__version__, triton=triton.__version__,
                device=("cpu (TRITON_INTERPRET=1, dry run)" if dry
                        else torch.cuda.get_device_name(dev)))
    seed_t = torch.tensor([int.from_bytes(os.urandom(3), "little") if rank == 0 else 0],
                          device=dev)
    dist.broadcast(seed_t, 0)
    seed = int(seed_t.item())
    info["seed"] = seed
    k_total, n = (256, 64) if dry else (args.k_total, args.n)
    k = k_total // world
    ms = tuple(int(v) for v in args.ms.split(","))
    kinds = ("bf16", "int4_g128", "int4_g32")
    blocks_all = DRY_BLOCKS if dry else tuple(args.variants.split(","))
    cap = 4 * max(ms) * n  # fp32 partial of the largest case
    region = None
    if dry:
        store = dist.distributed_c10d._get_default_store()
        region = _ShmRegion(world, rank, DeviceMailbox.region_bytes(world, cap), store)
        dm = DeviceMailbox(rank, world, region.bases, cap, "cpu", timeout=60)
        ops = MailboxOps.make(dm, dev)
        comm = None
        info["transport"] = "host shared memory (interpreter)"
    else:
        comm, err = None, None
        try:
            comm = ccl.Communicator(device=dev, timeout=args.ccl_timeout,
                                    max_bytes=max(1 << 20, cap))
            if comm.transport != "cuda" or comm._device_mailbox is None:
                err = f"transport {comm.transport}: {comm.fallback_reason}"
        except Exception as e:  # noqa: BLE001 - recorded; the direct mailbox below still runs
            err = f"{type(e).__name__}: {e}"
        flag = torch.tensor([1 if err else 0], device=dev)
        dist.all_reduce(flag)  # every rank takes the same path
        if not int(flag.item()):
            dm = comm._device_mailbox
            ops = GpuOps.make(comm, dev)
            info["transport"] = "ccl.Communicator(device=cuda)"
        else:
            log(rank, f"ccl.Communicator(device=cuda) failed on some rank ({err}); falling back "
                      "to a DeviceMailbox on ccl.transport.cuda.CudaRegion", every_rank=True)
            info["comm_error"] = err
            if comm is not None:
                comm.close()
            comm = None
            from ccl.rendezvous import StoreExchange
            from ccl.transport.cuda import CudaRegion

            store = dist.distributed_c10d._get_default_store()
            region = CudaRegion(world, rank, DeviceMailbox.region_bytes(world, cap), dev.index)
            region.connect(StoreExchange(store, rank, world, "gpu-fused-linear/region",
                                         timeout_s=60), timeout_s=60)
            dm = DeviceMailbox(rank, world, region.bases, cap, dev, timeout=args.ccl_timeout)
            ops = MailboxOps.make(dm, dev)
            info["transport"] = "DeviceMailbox on CudaRegion (Communicator failed)"
        assert max(ms) * n <= dm.layout.cap_words, "fused call would fall back"
    log(rank, f"{info['device']} x{world}, torch {info['torch']}, triton {info['triton']}, "
              f"transport {info['transport']}, seed {seed}, K_total {k_total} (K {k}/rank), N {n}")

    t = time.time()
    cases = {(kind, m): Case(kind, m, k, n, rank, world, dev, seed) for kind in kinds for m in ms}
    log(rank, f"inputs ready ({time.time() - t:.1f}s)")
    if args.inject_failure == rank:  # test hook: the run must stop, not hang
        raise RuntimeError(f"injected failure on rank {rank}")

    if not dry:  # every kernel variant compiled before any rank waits on a peer
        t = time.time()
        jobs = []
        for (kind, m), c in cases.items():
            if kind == "int4_g32":  # group is a runtime argument: same kernel as g128
                continue
            for blocks in blocks_all:
                jobs.append(("fused", c, blocks))
                jobs.append(("gemv", c, blocks))
            jobs.append(("ar", c, None))
        dm._compile_only = True

        def compile_only(kern, grid, *a, **kw):
            dm._launch(kern, grid, *a, **kw)

        try:
            for share in (rank, None):  # my half first (the peer does the other), then all
                for i, (what, c, blocks) in enumerate(jobs):
                    if share is not None and i % world != share:
                        continue
                    if what == "fused":
                        ops.fused(c.x, c.weight, c.quant, c.res, c.nw, c.out, c.res_out, blocks)
                    elif what == "gemv":
                        ops.gemv(c.x, c.weight, c.quant, c.partial, blocks, launch=compile_only)
                    else:
                        ops.all_reduce(c.ar32, c.ar32_out)
                        ops.all_reduce(c.ar16, c.ar16_out)
                if share is not None:
                    dist.barrier()
        finally:
            dm._compile_only = False
        torch.cuda.synchronize()
        dist.barrier()
        log(rank, f"compiled {len(jobs)} variants ({time.time() - t:.1f}s)")

    results = dict(info=info, cases={})
    all_ok = True
    for (kind, m), c in cases.items():
        name = f"{kind} M{m}"
        t = time.time()
        r = results["cases"][name] = dict(kind=kind, M=m, K_per_rank=k, K_total=k_total, N=n)
        # ---------------------------------------------------------------- a) correctness
        eager = []
        for blocks in blocks_all:
            for _ in range(2):
                c.refill()
                ops.fused(c.x, c.weight, c.quant, c.res, c.nw, c.out, c.res_out, blocks)
                ops.check()
                eager.append(dict(blocks=blocks, **compare(c, world, f"{name} eager {blocks}")))
        # outputs aliasing the residual (the decode-step usage): same values
        c.refill()
        ops.fused(c.x, c.weight, c.quant, c.res, c.nw, c.out, c.res_out, blocks_all[0])
        ops.check()
        want_o, want_r = c.out.clone(), c.res_out.clone()
        res_keep = c.res.clone()
        ops.fused(c.x, c.weight, c.quant, c.res, c.nw, c.out, c.res, blocks_all[0])
        ops.check()
        alias_ok = bool(torch.equal(c.out.view(torch.int16), want_o.view(torch.int16))
                        and torch.equal(c.res.view(torch.int16), want_r.view(torch.int16)))
        c.res.copy_(res_keep)
        eager.append(dict(blocks=blocks_all[0], aliased_residual_out=True, ok=alias_ok))
        r["eager"] = eager
        ok = all(e["ok"] for e in eager)
        if not dry:
            gr = graph_correctness(c, ops, blocks_all[0], replays=3)
            r["graph"] = gr
            ok &= all(e["ok"] for e in gr)
        r["correct"] = ok
        all_ok &= ok
        worst = max((e[w]["max_abs"] for e in eager if "out" in e for w in ("out", "residual_out")),
                    default=float("nan"))
        log(rank, f"{name}: correctness {'ok' if ok else 'FAILED'} (max abs err {worst:.3g}, "
                  f"{len(eager)} eager{'' if dry else ' + 3 graph replays'}) ({time.time() - t:.1f}s)")
        # ---------------------------------------------------------------- b) timing
        t = time.time()
        base_timer = time_eager if dry else time_graph

        def timer(fn, n_inner, rounds, _t=base_timer):  # logs each point: a slow one shows
            t_pt = time.time()
            r_pt = _t(fn, n_inner, rounds)
            log(rank, f"    point {r_pt['p50']:.2f} us ({time.time() - t_pt:.1f}s)")
            return r_pt
        n_inner, rounds = (2, 2) if dry else (args.n_inner, args.rounds)
        tm = r["timing_us"] = {}
        c.refill()
        for blocks in blocks_all:
            tm[f"ccl_fused_{blocks}"] = timer(
                lambda blocks=blocks: ops.fused(c.x, c.weight, c.quant, c.res, c.nw, c.out,
                                                c.res_out, blocks), n_inner, rounds)
            ops.check()
            log(rank, f"  {name} fused {blocks}: {tm[f'ccl_fused_{blocks}']['p50']:.2f} us")
            if variant_split(blocks) is not None and blocks != blocks_all[0]:
                continue  # the default tiles' GEMV: the same kernel as "default"
            tm[f"ccl_gemv_{blocks}"] = timer(
                lambda blocks=blocks: ops.gemv(c.x, c.weight, c.quant, c.partial, blocks),
                n_inner, rounds)
        tm["ccl_all_reduce_fp32"] = timer(lambda: ops.all_reduce(c.ar32, c.ar32_out), n_inner, rounds)
        tm["ccl_all_reduce_bf16"] = timer(lambda: ops.all_reduce(c.ar16, c.ar16_out), n_inner, rounds)
        ops.check()
        tm["baseline_torch_nccl"] = timer(c.baseline, n_inner, rounds)
        tm["nccl_all_reduce_bf16"] = timer(lambda: dist.all_reduce(c.base_y), n_inner, rounds)
        key0 = blocks_all[0]
        if not dry:  # torch's GEMV alone (cuBLAS), for the quality of ours
            import torch.nn.functional as F

            tm["torch_gemv"] = timer(lambda: F.linear(c.x, c.w_lin), n_inner, rounds)
        fused = tm[f"ccl_fused_{key0}"]["p50"]
        best = min((v["p50"], kk) for kk, v in tm.items() if kk.startswith("ccl_fused_"))
        gemv = tm[f"ccl_gemv_{key0}"]["p50"]
        ar = tm["ccl_all_reduce_fp32"]["p50"]
        base = tm["baseline_torch_nccl"]["p50"]
        r["summary_us"] = dict(
            fused_default=fused, fused_best=best[0], fused_best_config=best[1],
            gemv_default=gemv, torch_gemv=tm.get("torch_gemv", {}).get("p50"), all_reduce_fp32=ar, gemv_plus_all_reduce=round(gemv + ar, 3),
            baseline=base, nccl_all_reduce_bf16=tm["nccl_all_reduce_bf16"]["p50"],
            ratio_fused_over_baseline=round(fused / base, 3),
            ratio_fused_over_gemv_plus_ar=round(fused / (gemv + ar), 3),
            ratio_best_over_baseline=round(best[0] / base, 3),
            ratio_best_over_gemv_plus_ar=round(best[0] / (gemv + ar), 3),
            bar_fused_over_baseline_le_0_3=fused / base <= 0.3,
            bar_fused_over_gemv_plus_ar_le_1_0=fused / (gemv + ar) <= 1.0,
        )
        log(rank, f"{name}: fused {fused:.2f} us (best {best[0]:.2f} {best[1]}), baseline "
                  f"{base:.2f}, gemv {gemv:.2f} + ar32 {ar:.2f} ({time.time() - t:.1f}s)")
    results["all_correct"] = all_ok
    ops.check()
    dist.barrier()
    dog.cancel()
    if comm is not None:
        comm.close()
    if region is not None:
        region.close()
    dist.barrier()
    dist.destroy_process_group()
    return results


# ============================================================================ parent
def print_table(res):
    print("\n# fused linear + all-reduce + add + RMSNorm, us per call (median of "
          f"{res['config']['rounds']} graph replays of {res['config']['n_inner']} calls)")
    print(f"# {'case':<14}{'fused':>8}{'best':>8}{'baseline':>10}{'gemv':>8}{'ar32':>8}"
          f"{'g+ar':>8}{'f/base':>8}{'f/(g+ar)':>9}  correct  best config")
    for name, r in res["ranks"][0]["cases"].items():
        s = r["summary_us"]
        print(f"  {name:<14} {s['fused_default']:>7.2f} {s['fused_best']:>7.2f} {s['baseline']:>9.2f}"
              f" {s['gemv_default']:>7.2f} {s['all_reduce_fp32']:>7.2f}"
              f" {s['gemv_plus_all_reduce']:>7.2f} {s['ratio_fused_over_baseline']:>7.3f}"
              f" {s['ratio_fused_over_gemv_plus_ar']:>8.3f}  {str(r['correct']):<7}  "
              f"{s['fused_best_config']}")
    print("# bars: fused/baseline <= 0.3, fused/(gemv+ar) <= 1.0; baseline = torch F.linear "
          "(INT4: on the pre-dequantised bf16 weight) + NCCL bf16 all_reduce + torch add/RMSNorm; "
          "ar32 = ccl all_reduce of the fp32 [M, N] partial (what the fused kernel pushes)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output dir (default $OUT, else bench/results)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="TRITON_INTERPRET=1, gloo, CPU, tiny sizes, no graphs/events")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--k-total", type=int, default=3072)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--n-inner", type=int, default=100, help="calls per captured graph")
    ap.add_argument("--rounds", type=int, default=30, help="timed replays (median)")
    ap.add_argument("--ccl-timeout", type=float, default=20.0, help="ccl wait bound (s)")
    ap.add_argument("--ms", default="1,8", help="token counts M, comma-separated")
    ap.add_argument("--variants", default=",".join(BLOCKS),
                    help=f"tile variants (first = the reference for the bars): {BLOCKS}, "
                         "bk_half, or split<P> (P epilogue programs per row, default tiles)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--timeout", type=float, default=None,
                    help="whole-run bound in s (default 240 GPU, 900 dry run)")
    ap.add_argument("--inject-failure", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 900.0 if args.cpu_dry_run else 240.0
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    out_dir = args.out or os.environ.get("OUT") or os.path.join(REPO, "bench", "results")
    fname = ("cpu-dry-run-fused-linear" if args.cpu_dry_run else "h200x2-fused-linear") \
        + (f"-{args.tag}" if args.tag else "") + ".json"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"# gpu_fused_linear: {'CPU dry run' if args.cpu_dry_run else 'CUDA'}, world "
          f"{args.world}, bound {args.timeout:.0f}s", flush=True)
    procs = [ctx.Process(target=rank_main, args=(r, args.world, port, args, q))
             for r in range(args.world)]
    for p in procs:
        p.start()
    results, failed = {}, None
    deadline = time.time() + args.timeout
    try:
        while len(results) < args.world and failed is None:
            left = deadline - time.time()
            if left <= 0:
                failed = (f"ranks {sorted(set(range(args.world)) - set(results))} did not finish "
                          f"within {args.timeout:.0f}s")
                break
            try:
                rank, status, detail = q.get(timeout=min(left, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty
                dead = [i for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    time.sleep(1.0)  # let a traceback in flight arrive
                    failed = f"rank(s) {dead} died (exit codes {[procs[i].exitcode for i in dead]})"
                continue
            if status != "ok":
                failed = f"rank {rank} failed:\n{detail}"
            else:
                results[rank] = detail
    finally:
        for p in procs:
            p.join(timeout=5 if failed is None else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if failed is not None:
        print(f"# FAILED: {failed}", file=sys.stderr, flush=True)
        return 1
    res = dict(bench="gpu_fused_linear", **results[0]["info"],
               config=dict(k_total=args.k_total, n=args.n, n_inner=args.n_inner,
                           rounds=args.rounds,
                           blocks=DRY_BLOCKS if args.cpu_dry_run else args.variants.split(","),
                           rtol=RTOL, atol=ATOL, dtype="bf16 activations / outputs",
                           weights={"bf16": "nn.Linear [N, K] passed as .t()",
                                    "int4_g128 / int4_g32": "GPTQ symmetric, bf16 scales"}),
               notes=["baseline INT4: torch has no INT4 GEMV; F.linear on the pre-dequantised "
                      "bf16 weight", "all_reduce_fp32: ccl all_reduce of an fp32 [M, N] tensor, "
                      "what the fused kernel pushes (one fp32 per LL8 packet); bf16 for reference",
                      "gemv: device_linear_partial, the fused kernel's GEMV tiles alone (fp32 out)"],
               all_correct=all(results[r]["all_correct"] for r in results),
               wall_s=round(time.time() - T0, 1),
               ranks={r: {"cases": results[r]["cases"]} for r in sorted(results)})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, fname)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)
    print(f"# all correct: {res['all_correct']}; wrote {path}; wall {res['wall_s']}s", flush=True)
    return 0 if res["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
