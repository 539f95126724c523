#!/usr/bin/env bash
# Session-3 fused-linear run (one device call): M=1 with every tile variant, M=8 with the
# default tiles, then M=8 per variant with a short bound (diagnostic of the slow M=8 points).
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
for v in bn_half warps8; do
    say "fused M8 $v (diagnostic)"
    timeout 70 python3 bench/gpu_fused_linear.py --out "$OUT/diag" --ms 8 --variants $v --tag "m8-$v" \
        --ccl-timeout 5 --timeout 60 >>"$log" 2>&1 || say "rc=$?"
done
say done
