"""PNG of a ``ccl-bench`` report: latency vs size, log-log, ccl vs baseline, one panel per op.

Used by ``ccl-bench`` and by ``bench/plot.py`` (re-plots a saved JSON). Needs matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_report"]


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Writes the PNG for ``report`` (the ccl-bench JSON object) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    ops = list(dict.fromkeys(r["op"] for r in results))
    cfg, machine = report["config"], report["machine"]
    fig, axes = plt.subplots(
        1, max(1, len(ops)), figsize=(5.2 * max(1, len(ops)), 4.4), squeeze=False
    )
    for ax, op in zip(axes[0], ops):
        rows = [r for r in results if r["op"] == op]
        for key, label, color in (
            ("ccl", "ccl", "tab:blue"),
            ("baseline", "baseline", "tab:orange"),
        ):
            pts = [(r["size_bytes"], r[key]) for r in rows if r[key]]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(
                xs, [p[1]["p50_us"] for p in pts], "o-", color=color, ms=3, label=f"{label} p50"
            )
            ax.plot(
                xs, [p[1]["p99_us"] for p in pts], "--", color=color, lw=0.8, label=f"{label} p99"
            )
            ax.fill_between(
                xs,
                [p[1]["p10_us"] for p in pts],
                [p[1]["p90_us"] for p in pts],
                color=color,
                alpha=0.12,
                lw=0,
            )
        bad = [r["size_bytes"] for r in rows if r["wrong"]]
        for i, x in enumerate(bad):
            ax.axvline(
                x, color="red", lw=0.8, label="wrong results (not timed)" if i == 0 else None
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size per rank (bytes)" + (", 8 B/token" if op == "qk_rms_norm" else ""))
        ax.set_ylabel("latency (us)")
        ax.set_title(op, fontsize=10)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.legend(fontsize=7)
    baselines = "; ".join(f"{k}: {v}" for k, v in cfg.get("baselines", {}).items())
    fig.suptitle(
        f"ccl {machine['ccl']} {cfg['transport']} transport, {cfg['device']} "
        f"({machine['cpu_model']}, {machine['nproc']} cpus), world {cfg['world_size']}, "
        f"{cfg['dtype']}, launcher {cfg['launcher']}",
        fontsize=9,
    )
    fig.text(0.5, 0.005, "baseline = " + baselines, ha="center", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
