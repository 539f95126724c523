#!/usr/bin/env bash
# Session 4, device call 7: all-reduce program size (CCL_DEVICE_MAX_BLOCK 1024 vs 256 payload
# words per program) with the warp-uniform spin exits: correctness (eager + 100k
# graph-replayed ops) and timing vs NCCL / SymmetricMemory, one validation run each.
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
say install
python3 -m pip install -q --no-build-isolation --no-deps -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1
for b in 256 1024; do
  say "gpu_validate max_block $b"
  mkdir -p "$OUT/b$b"
  CCL_DEVICE_MAX_BLOCK=$b timeout 150 python3 bench/gpu_validate.py --out "$OUT/b$b" --quick --algos one_shot \
      --timeout 30 --skip timeout,mismatch --checked-replays 1000000 >>"$log" 2>&1 || say "rc=$?"
done
say done
