#!/usr/bin/env bash
# Session-3 fused-linear runs (one device call each): M=1 with the tile variants, M=8 with the
# default tiles (h200x2-fused-linear.json, h200x2-fused-linear-m8.json).
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
say install
python3 -m pip install -q --no-build-isolation --no-deps -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1
say "fused M1"
timeout 120 python3 bench/gpu_fused_linear.py --out "$OUT" --ms 1 --timeout 110 >>"$log" 2>&1 || say "rc=$?"
say "fused M8 default"
timeout 100 python3 bench/gpu_fused_linear.py --out "$OUT" --ms 8 --variants default --tag m8 \
    --timeout 90 >>"$log" 2>&1 || say "rc=$?"
say done
