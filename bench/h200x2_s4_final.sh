#!/usr/bin/env bash
# Session 4, last device call: the committed kernels (warp-uniform spin exits, split fused
# norm by default): fused linear (every case and tile variant) and the decode step.
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
say install
python3 -m pip install -q --no-build-isolation --no-deps -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1
say "fused linear"
timeout 150 python3 bench/gpu_fused_linear.py --out "$OUT" --timeout 140 >>"$log" 2>&1 || say "rc=$?"
say "decode step"
timeout 150 python3 bench/decode_step.py --device cuda --full --timeout 140 \
    --json "$OUT/h200x2-decode-step.json" >>"$log" 2>&1 || say "decode_step rc=$?"
say done
