"""``ccl-bench --device cuda``: ccl's device mailbox vs NCCL and torch SymmetricMemory one-shot,
all measured in the same run under CUDA-graph replay.

One process per GPU (spawned here; ``--ranks`` GPUs of this host). For every op and size:

1. correctness, eager and after graph replay: fresh random inputs (seeded per rank, point and
   round), outputs poisoned with NaN before the calls, compared with a reference built from
   every rank's inputs (all-gathered through NCCL, summed in fp32 in rank order, as ccl
   does: bitwise for all_reduce, within one output ulp for the norms) and bitwise across ranks;
2. timing: each implementation's call captured ``--graph-calls`` times in one CUDA graph,
   the graph replayed ``--graph-replays`` times between CUDA events; a sample is one replay's
   time divided by the calls in it. p50/p99 (max over ranks of each rank's percentile).

Baselines: NCCL ``all_reduce`` (the wrapped backend on CUDA), NCCL + torch add + RMSNorm for
the fused op, NCCL all-reduce of the per-token sums of squares + torch norms for qk_rms_norm;
``torch.ops.symm_mem.one_shot_all_reduce`` as a second all_reduce baseline (a ``variant``).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are forced for the ranks).
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import statistics
import sys
import time
import traceback
from typing import Any

_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
_EPS = 1e-6

__all__ = ["run"]


def run(args) -> int:
    """Spawns ``args.ranks`` GPU ranks, prints the table on rank 0, writes JSON + PNG."""
    os.environ.update(_MULTICAST_OFF)
    os.environ.pop("TRITON_INTERPRET", None)
    import multiprocessing as mp

    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < args.ranks:
        sys.stderr.write(
            f"ccl-bench: --device cuda needs {args.ranks} GPUs on this host, found {n_gpus}\n"
        )
        return 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, args.ranks, port, args, q), daemon=True)
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args.timeout
    got: dict[int, Any] = {}
    failed = False
    while len(got) < args.ranks and time.monotonic() < deadline:
        try:
            rank, kind, payload = q.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty: check for dead ranks
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in got]
            if dead:
                sys.stderr.write(f"ccl-bench: rank(s) {dead} died (exit codes "
                                 f"{[procs[i].exitcode for i in dead]})\n")
                failed = True
                break
            continue
        got[rank] = payload
        if kind == "error":
            sys.stderr.write(f"ccl-bench: rank {rank} failed:\n{payload}\n")
            failed = True
            break
    if len(got) < args.ranks and not failed:
        sys.stderr.write(f"ccl-bench: no result from ranks "
                         f"{sorted(set(range(args.ranks)) - set(got))} within {args.timeout:.0f} s\n")
        failed = True
    for p in procs:
        p.join(timeout=30 if not failed else 2)
        if p.is_alive():
            p.kill()
    return 1 if failed else got[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- one rank
def _rank_main(rank: int, world: int, port: int, args, q) -> None:
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        status = _run_rank(rank, world, args)
        q.put((rank, "ok", status))
    except BaseException:  # noqa: BLE001 - reported to the parent, which exits non-zero
        q.put((rank, "error", traceback.format_exc()))


def _run_rank(rank: int, world: int, args) -> int:
    import torch
    import torch.distributed as dist

    import ccl
    from ccl import bench as cli
    from ccl._cli_launch import machine_info

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev,
                            timeout=datetime.timedelta(seconds=max(60, args.coll_timeout)))
    comm = ccl.Communicator(device=dev, max_bytes=args.mailbox_bytes, timeout=args.coll_timeout)
    out = cli._Out(rank, args.quiet)
    started = time.monotonic()
    try:
        bench = _Bench(rank, world, dev, comm, args)
        plan = bench.plan()
        machine = machine_info()
        machine["gpu"] = torch.cuda.get_device_name(dev)
        machine["torch"] = torch.__version__
        machine["cuda"] = torch.version.cuda
        import triton

        machine["triton"] = triton.__version__
        config = {
            "device": "cuda",
            "transport": comm.transport,
            "world_size": world,
            "dtype": args.dtype,
            "ops": args.ops,
            "mailbox_bytes": comm.max_bytes,
            "timer": "cuda events around graph replays",
            "graph_calls": bench.calls,
            "graph_replays": bench.replays,
            "percentiles_over_ranks": "max",
            "baselines": {
                "all_reduce": "nccl all_reduce (in place); variant symm_mem one_shot_all_reduce",
                "all_reduce_add_rms_norm": "nccl all_reduce + torch add + RMSNorm (fp32 math)",
                "qk_rms_norm": "nccl all_reduce of [tokens, 2] fp32 sums of squares + torch norms",
            },
            "timed_forms": {
                "all_reduce": {"ccl": "out= (input intact)", "baseline": "in place"},
                "all_reduce_add_rms_norm": {"ccl": "outputs alias x / residual",
                                            "baseline": "in place"},
                "qk_rms_norm": {"ccl": "outputs alias q / k", "baseline": "in place"},
            },
            "multicast": "off (" + ", ".join(f"{k}={v}" for k, v in _MULTICAST_OFF.items()) + ")",
        }
        out.line(f"# ccl-bench on {machine['gpu']} x{world}, torch {torch.__version__}, "
                 f"triton {triton.__version__}, transport {comm.transport}")
        out.line(f"# graph replay: {bench.calls} calls per graph, {bench.replays} replays; "
                 "p50/p99 of per-call time, max over ranks; ratio = ccl p50 / baseline p50")
        out.line(f"# {'op':<24} {'size':>8} {'shape':>12} | {'ccl p50':>8} {'p99':>7} | "
                 f"{'base p50':>8} {'p99':>7} | {'ratio':>6} | {'symm/ar':>8} | #wrong")
        results = []

        def report(done: bool) -> dict[str, Any]:
            wrong = sum(r["wrong"] for r in results)
            return {
                "schema": "ccl-bench/1",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "command": ["ccl-bench", *sys.argv[1:]],
                "machine": machine,
                "config": config,
                "results": results,
                "summary": {"ok": wrong == 0 and done, "complete": done, "wrong": wrong,
                            "points": len(results), "planned": len(plan),
                            "elapsed_s": round(time.monotonic() - started, 1)},
                "stdout": out.lines,
            }

        for i, (op, size, shape) in enumerate(plan):
            out.progress(f"ccl-bench cuda: {op} {size} B [{i + 1}/{len(plan)}] "
                         f"{time.monotonic() - started:.0f}s")
            res = bench.point(op, size, shape)
            results.append(res)
            out.progress_done()
            out.line(_row(res))
            if rank == 0:  # a run stopped part-way still leaves every finished point
                _write_json(report(False), args, world)
        wrong = sum(r["wrong"] for r in results)
        ok = wrong == 0
        out.line(f"# {'OK' if ok else 'FAILED'}: {len(results)} points, {wrong} wrong, "
                 f"{time.monotonic() - started:.0f} s")
        if rank == 0:
            cli._write_outputs(report(True), args, world)
        dist.barrier()
        return 0 if ok else 1
    finally:
        comm.close()
        dist.destroy_process_group()


def _write_json(report: dict[str, Any], args, world: int) -> None:
    import json
    from pathlib import Path

    from ccl import bench as cli

    path = Path(args.json or (args.out or cli._default_prefix(args, world)) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def _row(r: dict[str, Any]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    c, b = r["ccl"] or {}, r["baseline"] or {}
    extra = ""
    if r["op"] == "all_reduce":
        s = (r["variants"] or {}).get("symm_mem_one_shot")
        if s and c:
            extra = f"{c['p50_us'] / s['p50_us']:.3f}"
    else:
        a = (r["variants"] or {}).get("ccl_all_reduce_same_bytes")
        if a and c:
            extra = f"{c['p50_us'] / a['p50_us']:.3f}"
    ratio = "-" if r["ratio_p50"] is None else f"{r['ratio_p50']:.3f}"
    return (f"  {r['op']:<24} {r['size_bytes']:>8} {r['shape']:>12} | {f(c.get('p50_us')):>8} "
            f"{f(c.get('p99_us')):>7} | {f(b.get('p50_us')):>8} {f(b.get('p99_us')):>7} | "
            f"{ratio:>6} | {extra:>8} | {r['wrong']}")


class _Bench:
    def __init__(self, rank, world, dev, comm, args):
        import torch

        self.torch = torch
        self.rank, self.world, self.dev, self.comm, self.args = rank, world, dev, comm, args
        self.dtype = args.torch_dtype
        self.calls = 20 if args.quick else 50
        self.replays = 30 if args.quick else 150
        self.seed = args.seed
        self.t0 = time.monotonic()

    # ---------------------------------------------------------------- plan
    def plan(self) -> list[tuple[str, int, tuple[int, int]]]:
        """(op, bytes per rank, shape) points: all_reduce over the size sweep; the fused norm
        at rows x ``--hidden`` for 1, 8, 32 rows plus the 1x4096 and 8x7168 decode shapes;
        qk_rms_norm at 1, 8, 32, 128 tokens (8 B of sums per token)."""
        from ccl import bench as cli

        esz = self.torch.empty((), dtype=self.dtype).element_size()
        out = []
        for op in self.args.ops:
            if op == "qk_rms_norm":
                tokens = [t for t in (1, 8, 32, 128) if t <= self.args.qk_max_tokens]
                out += [(op, 8 * t, (t, 0)) for t in tokens]
            elif op == "all_reduce_add_rms_norm":
                h = self.args.hidden
                for rows, cols in dict.fromkeys([(1, h), (8, h), (32, h), (1, 4096), (8, 7168)]):
                    out.append((op, rows * cols * esz, (rows, cols)))
            else:
                out += [(op, s, (s // esz, 0)) for s in cli._sizes(self.args) if s >= esz]
        return out

    # ---------------------------------------------------------------- helpers
    def _gen(self, shape, *key):
        g = self.torch.Generator(device=self.dev)
        g.manual_seed(hash((self.seed, self.rank, *key)) & ((1 << 62) - 1))
        return self.torch.randn(*shape, generator=g, device=self.dev).to(self.dtype)

    def _gather(self, t):
        import torch.distributed as dist

        parts = [self.torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return parts

    def _sum_ref(self, t):
        """fp32 sum in rank order of every rank's ``t`` (ccl's accumulation)."""
        parts = self._gather(t)
        acc = parts[0].float()
        for p in parts[1:]:
            acc = acc + p.float()
        return acc

    def _agree(self, t) -> bool:
        """Bitwise equality of ``t`` across ranks (NaN-safe: compares the bytes)."""
        parts = [p.view(-1).view(self.torch.uint8) for p in self._gather(t)]
        return all(self.torch.equal(parts[0], p) for p in parts[1:])

    def _trace(self, what: str) -> None:
        """Timestamped phase lines on stderr (``--verbose``): where a slow point spends it."""
        if self.args.verbose:
            sys.stderr.write(f"[rank {self.rank} {time.monotonic() - self.t0:8.2f}s] {what}\n")
            sys.stderr.flush()

    def _time(self, fn, what: str = "") -> list[float]:
        """Per-call µs of ``fn`` over graph replays (one sample per replay)."""
        import torch.distributed as dist

        torch = self.torch
        self._trace(f"time {what}")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self._trace("  warmed up")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(self.calls):
                fn()
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        self._trace("  captured")
        for _ in range(5):
            g.replay()
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(self.replays)]
        for a, b in evs:
            a.record()
            g.replay()
            b.record()
        torch.cuda.synchronize()
        self.comm.synchronize()  # raises CollectiveTimeout / CollectiveMismatch if recorded
        del g
        self._trace(f"timed {what}")
        return [a.elapsed_time(b) * 1000.0 / self.calls for a, b in evs]

    def _stats(self, samples: list[float]) -> dict[str, float]:
        import torch.distributed as dist

        xs = sorted(samples)
        mine = {
            "p10_us": xs[len(xs) // 10],
            "p50_us": statistics.median(xs),
            "p90_us": xs[(len(xs) * 9) // 10],
            "p99_us": xs[min(len(xs) - 1, math.ceil(len(xs) * 0.99) - 1)],
            "mean_us": statistics.fmean(xs),
        }
        t = self.torch.tensor([mine[k] for k in sorted(mine)], dtype=self.torch.float64,
                              device=self.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return {k: round(float(v), 3) for k, v in zip(sorted(mine), t.tolist())}

    def _symm(self, x):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        sb = symm_mem.empty(x.numel(), dtype=x.dtype, device=self.dev)
        sb.copy_(x.view(-1))
        symm_mem.rendezvous(sb, dist.group.WORLD.group_name)
        return lambda: self.torch.ops.symm_mem.one_shot_all_reduce(
            sb, "sum", dist.group.WORLD.group_name)

    # ---------------------------------------------------------------- points
    def point(self, op: str, size: int, shape: tuple[int, int]) -> dict[str, Any]:
        res = {"all_reduce": self._all_reduce, "all_reduce_add_rms_norm": self._norm,
               "qk_rms_norm": self._qk}[op](size, shape)
        res.update(op=op, size_bytes=size, dtype=self.args.dtype)
        c, b = res["ccl"], res["baseline"]
        res["ratio_p50"] = c["p50_us"] / b["p50_us"] if c and b else None
        return res

    def _all_reduce(self, size, shape):
        import torch.distributed as dist

        torch = self.torch
        n = shape[0]
        wrong = checked = 0
        agree = True
        x = self._gen((n,), "ar", size)
        out = torch.full_like(x, float("nan"))
        self.comm.all_reduce(x, out=out)
        ref = self._sum_ref(x).to(self.dtype)
        wrong += int(not torch.equal(out, ref))
        agree &= self._agree(out)
        checked += 1
        ccl_samples = self._time(lambda: self.comm.all_reduce(x, out=out), f"ccl ar {size}")
        wrong += int(not torch.equal(out, ref))  # the graph's calls wrote out last
        agree &= self._agree(out)
        checked += 1
        y = x.clone()
        base_samples = self._time(lambda: dist.all_reduce(y), f"nccl ar {size}")
        variants = {}
        try:
            variants["symm_mem_one_shot"] = self._stats(self._time(self._symm(x), f"symm {size}"))
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            variants["symm_mem_one_shot"] = None
            variants["symm_mem_error"] = f"{type(e).__name__}: {e}"[:300]
        return {
            "shape": f"{n}",
            "ccl": self._stats(ccl_samples),
            "baseline": self._stats(base_samples),
            "variants": variants,
            "wrong": self._total(wrong),
            "checked": checked * self.world,
            "ranks_agree": self._all(agree),
        }

    def _norm(self, size, shape):
        import torch.distributed as dist

        torch = self.torch
        rows, cols = shape
        x0 = self._gen((rows, cols), "nx", size)
        r0 = self._gen((rows, cols), "nr", size)
        w = self._gen((cols,), "nw", size) if self.rank == 0 else None
        w = w if w is not None else torch.empty(cols, device=self.dev, dtype=self.dtype)
        dist.broadcast(w, 0)  # the norm weight is replicated
        h = self._sum_ref(x0) + r0.float()
        ref_res = h.to(self.dtype)
        ref = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _EPS) * w.float()).to(self.dtype)
        x, r = x0.clone(), r0.clone()
        out = torch.full_like(x, float("nan"))
        res_out = torch.full_like(x, float("nan"))
        self.comm.all_reduce_add_rms_norm(x, r, w, _EPS, out=out, residual_out=res_out)
        wrong = int(not torch.equal(res_out, ref_res)) + int(not _close(out, ref))
        agree = self._agree(out) and self._agree(res_out)
        # timed form: outputs alias the inputs (what a decoder layer does); values then change
        # every call, so the graph's results are checked in a separate out= graph below
        ccl_samples = self._time(lambda: self.comm.all_reduce_add_rms_norm(
            x, r, w, _EPS, out=x, residual_out=r), f"ccl norm {rows}x{cols}")
        x.copy_(x0)
        r.copy_(r0)
        out.fill_(float("nan"))
        res_out.fill_(float("nan"))
        self._time_once(lambda: self.comm.all_reduce_add_rms_norm(
            x, r, w, _EPS, out=out, residual_out=res_out))
        wrong += int(not torch.equal(res_out, ref_res)) + int(not _close(out, ref))
        agree = agree and self._agree(out) and self._agree(res_out)
        xb, rb = x0.clone(), r0.clone()

        def nccl_torch():
            dist.all_reduce(xb)
            hb = xb.float() + rb.float()
            rb.copy_(hb.to(self.dtype))
            var = hb.pow(2).mean(dim=-1, keepdim=True)
            xb.copy_((hb * torch.rsqrt(var + _EPS) * w.float()).to(self.dtype))

        base_samples = self._time(nccl_torch, f"nccl+torch norm {rows}x{cols}")
        flat = x0.clone().view(-1)
        plain = self._time(lambda: self.comm.all_reduce(flat), f"ccl ar {rows}x{cols}")
        return {
            "shape": f"{rows}x{cols}",
            "ccl": self._stats(ccl_samples),
            "baseline": self._stats(base_samples),
            "variants": {"ccl_all_reduce_same_bytes": self._stats(plain)},
            "wrong": self._total(wrong),
            "checked": 4 * self.world,
            "ranks_agree": self._all(agree),
        }

    def _qk(self, size, shape):
        import torch.distributed as dist

        torch = self.torch
        tokens = shape[0]
        qd, kd = (d // self.world for d in self.args.qk_dims)
        q0 = self._gen((tokens, qd), "q", size)
        k0 = self._gen((tokens, kd), "k", size)
        qw = self._gen((qd,), "qw", size)
        kw = self._gen((kd,), "kw", size)
        ss = torch.stack([q0.float().pow(2).sum(-1), k0.float().pow(2).sum(-1)], -1)
        tot = self._sum_ref(ss)
        ref_q = (q0.float() * torch.rsqrt(tot[:, :1] / (qd * self.world) + _EPS)
                 * qw.float()).to(self.dtype)
        ref_k = (k0.float() * torch.rsqrt(tot[:, 1:] / (kd * self.world) + _EPS)
                 * kw.float()).to(self.dtype)
        q, k = q0.clone(), k0.clone()
        qo = torch.full_like(q, float("nan"))
        ko = torch.full_like(k, float("nan"))
        self.comm.qk_rms_norm(q, k, qw, kw, _EPS, q_out=qo, k_out=ko)
        wrong = int(not _close(qo, ref_q)) + int(not _close(ko, ref_k))
        agree = True  # q/k are rank-local shards: nothing to compare across ranks
        ccl_samples = self._time(
            lambda: self.comm.qk_rms_norm(q, k, qw, kw, _EPS, q_out=q, k_out=k), f"ccl qk {tokens}")
        qb, kb = q0.clone(), k0.clone()

        def nccl_torch():
            s = torch.stack([qb.float().pow(2).sum(-1), kb.float().pow(2).sum(-1)], -1)
            dist.all_reduce(s)
            qb.copy_((qb.float() * torch.rsqrt(s[:, :1] / (qd * self.world) + _EPS)
                      * qw.float()).to(self.dtype))
            kb.copy_((kb.float() * torch.rsqrt(s[:, 1:] / (kd * self.world) + _EPS)
                      * kw.float()).to(self.dtype))

        base_samples = self._time(nccl_torch, f"nccl qk {tokens}")
        return {
            "shape": f"{tokens}x({qd}+{kd})",
            "ccl": self._stats(ccl_samples),
            "baseline": self._stats(base_samples),
            "variants": None,
            "wrong": self._total(wrong),
            "checked": 2 * self.world,
            "ranks_agree": self._all(agree),
        }

    def _time_once(self, fn):
        """One capture + one replay of ``fn`` (checks what a replayed graph writes)."""
        torch = self.torch
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        self.comm.synchronize()

    def _total(self, n: int) -> int:
        import torch.distributed as dist

        t = self.torch.tensor([n], device=self.dev)
        dist.all_reduce(t)
        return int(t.item())

    def _all(self, flag: bool) -> bool:
        return self._total(0 if flag else 1) == 0


def _close(got, ref) -> bool:
    """Within one output ulp of the fp32 reference (rsqrt and its rounding may differ)."""
    import torch

    if torch.isnan(got).any():
        return False
    tol = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(got.dtype, 2 ** -20)
    err = (got.float() - ref.float()).abs()
    return bool((err <= tol * ref.float().abs() + 1e-6).all())
