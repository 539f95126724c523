#!/usr/bin/env bash
# Session 4, device call 6: after the warp-uniform spin fix, with the split fused norm on by
# default: correctness (eager + 100k graph-replayed ops, both algorithms, mismatch, timeout)
# and the timing table vs NCCL / SymmetricMemory, then the decode step (full shape).
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
say install
python3 -m pip install -q --no-build-isolation --no-deps -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1
say gpu_validate
timeout 200 python3 bench/gpu_validate.py --out "$OUT" --quick --algos one_shot,two_shot --timeout 30 \
    --checked-replays 1000000 >>"$log" 2>&1 || say "gpu_validate rc=$?"
say "decode step"
timeout 220 python3 bench/decode_step.py --device cuda --full --timeout 210 \
    --json "$OUT/h200x2-decode-step.json" >>"$log" 2>&1 || say "decode_step rc=$?"
say done
