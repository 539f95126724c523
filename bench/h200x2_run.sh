#!/usr/bin/env bash
# The GPU runs behind bench/results/h200x2*.json, one device-tool call per phase, on a lent
# 2x H200 machine (torch + Triton from its image; our package installed editable without deps).
#
#   bash bench/h200x2_run.sh core    # compile check, gpu_validate (correctness, 100k replayed
#                                    # ops, timeout path, timing), ccl-bench --device cuda
#   bash bench/h200x2_run.sh fused   # fused GEMV + all-reduce + norm, decode step
#
# Results go to $OUT (the device tool brings back at most 8 files: keep it that way).
set -uo pipefail
phase=${1:-core}
OUT=${OUT:-/tmp/ccl-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/$phase.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }

say "install"
python3 -m pip install -q --no-build-isolation --no-deps \
    -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1 || say "pip install FAILED"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >>"$log" 2>&1

case "$phase" in
core)
    say "compile check"
    timeout 120 python3 bench/gpu_compile_check.py --target cuda:90 --quick >>"$log" 2>&1 \
        || say "compile check FAILED rc=$?"
    say "gpu_validate"
    timeout 330 python3 bench/gpu_validate.py --out "$OUT" --algos one_shot --checked-replays 1000000 >>"$log" 2>&1 \
        || say "gpu_validate rc=$?"
    say "ccl-bench bf16"
    timeout 200 python3 -m ccl.bench --device cuda --dtype bfloat16 --max-bytes 256K -v --coll-timeout 10 \
        --out "$OUT/h200x2-ccl-bench-bf16" >>"$log" 2>&1 || say "ccl-bench rc=$?"
    ;;
fused)
    say "fused linear"
    timeout 240 python3 bench/gpu_fused_linear.py --out "$OUT" >>"$log" 2>&1 \
        || say "gpu_fused_linear rc=$?"
    say "decode step"
    timeout 300 python3 bench/decode_step.py --device cuda --full \
        --json "$OUT/h200x2-decode-step.json" >>"$log" 2>&1 || say "decode_step rc=$?"
    ;;
esac
say "done"
