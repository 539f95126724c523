#!/usr/bin/env python3
"""The MoE stand-in's two kernels on one GPU, per tile variant: the gate/up kernel and the
routed down projection (``ccl.fused_linear.device_moe_gate_up`` / ``device_linear_partial``
with routing), at one rank's MiniMax-M2 shard (H 3072, I 1536 / world, top-8 of 256 INT4
experts, GPTQ group 128), one token.

Each variant is first checked against a dequantise-then-matmul fp32 reference, then timed
under CUDA-graph replay: one graph of ``--inner`` calls, each call routed to its own random
experts (so the weights come from HBM, as in a decode step, not from L2), replayed
``--rounds`` times; the figure is the median per call. The roofline is the bytes a call must
read (the routed experts' packed weights and scales) over the device's HBM bandwidth
(``--hbm-tbps``, H200: 4.8).

    python bench/gpu_moe.py --json bench/results/h200-moe.json
    python bench/gpu_moe.py --down 16x256x8,8x256x4 --up 16x512x4,16x1024x8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _tiles(spec, path):
    """GemvTiles of an INT4 ``path`` ("up" / "down") variant ``BNxBKxWARPS``, parsed and
    checked as ``CCL_GEMV_TILES`` entries are (None: the library default)."""
    from ccl.fused_linear import _tile_overrides

    return None if spec == "default" else _tile_overrides(f"{path}_int4={spec}")[(path, True)]


def _time_graph(torch, calls, inner, rounds):
    """Median seconds per call over ``rounds`` replays of one graph of ``inner`` calls
    (without CUDA: the calls run eagerly once, a smoke run of the interpreter)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for i in range(inner):
            calls(i)
        return (time.perf_counter() - t0) / inner, (time.perf_counter() - t0) / inner
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(inner):
            calls(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(inner):
            calls(i)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times), min(times)


def _device_and_seed(torch, bench: str, seed):
    """(device, seed, generator) of a one-GPU bench: CUDA device 0, or the CPU under
    TRITON_INTERPRET=1 (a smoke run); None, having said so, when neither is there."""
    if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        print(f"{bench}: SKIPPED, no CUDA device (--small with TRITON_INTERPRET=1 runs the "
              "interpreter)", file=sys.stderr)
        return None
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    return dev, seed, torch.Generator(device=dev).manual_seed(seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, help="TP ranks the shard is cut for")
    ap.add_argument("--up", default="default", help="gate/up tile variants BNxBKxWARPS")
    ap.add_argument("--down", default="default", help="down projection tile variants")
    ap.add_argument("--inner", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--small", action="store_true",
                    help="a tiny shape (H 256, 16 experts) for a Triton-interpreter smoke run "
                         "on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.small:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from ccl.fused_linear import Int4Weights, device_linear_partial, device_moe_gate_up

    setup = _device_and_seed(torch, "gpu_moe", args.seed)
    if setup is None:
        return 0
    dev, seed, g = setup
    hdim, inter, e, topk, gs = (256, 128, 16, 8, 128) if args.small else \
        (3072, 1536 // args.world, 256, 8, 128)
    bf = torch.bfloat16

    def int4(rows, cols):
        q = torch.randint(-(1 << 31), 1 << 31, (e, rows // 8, cols), generator=g, device=dev,
                          dtype=torch.int64).to(torch.int32)
        s = (torch.rand(e, rows // gs, cols, generator=g, device=dev) * 0.02 + 0.01).to(bf)
        return Int4Weights(q, s, gs)

    q13, q2 = int4(hdim, 2 * inter), int4(inter, hdim)
    x = (torch.randn(1, hdim, generator=g, device=dev)).to(bf)
    ids = [torch.randperm(e, generator=g, device=dev)[:topk].view(1, topk)
           for _ in range(args.inner)]
    tws = [torch.softmax(torch.randn(1, topk, generator=g, device=dev), -1) for _ in ids]
    hs = [torch.empty(topk, inter, dtype=bf, device=dev) for _ in ids]
    outs = [torch.empty(1, hdim, dtype=bf, device=dev) for _ in ids]

    # reference of call 0: the routed experts dequantised in fp32
    def deq(q, ex):
        return Int4Weights(q.qweight[ex].contiguous(), q.scales[ex].contiguous(),
                           gs).dequantize()

    e0 = ids[0][0].tolist()
    g13 = torch.stack([x.float()[0] @ deq(q13, ex) for ex in e0])  # [topk, 2I]
    h_ref = (torch.nn.functional.silu(g13[:, :inter]) * g13[:, inter:]).to(bf)
    rows = []
    bytes_up = topk * (hdim // 8 * 2 * inter * 4 + hdim // gs * 2 * inter * 2)
    bytes_down = topk * (inter // 8 * hdim * 4 + inter // gs * hdim * 2)
    for spec in args.up.split(","):
        t = _tiles(spec, "up")
        h = device_moe_gate_up(x, ids[0], None, quant=q13, tiles=t)
        err = float((h.float() - h_ref.float()).abs().max())
        ok = bool(torch.allclose(h.float(), h_ref.float(), rtol=2e-2, atol=2e-2))
        med, best = _time_graph(torch, lambda i, t=t: device_moe_gate_up(
            x, ids[i], None, quant=q13, tiles=t, out=hs[i]), args.inner, args.rounds)
        rows.append(dict(kernel="gate_up", tiles=spec, ok=ok, max_abs_err=err, us=med * 1e6,
                         best_us=best * 1e6, bytes=bytes_up,
                         roofline_us=bytes_up / (args.hbm_tbps * 1e12) * 1e6))
        print(json.dumps(rows[-1]), flush=True)
    h0 = device_moe_gate_up(x, ids[0], None, quant=q13)
    y_ref = sum(tws[0][0, j] * (h0[j].float() @ deq(q2, ex)) for j, ex in enumerate(e0))
    for i in range(args.inner):  # every call's own intermediate
        device_moe_gate_up(x, ids[i], None, quant=q13, out=hs[i])
    for spec in args.down.split(","):
        t = _tiles(spec, "down")
        y = device_linear_partial(hs[0], None, quant=q2, topk_ids=ids[0], topk_weights=tws[0],
                                  tiles=t)
        err = float((y[0] - y_ref).abs().max())
        ok = bool(torch.allclose(y[0], y_ref, rtol=2e-2, atol=2e-2 * float(y_ref.abs().max())))
        med, best = _time_graph(torch, lambda i, t=t: device_linear_partial(
            hs[i], None, quant=q2, topk_ids=ids[i], topk_weights=tws[i], tiles=t, out=outs[i]),
            args.inner, args.rounds)
        rows.append(dict(kernel="down", tiles=spec, ok=ok, max_abs_err=err, us=med * 1e6,
                         best_us=best * 1e6, bytes=bytes_down,
                         roofline_us=bytes_down / (args.hbm_tbps * 1e12) * 1e6))
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        "cpu (Triton interpreter, smoke run: times are not GPU times)"
    res = dict(bench="gpu_moe", device=name, torch=torch.__version__,
               triton=__import__("triton").__version__, seed=seed,
               shape=dict(hidden=hdim, inter_per_rank=inter, experts=e, top_k=topk,
                          group_size=gs, tokens=1, world=args.world),
               method=f"CUDA graph of {args.inner} calls (each its own random experts), "
                      f"{args.rounds} replays, median per call",
               time=time.strftime("%Y-%m-%dT%H:%M:%S"), rows=rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"gpu_moe: {len(bad)} variant(s) differ from the reference", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
