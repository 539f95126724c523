#!/usr/bin/env python3
"""Two ranks on ONE GPU: both ranks' DeviceMailboxes in one process, their regions in one
allocation, each rank's kernels on its own stream. A correctness check of the device kernels
on real hardware for when only a one-GPU machine is lent: the same kernels, memory ordering
and intra-launch waits as on two GPUs, with L2 in place of NVLink (so no timing here; the
two-GPU runs, bench/h200x2_run.sh, time them).

Checks, each with fresh random inputs and poisoned outputs, against a pure-torch fp32
reference (bf16 outputs within 2 ulps) and bitwise equal across the two ranks where both hold
the same result:

* the all-reduce, one- and two-shot, fp32 and bf16, 8 B to 256 KB;
* the TP Q/K RMSNorm at one rank of MiniMax-M2 (q 3072, k 512 columns, 8 tokens);

* the fused all-reduce + residual + RMSNorm at 1x4096, 8x7168, 3x1000 (bf16, fp32), rows split
  over several programs as on CUDA by default (their sum-of-squares words in the own slot),
  and row-wide (CCL_DEVICE_NORM_ROWWIDE), each out of place and in place;
* the fused linear + all-reduce + residual + RMSNorm (``device_linear_add_rms_norm``), direct
  handoff, bf16 and INT4 weights, M = 1 and 8, every epilogue split, in place (residual_out
  aliasing the residual) and not;
* the timeout path: rank 1 skips a call, rank 0 must raise CollectiveTimeout naming rank 1.

GPU only: under the Triton interpreter a launch runs to its end before the call returns, so
one process cannot hold both ranks, and the interpreter is not thread-safe (tried: two threads
fail inside it); CI's interpreter tests run each rank in its own process instead.

The counter handoff is not run here: its tile programs wait on the peer's tiles, and with
both ranks' launches sharing one GPU's SMs the first launch's waiting tiles can keep the
second's from ever running (on two GPUs each rank has its own).

    python bench/gpu_same_device.py --json $OUT/h100-same-device.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

EPS = 1e-6
RTOL, ATOL = 2.0 ** -6, 1e-2  # bf16: 2 ulps of slack (see gpu_fused_linear.py)


def _mismatch(got, ref, dtype):
    import torch

    if dtype == torch.float32:
        ok = torch.isclose(got.float(), ref, rtol=1e-4, atol=1e-4)
    else:
        ok = (got.float() - ref).abs() <= ATOL + RTOL * ref.abs()
    return int((~ok).sum()) + int(torch.isnan(got.float()).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50, help="calls per case")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not torch.cuda.is_available():
        print("gpu_same_device: SKIPPED, no CUDA device", file=sys.stderr)
        return 0
    from ccl.device_mailbox import DeviceMailbox
    from ccl.errors import CollectiveTimeout
    from ccl.fused_linear import Int4Weights, device_linear_add_rms_norm

    dev = torch.device("cuda", 0)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    g = torch.Generator(device=dev).manual_seed(seed)
    cap = 1 << 20
    nb = (DeviceMailbox.region_bytes(2, cap) + 4095) // 4096 * 4096
    buf = torch.empty(2 * nb, dtype=torch.uint8, device=dev)
    bases = [buf.data_ptr(), buf.data_ptr() + nb]
    for b in bases:
        DeviceMailbox.init_region(b, nb, dev)
    dms = [DeviceMailbox(r, 2, bases, cap, dev, timeout=10) for r in (0, 1)]
    streams = [torch.cuda.Stream(dev) for _ in dms]
    results, bad_total = [], 0

    def both(call):
        """``call(rank, dm)`` on each rank's stream, then wait for both and check them."""
        for r, dm in enumerate(dms):
            with torch.cuda.stream(streams[r]):
                call(r, dm)
        torch.cuda.synchronize(dev)
        for dm in dms:
            dm.raise_if_failed()

    def rand(shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    int_view = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
    # ---------------------------------------------------------------- all-reduce
    for nbytes in (8, 1024, 8192, 16384, 65536, 262144):
        for dtype in (torch.float32, torch.bfloat16):
            for algo in ("one_shot", "two_shot"):
                n = max(1, nbytes // (4 if dtype == torch.float32 else 2))
                bad = cross = 0
                for _ in range(max(4, args.iters // 5)):
                    xs = [rand((n,), dtype) for _ in dms]
                    ref = xs[0].float() + xs[1].float()
                    outs = [torch.full_like(xs[0], float("nan")) for _ in dms]
                    both(lambda k, dm: dm.all_reduce(xs[k], outs[k], algorithm=algo))
                    bad += sum(_mismatch(o, ref, dtype) for o in outs)
                    cross += int(not torch.equal(outs[0].view(int_view[dtype]),
                                                 outs[1].view(int_view[dtype])))
                results.append(dict(op="all_reduce", bytes=nbytes, dtype=str(dtype),
                                    algorithm=algo, bad_elements=bad,
                                    cross_rank_mismatches=cross, ok=bad == 0 and cross == 0))
                print(json.dumps(results[-1]), flush=True)
                bad_total += not results[-1]["ok"]
    # ---------------------------------------------------------------- TP Q/K norm
    t, qc, kc = 8, 3072, 512  # one rank of MiniMax-M2 at TP=2 (q 6144, k 1024 columns in all)
    for dtype in (torch.float32, torch.bfloat16):
        bad = 0
        for _ in range(max(4, args.iters // 5)):
            qkvs = [rand((t, qc + 2 * kc), dtype) for _ in dms]
            qws = [rand((qc,), dtype) for _ in dms]
            kws = [rand((kc,), dtype) for _ in dms]
            ssq = sum(p[:, :qc].float().pow(2).sum(-1) for p in qkvs)
            ssk = sum(p[:, qc:qc + kc].float().pow(2).sum(-1) for p in qkvs)
            outs = [(torch.full((t, qc), float("nan"), dtype=dtype, device=dev),
                     torch.full((t, kc), float("nan"), dtype=dtype, device=dev)) for _ in dms]
            both(lambda j, dm: dm.qk_rms_norm(qkvs[j][:, :qc], qkvs[j][:, qc:qc + kc], qws[j],
                                              kws[j], EPS, q_out=outs[j][0], k_out=outs[j][1]))
            for j in (0, 1):  # (each rank normalises its own shard: no cross-rank equality)
                rq = (qkvs[j][:, :qc].float() * torch.rsqrt(ssq / (2 * qc) + EPS)[:, None]
                      * qws[j].float())
                rk = (qkvs[j][:, qc:qc + kc].float() * torch.rsqrt(ssk / (2 * kc) + EPS)[:, None]
                      * kws[j].float())
                bad += _mismatch(outs[j][0], rq, dtype) + _mismatch(outs[j][1], rk, dtype)
        results.append(dict(op="qk_rms_norm", dtype=str(dtype), tokens=t, q_cols=qc, k_cols=kc,
                            bad_elements=bad, ok=bad == 0))
        print(json.dumps(results[-1]), flush=True)
        bad_total += not results[-1]["ok"]

    # ---------------------------------------------------------------- fused norm
    for rowwide in (False, True):
        for dm in dms:
            dm.norm_rowwide = rowwide
        for rows, cols, dtype in ((1, 4096, torch.bfloat16), (8, 7168, torch.bfloat16),
                                  (3, 1000, torch.float32), (1, 4096, torch.float32)):
            for alias in (False, True):  # in place: out = x, residual_out = residual (vLLM)
                bad = cross = 0
                for _ in range(args.iters):
                    xs = [rand((rows, cols), dtype) for _ in dms]
                    res = rand((rows, cols), dtype)
                    w = rand((cols,), dtype)
                    r = xs[0].float() + xs[1].float() + res.float()
                    ref_o = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * w.float()
                    ress = [res.clone() for _ in dms]
                    if alias:
                        outs, routs = xs, ress
                    else:
                        outs = [torch.full_like(res, float("nan")) for _ in dms]
                        routs = [torch.full_like(res, float("nan")) for _ in dms]
                    both(lambda k, dm: dm.add_rms_norm(xs[k], ress[k], w, EPS, out=outs[k],
                                                       residual_out=routs[k]))
                    for k in (0, 1):
                        bad += _mismatch(outs[k], ref_o, dtype) + _mismatch(routs[k], r, dtype)
                    cross += int(not (torch.equal(outs[0].view(int_view[dtype]),
                                                  outs[1].view(int_view[dtype]))
                                      and torch.equal(routs[0].view(int_view[dtype]),
                                                      routs[1].view(int_view[dtype]))))
                split = dms[0]._norm_split(rows, cols // (2 if dtype != torch.float32 else 1))
                results.append(dict(op="add_rms_norm", rowwide=rowwide, shape=[rows, cols],
                                    dtype=str(dtype), in_place=alias, programs_per_row=split,
                                    calls=args.iters, bad_elements=bad,
                                    cross_rank_mismatches=cross, ok=bad == 0 and cross == 0))
                print(json.dumps(results[-1]), flush=True)
                bad_total += not results[-1]["ok"]
    for dm in dms:
        dm.norm_rowwide = False

    # ---------------------------------------------------------------- fused linear, direct
    k, n = 1536, 3072
    for kind in ("bf16", "int4"):
        ws, deq = [], []
        for _ in dms:
            if kind == "int4":
                q = Int4Weights(torch.randint(-(1 << 31), 1 << 31, (k // 8, n), generator=g,
                                              device=dev, dtype=torch.int64).to(torch.int32),
                                (torch.rand(k // 128, n, generator=g, device=dev) * 0.004
                                 + 0.002).to(torch.bfloat16), 128)
                ws.append((None, q))
                deq.append(q.dequantize())
            else:
                wd = rand((k, n), torch.bfloat16, 0.02)
                ws.append((wd, None))
                deq.append(wd.float())
        for m in (1, 8):
            for split in (None, 1, 2, 8):
                for alias in (False, True):
                    bad = cross = 0
                    for _ in range(max(4, args.iters // 5)):
                        xs = [rand((m, k), torch.bfloat16) for _ in dms]
                        res = rand((m, n), torch.bfloat16)
                        nw = rand((n,), torch.bfloat16)
                        # the kernel rounds x @ W in fp32 tiles; the reference in fp32 too
                        r = (xs[0].float() @ deq[0] + xs[1].float() @ deq[1]) + res.float()
                        ref_o = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * \
                            nw.float()
                        outs = [torch.full_like(res, float("nan")) for _ in dms]
                        ress = [res.clone() for _ in dms]
                        routs = [ress[j] if alias else torch.full_like(res, float("nan"))
                                 for j in (0, 1)]
                        both(lambda j, dm: device_linear_add_rms_norm(
                            dm, xs[j], ws[j][0], ws[j][1], ress[j], nw, EPS, out=outs[j],
                            residual_out=routs[j], epi_split=split, handoff="direct"))
                        for j in (0, 1):
                            bad += _mismatch(outs[j], ref_o, torch.bfloat16)
                            bad += _mismatch(routs[j], r, torch.bfloat16)
                        cross += int(not (torch.equal(outs[0], outs[1])
                                          and torch.equal(routs[0], routs[1])))
                    results.append(dict(op="linear_add_rms_norm", handoff="direct", weights=kind,
                                        M=m, K=k, N=n, epi_split=split, alias_residual=alias,
                                        bad_elements=bad, cross_rank_mismatches=cross,
                                        ok=bad == 0 and cross == 0))
                    print(json.dumps(results[-1]), flush=True)
                    bad_total += not results[-1]["ok"]

    # ---------------------------------------------------------------- timeout path
    for what in ("add_rms_norm 8x7168", "linear_add_rms_norm M8"):
        dms[0].set_timeout(0.5)
        x = rand((8, 7168 if what.startswith("add") else k), torch.bfloat16)
        t0 = time.time()
        with torch.cuda.stream(streams[0]):
            if what.startswith("add"):
                dms[0].add_rms_norm(x, x, x[0], EPS, out=torch.empty_like(x))
            else:
                device_linear_add_rms_norm(dms[0], x, ws[0][0], ws[0][1], None,
                                           torch.ones(n, dtype=torch.bfloat16, device=dev), EPS,
                                           out=torch.empty(8, n, dtype=torch.bfloat16,
                                                           device=dev),
                                           residual_out=None, handoff="direct")
        err = None
        try:
            dms[0].raise_if_failed()
        except CollectiveTimeout as e:
            err = e
        took = time.time() - t0
        ok = err is not None and err.missing_ranks == [1] and took < 30
        results.append(dict(op="timeout", case=what, raised=repr(err)[:300], seconds=took, ok=ok))
        print(json.dumps(results[-1]), flush=True)
        bad_total += not ok
        # the ranks now disagree on the sequence number: fresh mailboxes for the next case
        for b in bases:
            DeviceMailbox.init_region(b, nb, dev)
        dms = [DeviceMailbox(r, 2, bases, cap, dev, timeout=10) for r in (0, 1)]

    res = dict(bench="gpu_same_device", device=torch.cuda.get_device_name(dev),
               torch=torch.__version__, triton=__import__("triton").__version__, seed=seed,
               note="two ranks on one GPU (two streams, one process): correctness only",
               env={v: os.environ.get(v) for v in ("CCL_PDL", "CCL_INT4_DOT_LOAD")},
               all_ok=bad_total == 0, time=time.strftime("%Y-%m-%dT%H:%M:%S"), rows=results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"gpu_same_device: {'all ok' if bad_total == 0 else f'{bad_total} case(s) FAILED'}",
          flush=True)
    return 0 if bad_total == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
