#!/usr/bin/env bash
# Session 4, device call 5: the uniform spin control (ll.all_warps_max). The stall probe's
# configurations that stalled in every earlier run, then the fused-linear bench that hung in
# every session-3 run, then the correctness validation (100k graph-replayed ops).
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
say install
python3 -m pip install -q --no-build-isolation --no-deps -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1
say "stall probe"
timeout 120 python3 bench/stall_probe.py --configs "^ar 1KB$|^ar 16KB$|^ar 64KB 16 progs$|^ar 128KB 128 progs$|^ar fp32 96KB 24 progs$|norm" \
    --repeat 3 --replays 200 --timeout 1 --deadline 110 --json "$OUT/stall-fixed.json" >>"$log" 2>&1 || say "rc=$?"
say "fused linear"
timeout 200 python3 bench/gpu_fused_linear.py --out "$OUT" --timeout 190 >>"$log" 2>&1 || say "rc=$?"
say "gpu_validate"
timeout 150 python3 bench/gpu_validate.py --out "$OUT" --quick --algos one_shot --timeout 30 \
    --checked-replays 1000000 >>"$log" 2>&1 || say "gpu_validate rc=$?"
say done
