#!/usr/bin/env bash
# Quick start (a): set up, then run the main job: ccl-bench on the host transport, 2 ranks,
# ours vs gloo measured in the same run. Extra arguments go to ccl-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CCL_VENV:-.venv}/bin/ccl-bench" --ranks 2 "$@"
