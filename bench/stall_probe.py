#!/usr/bin/env python3
"""Stall probe for the device mailbox under CUDA-graph replay (2 GPUs).

    python bench/stall_probe.py [--replays N] [--timeout S] [--configs REGEX] [--repeat N]
                                [--rank-limit-scale X] [--json FILE]

For each configuration (op, size, programs per launch, LL publish variant) it captures one
graph of ``--calls`` calls, replays it ``--replays`` times between CUDA events and reports how
many replays took more than 1 ms (a call normally takes 2-6 µs), the slowest replays with
their host launch stamps, the status each rank's kernels recorded, their longest waits
(``DeviceMailbox.wait_stats``) and whether both ranks still agree on the sequence number. A
heartbeat process reports host (VM) stalls. Written to find where the multi-second stalls
under graph replay came from (found in session 4: docs/TRITON.md; before / after:
bench/results/h200x2-s4-stall-*.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import traceback

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (label, op, rows, cols or numel, dtype, max_block, norm_chunk, LL variant)
CONFIGS = [
    ("ar 1KB", "ar", 1, 512, "bf16", 1024, 0, None),
    ("ar 8KB solo", "ar", 1, 4096, "bf16", 4096, 0, None),
    ("ar 16KB", "ar", 1, 8192, "bf16", 1024, 0, None),
    ("ar 64KB 16 progs", "ar", 1, 32768, "bf16", 1024, 0, None),
    ("ar 128KB 32 progs", "ar", 1, 65536, "bf16", 1024, 0, None),
    ("ar 128KB 128 progs", "ar", 1, 65536, "bf16", 256, 0, None),
    ("ar 128KB 128 progs xchg", "ar", 1, 65536, "bf16", 256, 0, "cuda_xchg"),
    ("ar 128KB 32 progs xchg", "ar", 1, 65536, "bf16", 1024, 0, "cuda_xchg"),
    ("ar 128KB 32 progs fenced", "ar", 1, 65536, "bf16", 1024, 0, "cuda_fenced"),
    ("ar fp32 96KB 24 progs", "ar", 1, 24576, "fp32", 1024, 0, None),
    ("norm 8x7168 1 prog/row", "norm", 8, 7168, "bf16", 1024, 0, None),
    ("norm 8x7168 split", "norm", 8, 7168, "bf16", 1024, 256, None),
    ("norm 3x1001 fp16 split", "norm", 3, 1001, "fp16", 1024, 256, None),
    ("norm 1x4096 split", "norm", 1, 4096, "bf16", 1024, 256, None),
]


def heartbeat(stop, q, period_s=0.0005, report_ms=2.0):
    """A process that only sleeps: gaps in its wake-ups are host (VM) stalls, independent of
    the ranks' GIL and CUDA driver calls. Reports (monotonic start, gap ms) of long gaps."""
    gaps, last = [], time.monotonic()
    while not stop.is_set():
        time.sleep(period_s)
        now = time.monotonic()
        if (now - last) * 1e3 > report_ms:
            gaps.append((round(last, 4), round((now - last) * 1e3, 2)))
        last = now
    q.put(("heartbeat", "ok", gaps))


