"""ccl-bench: latency of the mailbox collectives against a baseline measured in the same run.

    ccl-bench                         # spawns --ranks (2) local ranks itself
    mpiexec -n 2 ccl-bench            # mpi4py bootstrap, gloo group for the baseline
    torchrun --nproc-per-node 2 -m ccl.bench

For each op (all_reduce, all_reduce_add_rms_norm, qk_rms_norm) and size (8 B .. 4 MiB,
powers of two) it times the ccl call and the baseline (gloo all_reduce, plus the torch
epilogue for the fused ops) interleaved in blocks, checks a sample of ccl results against
``ccl.kernels.reference`` (#wrong; a wrong point reports no timing), and prints an
nccl-tests style table on stdout. Rank 0 writes JSON and a PNG (``bench/results/<device>-
<world>rank[-<dtype>].{json,png}`` by default). Progress goes to stderr.

Timing on CPU: ``time.perf_counter_ns`` around each call on every rank, after a warm-up; the
number of calls per size adapts to its cost (at least ``--min-reps`` and ``--min-time``,
at most ``--max-time`` unless ``--min-reps`` needs more); reported percentiles are the
maximum over ranks of each rank's percentile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

logger = logging.getLogger("ccl.bench")

_MiB = 1 << 20
_QUICK_SIZES = (8, 1024, 16384)


# ---------------------------------------------------------------------- CLI
def _size(text: str) -> int:
    """'8', '1K', '4M', '64KiB' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    if mult > 1:
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8, 64K, 4M)") from None


def _parser() -> argparse.ArgumentParser:
    from ccl._bench_cases import DTYPES, OPS

    p = argparse.ArgumentParser(
        prog="ccl-bench",
        description="Latency (p50/p99, us) of ccl collectives vs a same-run baseline.",
        epilog="Under mpiexec or torchrun the launcher's ranks are used and --ranks is ignored.",
    )
    p.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated subset of {','.join(OPS)} (default: all)",
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--min-bytes", type=_size, default=8, help="smallest size (default 8)")
    p.add_argument("--max-bytes", type=_size, default=4 * _MiB, help="largest size (default 4M)")
    p.add_argument("--ranks", type=int, default=2, help="local ranks to spawn without a launcher")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (host transport, gloo baseline) or cuda (one rank per GPU, NCCL and torch "
        "SymmetricMemory baselines, CUDA-graph replay)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=0,
        help="fixed calls per size and implementation (default: adaptive)",
    )
    p.add_argument("--warmup", type=int, default=200, help="warm-up calls at each op's first size")
    p.add_argument("--min-reps", type=int, default=200)
    p.add_argument(
        "--min-time",
        type=float,
        default=0.3,
        help="seconds of calls per size and implementation at least (default 0.3)",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=1.5,
        help="seconds per size and implementation at most; beats --min-reps",
    )
    p.add_argument(
        "--max-reps",
        type=int,
        default=20000,
        help="calls per size and implementation at most (bounds a run whose calibration "
        "caught a quiet moment)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=8,
        help="ccl and baseline alternate in this many blocks per size",
    )
    p.add_argument(
        "--hidden",
        type=int,
        default=4096,
        help="all_reduce_add_rms_norm shape: rows x min(count, HIDDEN)",
    )
    p.add_argument(
        "--qk-dims",
        default="6144,1024",
        help="qk_rms_norm full q,k widths, split over the ranks (default MiniMax-M2)",
    )
    p.add_argument("--qk-max-tokens", type=int, default=1024)
    p.add_argument(
        "--mailbox-bytes",
        type=_size,
        default=None,
        help="Communicator max_bytes (default: CCL_MAX_BYTES or the library's)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="also time one_shot vs two_shot and print the suggested ccl/tuning.py "
        "threshold for this world size",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {', '.join(map(str, _QUICK_SIZES))} only, short timing (tests)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output prefix for .json/.png (default bench/results/<device>-<N>rank)",
    )
    p.add_argument("--json", default=None, help="JSON path (overrides --out for the JSON)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="whole-run limit in seconds (spawned ranks are stopped after it)",
    )
    p.add_argument(
        "--coll-timeout",
        type=float,
        default=60.0,
        help="Communicator / gloo timeout per call, seconds",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="library INFO logs on stderr")
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    from ccl._bench_cases import DTYPES, OPS, TIMERS

    p = _parser()
    args = p.parse_args(argv)
    if args.device not in TIMERS and args.device != "cuda":
        p.error(
            f"--device {args.device}: no timing backend yet (have {', '.join(TIMERS)}; "
            "ccl/_bench_cases.py keys TIMERS and BASELINES by device)"
        )
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad or not args.ops:
        p.error(f"--ops: unknown {bad or 'empty list'}; choose from {', '.join(OPS)}")
    args.torch_dtype = DTYPES[args.dtype]
    try:
        args.qk_dims = tuple(int(v) for v in args.qk_dims.split(","))
        assert len(args.qk_dims) == 2 and min(args.qk_dims) > 0
    except (ValueError, AssertionError):
        p.error(f"--qk-dims wants two positive integers 'Q,K', got {args.qk_dims!r}")
    if args.min_bytes < 1 or args.max_bytes < args.min_bytes:
        p.error(f"need 1 <= --min-bytes <= --max-bytes, got {args.min_bytes} and {args.max_bytes}")
    if args.ranks < 1:
        p.error("--ranks must be >= 1")
    if args.quick:
        args.min_reps, args.min_time, args.max_time = 50, 0.05, 0.3
        args.warmup, args.blocks = min(args.warmup, 50), min(args.blocks, 4)
    return args


