#!/usr/bin/env python3
"""The fused linear kernel's GEMV tiles alone on one GPU (``ccl.fused_linear.
device_linear_partial``), per tile variant, against torch's ``F.linear`` in the same run: one
rank's row-parallel shard (K 3072 / world, N 3072), bf16 and INT4 (GPTQ group 128) weights,
M = 1 and 8 tokens.

What it is for: the GEMV is most of the fused kernel's time, and tuning it needs only one GPU
(the two-GPU runs are scarcer). Each variant is first checked against a dequantise-then-matmul
fp32 reference, then timed under CUDA-graph replay: one graph of ``--inner`` calls rotating
over ``--copies`` copies of the weight (more bytes than the L2, so the weights come from HBM
as in a decode step), replayed ``--rounds`` times; the figure is the median per call. The
roofline is the weight bytes over ``--hbm-tbps``. INT4's torch baseline is ``F.linear`` on the
pre-dequantised bf16 weight (torch has no INT4 GEMV).

    python bench/gpu_gemv.py --json bench/results/h100-gemv.json
    python bench/gpu_gemv.py --variants default,dot_int4=32x128x4x4 --cases int4_M8
    CCL_INT4_DOT_LOAD=bcast python bench/gpu_gemv.py --tag bcast   # the INT4 dot load A/B
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_moe import _device_and_seed, _time_graph  # noqa: E402  (the MoE bench's)

CASES = ("bf16_M1", "int4_M1", "bf16_M8", "int4_M8")


def _tiles(spec):
    """GemvTiles of a ``CCL_GEMV_TILES``-style variant (``dot_int4=32x256x4x3``), parsed and
    checked by the library; ``default``: None (the library's choice)."""
    from ccl.fused_linear import _tile_overrides

    if spec == "default":
        return None, None
    ((key, t),) = _tile_overrides(spec).items()
    return key, t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, help="TP ranks the shard is cut for")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default="default",
                    help="comma list: default and CCL_GEMV_TILES entries (path=BNxBKxWARPS[xST]); "
                         "an entry applies to the cases of its path")
    ap.add_argument("--inner", type=int, default=32)
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--tag", default="", help="a label recorded with the results (an env A/B)")
    ap.add_argument("--small", action="store_true",
                    help="a tiny shape for a Triton-interpreter smoke run on CPU "
                         "(TRITON_INTERPRET=1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.small:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import torch.nn.functional as F

    from ccl.fused_linear import Int4Weights, device_linear_partial, gemv_tiles

    setup = _device_and_seed(torch, "gpu_gemv", args.seed)
    if setup is None:
        return 0
    dev, seed, g = setup
    k, n, gs = (64, 48, 32) if args.small else (3072 // args.world, 3072, 128)
    copies = 2 if args.small else args.copies
    bf = torch.bfloat16
    rows = []
    for case in args.cases.split(","):
        kind, m = case.split("_M")
        m = int(m)
        int4 = kind == "int4"
        x = torch.randn(m, k, generator=g, device=dev).to(bf)
        if int4:
            ws = [Int4Weights(torch.randint(-(1 << 31), 1 << 31, (k // 8, n), generator=g,
                                            device=dev, dtype=torch.int64).to(torch.int32),
                              (torch.rand(k // gs, n, generator=g, device=dev) * 0.02
                               + 0.01).to(bf), gs) for _ in range(copies)]
            dense = [w.dequantize().to(bf) for w in ws]  # [K, N]: torch's baseline operand
            ref = x.float() @ ws[0].dequantize()
            nbytes = k // 8 * n * 4 + k // gs * n * 2
        else:
            dense = [(torch.randn(k, n, generator=g, device=dev) * 0.05).to(bf)
                     for _ in range(copies)]
            ref = x.float() @ dense[0].float()
            nbytes = k * n * 2
        dense_t = [d.t().contiguous() for d in dense]  # F.linear's [N, K]
        outs = [torch.empty(m, n, dtype=torch.float32, device=dev) for _ in range(copies)]

        def ours(i, t):
            j = i % copies
            if int4:
                device_linear_partial(x, quant=ws[j], out=outs[j], tiles=t)
            else:
                device_linear_partial(x, dense[j], out=outs[j], tiles=t)

        path = ("row" if m <= 1 else "dot", int4)
        for spec in args.variants.split(","):
            key, t = _tiles(spec)
            if key is not None and key != path:
                continue
            ours(0, t)
            got = outs[0]
            err = float((got - ref).abs().max())
            ok = bool(torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())))
            med, best = _time_graph(torch, lambda i, t=t: ours(i, t), args.inner, args.rounds)
            tt = t or gemv_tiles(m, int4)
            rows.append(dict(case=case, variant=spec, tiles=f"{tt.bn}x{tt.bk}x{tt.num_warps}"
                             f"x{tt.stages}", ok=ok, max_abs_err=err, us=med * 1e6,
                             best_us=best * 1e6, bytes=nbytes,
                             roofline_us=nbytes / (args.hbm_tbps * 1e12) * 1e6))
            print(json.dumps(rows[-1]), flush=True)
        med, best = _time_graph(torch, lambda i: F.linear(x, dense_t[i % copies]), args.inner,
                                args.rounds)
        rows.append(dict(case=case, variant="torch F.linear (bf16 weight)", ok=True, us=med * 1e6,
                         best_us=best * 1e6, bytes=k * n * 2))
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        "cpu (Triton interpreter, smoke run: times are not GPU times)"
    res = dict(bench="gpu_gemv", device=name, torch=torch.__version__,
               triton=__import__("triton").__version__, seed=seed, tag=args.tag,
               env={v: os.environ.get(v) for v in ("CCL_INT4_DOT_LOAD", "CCL_INT4_SCALE_ONCE",
                                                   "CCL_GEMV_TILES", "CCL_PDL")},
               shape=dict(k_per_rank=k, n=n, group_size=gs, world=args.world),
               method=f"CUDA graph of {args.inner} calls over {copies} weight copies, "
                      f"{args.rounds} replays, median per call",
               time=time.strftime("%Y-%m-%dT%H:%M:%S"), rows=rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"gpu_gemv: {len(bad)} variant(s) differ from the reference", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