def rank_main(rank, world, port, args, q):
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        import torch
        import torch.distributed as dist

        import ccl
        from ccl.kernels import ll

        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
        comm = ccl.Communicator(device=dev, timeout=args.timeout)
        dm = comm._device_mailbox
        dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        out = []
        todo = [c for c in CONFIGS if re.search(args.configs, c[0])] * args.repeat
        for label, op, rows, cols, dname, block, chunk, variant in todo:
            dt = dts[dname]
            dm.max_block, dm.norm_chunk = block, chunk
            base_limit = dm.limit
            if args.rank_limit_scale:  # rank r waits (1 + r * scale) bounds: whose ends a stall?
                dm.limit = int(base_limit * (1 + rank * args.rank_limit_scale))
            saved = dm.backend
            if variant:
                dm.backend = ll.backend_for("cuda", variant)
            x = torch.randn(rows, cols, device=dev).to(dt)
            r = torch.randn(rows, cols, device=dev).to(dt)
            w = torch.randn(cols, device=dev).to(dt)
            o = torch.empty_like(x)
            if op == "ar":
                def fn():
                    dm.all_reduce(x.view(-1), o.view(-1))
            else:
                def fn():
                    dm.add_rms_norm(x, r, w, 1e-6, out=o, residual_out=r)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(args.calls):
                    fn()
            torch.cuda.synchronize()
            dist.barrier()
            torch.cuda.synchronize()
            dm.wait_stats()  # the warm-up's long waits are not this config's
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(args.replays)]
            host_max = 0.0
            t0 = time.monotonic()
            stamps = []
            for a, b in evs:
                h = time.monotonic()
                a.record()
                g.replay()
                b.record()
                e = time.monotonic()
                stamps.append((h, e))
                host_max = max(host_max, e - h)
            torch.cuda.synchronize()
            t_end = time.monotonic()
            wall = t_end - t0
            ms = [a.elapsed_time(b) for a, b in evs]
            ws = dm.wait_stats()
            st = dm.check()
            seqs = [None] * world
            dist.all_gather_object(seqs, st.seq)
            slow = [i for i, m in enumerate(ms) if m > 1.0]
            row = dict(label=label, rank=rank, replays=args.replays, calls=args.calls,
                       slow_replays=len(slow), first_slow=slow[:5], max_ms=round(max(ms), 3),
                       median_us_per_call=round(sorted(ms)[len(ms) // 2] * 1000 / args.calls, 3),
                       host_max_ms=round(host_max * 1000, 3), wall_s=round(wall, 2),
                       t0=round(t0, 4), t_end=round(t_end, 4),
                       slow_detail=[dict(i=i, gpu_ms=round(ms[i], 2),
                                         host_start=round(stamps[i][0], 4),
                                         host_launch_ms=round((stamps[i][1] - stamps[i][0]) * 1e3, 2))
                                    for i in slow[:8]],
                       status=dict(code=st.code, missing=st.missing_ranks, where=st.expired,
                                   failed_seq=st.failed_seq),
                       seqs_agree=len(set(seqs)) == 1, seqs=seqs, waits=ws,
                       timeout_s=args.timeout)
            print(json.dumps(row), flush=True)
            out.append(row)
            dm.backend, dm.limit = saved, base_limit
            del g
            worst = torch.tensor([st.code], device=dev)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if int(worst.item()):  # ranks may now disagree on the sequence number: start over
                comm.close()
                comm = ccl.Communicator(device=dev, timeout=args.timeout)
                dm = comm._device_mailbox
        q.put((rank, "ok", out))
        comm.close()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        q.put((rank, "error", traceback.format_exc()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replays", type=int, default=400)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=1.0, help="mailbox wait bound (s)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--deadline", type=float, default=200.0)
    ap.add_argument("--configs", default=".", help="regex over config labels")
    ap.add_argument("--rank-limit-scale", type=float, default=0.0,
                    help="rank r waits (1 + r * SCALE) times the bound")
    ap.add_argument("--repeat", type=int, default=1, help="run the selected configs N times")
    args = ap.parse_args()
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = ctx.Event()
    hb = ctx.Process(target=heartbeat, args=(stop, q), daemon=True)
    hb.start()
    ps = [ctx.Process(target=rank_main, args=(r, 2, port, args, q), daemon=True) for r in range(2)]
    for p in ps:
        p.start()
    res, t_end = {}, time.monotonic() + args.deadline
    while len([k for k in res if k != "heartbeat"]) < 2 and time.monotonic() < t_end:
        try:
            rank, kind, payload = q.get(timeout=2)
        except Exception:  # noqa: BLE001
            continue
        res[rank] = payload
        if kind == "error":
            print(f"rank {rank} failed:\n{payload}", flush=True)
    stop.set()
    try:
        while "heartbeat" not in res:
            rank, kind, payload = q.get(timeout=5)
            res[rank] = payload
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(dict(heartbeat_gaps=res.get("heartbeat"))), flush=True)
    for p in ps + [hb]:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env={k: os.environ.get(k) for k in ("CCL_SEQ_PLAIN_LOAD",)},
                           results=res), f, indent=1)
    return 0 if len([k for k in res if k != "heartbeat"]) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