def _sizes(args) -> list[int]:
    if args.quick:
        return [s for s in _QUICK_SIZES if args.min_bytes <= s <= args.max_bytes] or [
            args.min_bytes
        ]
    out, s = [], 1 << max(0, (args.min_bytes - 1).bit_length())
    while s <= args.max_bytes:
        out.append(s)
        s *= 2
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ccl-bench`` / ``python -m ccl.bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from ccl._cli_launch import detect_launcher, join, spawn

    if args.device == "cuda":  # spawns one rank per GPU itself (ccl/_bench_cuda.py)
        from ccl import _bench_cuda

        sys.exit(_bench_cuda.run(args))
    launcher = detect_launcher()
    if launcher == "none":
        sys.exit(spawn("ccl.bench", argv, args.ranks, timeout_s=args.timeout))
    _limit_threads()
    worker = join(launcher, timeout_s=args.coll_timeout, gloo=True)
    try:
        status = _run(worker, args)
    finally:
        worker.close()
    sys.exit(status)


def _limit_threads() -> None:
    """One share of the cores per local rank, so ranks do not oversubscribe the machine."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


# ---------------------------------------------------------------------- the run
class _Out:
    """Rank 0 writes the table (stdout) and progress (stderr); other ranks stay silent."""

    def __init__(self, rank: int, quiet: bool):
        self.on = rank == 0
        self.progress_on = self.on and not quiet
        self.tty = sys.stderr.isatty()
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        if self.on:
            self.lines.append(text)
            print(text, flush=True)  # noqa: T201 - the CLI's table

    def progress(self, text: str) -> None:
        if self.progress_on:
            if self.tty:
                sys.stderr.write("\r\033[K" + text)
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def progress_done(self) -> None:
        if self.progress_on and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _run(worker, args) -> int:
    from ccl import tuning
    from ccl._bench_cases import OPS, TIMED_FORMS, TIMERS, CaseConfig, baseline, case_sizes
    from ccl._cli_launch import machine_info, rank_info

    out = _Out(worker.rank, args.quiet)
    comm = worker.make_communicator(max_bytes=args.mailbox_bytes, timeout=args.coll_timeout)
    started = time.monotonic()
    try:
        timer = TIMERS[args.device]()
        cfg = CaseConfig(
            device=args.device,
            dtype=args.torch_dtype,
            seed=args.seed,
            hidden=args.hidden,
            qk_dims=args.qk_dims,
            qk_max_tokens=args.qk_max_tokens,
            fallback="mpi" if worker.mpi_comm is not None else "gloo",
            tune=args.tune,
        )
        ranks = worker.all_gather(rank_info(worker.rank))
        machine = machine_info()
        machine["loadavg_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        two_shot = tuning.two_shot_threshold("host", worker.world_size)
        config = {
            "device": args.device,
            "transport": comm.transport,
            "world_size": worker.world_size,
            "launcher": worker.launcher,
            "dtype": args.dtype,
            "ops": args.ops,
            "sizes": _sizes(args),
            "mailbox_bytes": comm.max_bytes,
            "two_shot_above": None if two_shot >= 1 << 62 else two_shot,
            "timer": timer.name,
            "timer_overhead_ns": timer.overhead_ns(),
            "warmup": args.warmup,
            "iters": args.iters or None,
            "min_reps": args.min_reps,
            "min_time_s": args.min_time,
            "max_time_s": args.max_time,
            "max_reps": args.max_reps,
            "blocks": args.blocks,
            "percentiles_over_ranks": "max",
            "hidden": args.hidden,
            "qk_dims": list(args.qk_dims),
            "qk_max_tokens": args.qk_max_tokens,
            "quick": args.quick,
            "baselines": {op: baseline(args.device, op)[0] for op in args.ops},
            "timed_forms": {op: TIMED_FORMS[op] for op in args.ops},
        }
        _header(out, machine, config, ranks)
        results: list[dict[str, Any]] = []
        plan = [
            (op, s)
            for op in OPS
            if op in args.ops
            for s in case_sizes(op, config["sizes"], cfg, comm.max_bytes)
        ]
        first_of_op = {op: True for op in args.ops}
        for i, (op, size) in enumerate(plan):
            out.progress(
                f"ccl-bench: {op} {args.dtype} {size} B  [{i + 1}/{len(plan)}]  "
                f"{time.monotonic() - started:.0f}s"
            )
            res = _measure_point(worker, comm, timer, cfg, args, op, size, first_of_op[op])
            first_of_op[op] = False
            results.append(res)
            out.progress_done()
            out.line(_row(res))
        tune = _tune_summary(results, worker.world_size) if args.tune else None
        ok = _footer(out, results, tune, time.monotonic() - started)
        if worker.rank == 0:
            report = {
                "schema": "ccl-bench/1",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "command": ["ccl-bench", *sys.argv[1:]],
                "machine": machine,
                "config": config,
                "ranks": ranks,
                "results": results,
                "tune": tune,
                "summary": {
                    "ok": ok,
                    "wrong": sum(r["wrong"] for r in results),
                    "points": len(results),
                    "elapsed_s": round(time.monotonic() - started, 1),
                },
                "stdout": out.lines,
            }
            _write_outputs(report, args, worker.world_size)
        worker.barrier()  # no rank exits (and so no launcher stops rank 0) before the files exist
        return 0 if ok else 1
    finally:
        comm.close()


def _measure_point(worker, comm, timer, cfg, args, op, size, first) -> dict[str, Any]:
    """Times every implementation of one (op, size) in alternating blocks; collective."""
    import numpy as np

    from ccl._bench_cases import NROT, SHORT_NAMES, build_case

    case = build_case(op, size, comm, cfg)
    names = list(case.impls)
    worker.barrier()
    # Touch the buffers, then a short calibration sets the calls per implementation (the
    # same on every rank: the slowest rank's estimate wins).
    est = {}
    for name in names:
        timer.untimed(case.impls[name], args.warmup if first else 2)
        est[name] = float(np.mean(timer.run(case.impls[name], 10)))
    est_all = worker.all_gather(est)
    reps, warm = {}, {}
    for name in names:
        e = max(max(d[name] for d in est_all), 1.0)
        if args.iters:
            reps[name] = max(args.iters, NROT)
        else:
            n = max(args.min_reps, math.ceil(args.min_time * 1e9 / e))
            n = min(n, math.floor(args.max_time * 1e9 / e), args.max_reps)
            reps[name] = max(n, 10)
        warm[name] = min(args.warmup, max(2, math.ceil(0.03e9 / e)))
    for name in names:
        timer.untimed(case.impls[name], warm[name])
    # Every block writes each of the NROT output buffers at least once before they are checked
    # (by the timed calls, or by the case's untimed verify calls).
    blocks = max(1, min(args.blocks, min(reps.values()) // max(5, NROT)))
    samples: dict[str, list[int]] = {n: [] for n in names}
    wrong = {n: 0 for n in case.checked}
    for b in range(blocks):
        for name in names if b % 2 == 0 else reversed(names):
            n = reps[name] // blocks + (b < reps[name] % blocks)
            if name in case.checked:
                case.poison()
            samples[name].extend(timer.run(case.impls[name], n))
            if name in case.checked:
                if case.verify is not None:  # untimed calls that produce the checked outputs
                    case.verify(name)
                wrong[name] += case.check()
    mine = {
        "stats": {n: _stats(samples[n]) for n in names},
        "wrong": wrong,
        "digest": case.digest() if case.digest is not None else None,
        "base_verified": case.base_verified,
    }
    everyone = worker.all_gather(mine)
    digests = {d["digest"] for d in everyone}
    ranks_disagree = len(digests) > 1
    total_wrong = {n: sum(d["wrong"][n] for d in everyone) for n in case.checked}
    n_wrong = sum(total_wrong.values()) + (worker.world_size if ranks_disagree else 0)
    per_rank = {n: [d["stats"][n] for d in everyone] for n in names}
    merged = {n: _max_over_ranks(per_rank[n]) for n in names}
    for n in case.checked:  # never report timings of wrong results
        if total_wrong[n] or ranks_disagree:
            merged[n] = None
    base_ok = all(d["base_verified"] for d in everyone)
    ccl, base = merged["ccl"], merged["base"] if base_ok else None
    return {
        "op": op,
        "short": SHORT_NAMES[op],
        "dtype": str(case.dtype).removeprefix("torch."),
        "size_bytes": size,
        "count": case.count,
        "shape": case.shape,
        "algo": case.algo,
        "ccl": ccl,
        "baseline": base,
        "variants": {n: merged[n] for n in names if n not in ("ccl", "base")} or None,
        "ratio_p50": (ccl["p50_us"] / base["p50_us"]) if ccl and base and base["p50_us"] else None,
        "wrong": n_wrong,
        "checked": blocks * len(case.checked) * case.checks_per_block * worker.world_size,
        "ranks_agree": None if case.digest is None else not ranks_disagree,
        "baseline_verified": base_ok,
        "per_rank_p50_us": {n: [s["p50_us"] for s in per_rank[n]] for n in names},
        **case.notes,
    }


def _stats(ns: list[int]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(ns, dtype=np.float64) / 1e3
    p10, p50, p90, p99 = np.percentile(a, [10, 50, 90, 99])
    return {
        "p10_us": float(p10),
        "p50_us": float(p50),
        "p90_us": float(p90),
        "p99_us": float(p99),
        "mean_us": float(a.mean()),
        "min_us": float(a.min()),
        "reps": int(a.size),
    }


def _max_over_ranks(stats: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(s[k] for s in stats) for k in stats[0]}


# ---------------------------------------------------------------------- output
_COLS = "{:>10} {:>10} {:>8} {:>10} {:>14} {:>6}  {:>9} {:>9}  {:>9} {:>9}  {:>7} {:>6}"
_LEAD = 10 + 1 + 10 + 1 + 8 + 1 + 10 + 1 + 14 + 1 + 6  # width before the timing columns

# The performance bar the core is tuned against (DESIGN.md §1): ccl p50 / baseline p50.
_TARGETS = (
    ("all_reduce", "float32", 8, 0.02),
    ("all_reduce", "float32", 1024, 0.02),
    ("all_reduce", "float32", 8192, 0.02),
    ("all_reduce", "float32", 65536, 0.05),
    ("all_reduce_add_rms_norm", "float32", 16384, 0.02),  # 1 x 4096
)


def _header(out: _Out, machine, config, ranks) -> None:
    from ccl._cli_launch import cpu_list

    two = config["two_shot_above"]
    out.line(
        f"# ccl-bench: mailbox-ccl {machine['ccl']}, torch {machine['torch']}, "
        f"python {machine['python']}"
    )
    out.line(
        f"# device {config['device']}, transport {config['transport']}, "
        f"world {config['world_size']}, launcher {config['launcher']}, dtype {config['dtype']}, "
        f"mailbox {config['mailbox_bytes']} B, "
        f"two-shot above {'never' if two is None else f'{two} B'}"
    )
    out.line(
        f"# machine {machine['hostname']}: {machine['cpu_model']}, {machine['nproc']} cpus, "
        f"kernel {machine['kernel']}, load average {machine['loadavg_start']}"
    )
    reps = (
        f"{config['iters']} calls"
        if config["iters"]
        else f">= {config['min_reps']} calls and >= {config['min_time_s']} s "
        f"(<= {config['max_time_s']} s, <= {config['max_reps']} calls)"
    )
    out.line(
        f"# timing: {config['timer']} (empty call {config['timer_overhead_ns']:.0f} ns), "
        f"{reps} per size and implementation, ccl and baseline alternating in "
        f"{config['blocks']} blocks; p50/p99 = max over ranks of each rank's percentile"
    )
    for op, name in config["baselines"].items():
        out.line(f"# baseline {op}: {name}")
    out.line(
        f"# shapes: all_reduce_add_rms_norm rows x min(count, {config['hidden']}); "
        f"qk_rms_norm tokens x (q+k cols per rank), full widths {config['qk_dims']}, "
        f"size = 8 B per token"
    )
    for op, forms in config["timed_forms"].items():
        out.line(f"# timed form {op}: ccl {forms['ccl']}; baseline {forms['baseline']}")
    out.line(
        "# checked ccl calls use 3 input sets in rotation; an out= call above the mailbox "
        "size adds one copy to the wrapped backend's call"
    )
    out.line("#")
    for r in ranks:
        out.line(
            f"#  Rank {r['rank']:2d} Pid {r['pid']:7d} on {r['host']} cpus "
            f"{cpu_list(r['affinity'])} torch threads {r['torch_threads']}"
        )
    out.line("#")
    out.line(
        "#" + " " * (_LEAD - 1) + "  " + "ccl (us)".center(19) + "  " + "baseline (us)".center(19)
    )
    out.line(
        "#"
        + _COLS.format(
            "size(B)",
            "count",
            "type",
            "op",
            "shape",
            "algo",
            "p50",
            "p99",
            "p50",
            "p99",
            "ratio",
            "#wrong",
        )[1:]
    )


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 1000 else f"{v:.0f}"


def _row(r: dict[str, Any]) -> str:
    c, b = r["ccl"] or {}, r["baseline"] or {}
    ratio = f"{r['ratio_p50']:.3f}" if r["ratio_p50"] is not None else "-"
    line = _COLS.format(
        r["size_bytes"],
        r["count"],
        r["dtype"],
        r["short"],
        r["shape"],
        r["algo"],
        _fmt_us(c.get("p50_us")),
        _fmt_us(c.get("p99_us")),
        _fmt_us(b.get("p50_us")),
        _fmt_us(b.get("p99_us")),
        ratio,
        r["wrong"],
    )
    if not r["baseline_verified"]:
        line += "  (baseline gave a wrong result)"
    return line


def _tune_summary(results, world: int) -> dict[str, Any]:
    """one_shot vs two_shot per size; the threshold is the largest size below the smallest
    size from which two_shot wins at every larger measured size."""
    rows = [r for r in results if r["variants"] and r["op"] == "all_reduce"]
    table = []
    for r in rows:
        one, two = r["variants"].get("one_shot"), r["variants"].get("two_shot")
        if one and two:
            table.append(
                {
                    "size_bytes": r["size_bytes"],
                    "one_shot_p50_us": one["p50_us"],
                    "two_shot_p50_us": two["p50_us"],
                    "best": "two_shot" if two["p50_us"] < one["p50_us"] else "one_shot",
                }
            )
    threshold = None
    for i in range(len(table)):
        if all(u["best"] == "two_shot" for u in table[i:]):
            threshold = table[i - 1]["size_bytes"] if i else 0
            break
    return {
        "transport": "host",
        "world_size": world,
        "op": "all_reduce",
        "sizes": table,
        "two_shot_above": threshold,
    }


def _footer(out: _Out, results, tune, elapsed: float) -> bool:
    wrong = sum(r["wrong"] for r in results)
    base_bad = [r for r in results if not r["baseline_verified"]]
    ok = wrong == 0 and not base_bad
    if tune is not None:
        out.line("#")
        out.line(
            "# tune: all_reduce one_shot vs two_shot p50 (us), host transport, "
            f"world {tune['world_size']}"
        )
        out.line(
            "#" + "{:>10} {:>10} {:>10} {:>9}".format("size(B)", "one_shot", "two_shot", "best")[1:]
        )
        for t in tune["sizes"]:
            out.line(
                "{:>10} {:>10} {:>10} {:>9}".format(
                    t["size_bytes"],
                    _fmt_us(t["one_shot_p50_us"]),
                    _fmt_us(t["two_shot_p50_us"]),
                    t["best"],
                )
            )
        thr = tune["two_shot_above"]
        value = "_NEVER" if thr is None else str(thr)
        out.line(f'# suggested ccl/tuning.py entry: ("host", {tune["world_size"]}): {value},')
    out.line("#")
    for op in dict.fromkeys(r["op"] for r in results):
        ratios = [r["ratio_p50"] for r in results if r["op"] == op and r["ratio_p50"]]
        if ratios:
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            out.line(
                f"# {op}: geomean ratio (ccl p50 / baseline p50) {geo:.3f} over {len(ratios)} sizes"
            )
    for op, dtype, size, bar in _TARGETS:
        r = next(
            (r for r in results if (r["op"], r["dtype"], r["size_bytes"]) == (op, dtype, size)),
            None,
        )
        if r is not None and r["ratio_p50"] is not None:
            met = "met" if r["ratio_p50"] <= bar else "not met"
            out.line(
                f"# target {op} {dtype} {size} B ({r['shape']}): ratio {r['ratio_p50']:.3f}"
                f" vs <= {bar} {met}"
            )
    out.line(f"# Wrong results : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    if base_bad:
        out.line(f"# Baseline wrong at {len(base_bad)} points FAILED")
    out.line(f"# {'OK' if ok else 'FAILED'} ({len(results)} points in {elapsed:.0f} s)")
    return ok


def _default_prefix(args, world: int) -> str:
    prefix = f"bench/results/{args.device}-{world}rank"
    if args.dtype != "float32":
        prefix += "-" + {"bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    if args.quick:
        prefix += "-quick"
    return prefix


def _write_outputs(report: dict[str, Any], args, world: int) -> None:
    prefix = args.out or _default_prefix(args, world)
    json_path = Path(args.json or prefix + ".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    sys.stderr.write(f"ccl-bench: wrote {json_path}\n")
    if not args.no_plot:
        from ccl._bench_plot import plot_report

        png = Path(prefix + ".png")
        try:
            plot_report(report, png)
            sys.stderr.write(f"ccl-bench: wrote {png}\n")
        except ImportError as e:
            sys.stderr.write(
                f"ccl-bench: no plot ({e}); pip install matplotlib or pass --no-plot\n"
            )


if __name__ == "__main__":
    main()
