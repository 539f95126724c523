#!/usr/bin/env bash
# Session 4, device call 4: rank 1 waits 3x longer than rank 0 before giving up: which rank's
# bound sets the length of a stall? (stall_probe --rank-limit-scale 2)
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
say install
python3 -m pip install -q --no-build-isolation --no-deps -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1
say probe
timeout 150 python3 bench/stall_probe.py --configs "^ar 64KB 16 progs$|^ar 128KB 128 progs$|^ar fp32 96KB 24 progs$" \
    --repeat 3 --replays 200 --timeout 0.1 --rank-limit-scale 2 --deadline 140 --json "$OUT/stall-scale.json" >>"$log" 2>&1 || say "rc=$?"
say done
