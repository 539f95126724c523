"""Re-plot a saved ccl-bench result.

python bench/plot.py bench/results/cpu-2rank.json [-o out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", type=Path)
    p.add_argument(
        "-o", "--output", type=Path, default=None, help="PNG path (default: beside the JSON)"
    )
    args = p.parse_args(argv)
    from ccl._bench_plot import plot_report

    out = args.output or args.json.with_suffix(".png")
    plot_report(json.loads(args.json.read_text()), out)
    sys.stderr.write(f"wrote {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
