#!/usr/bin/env bash
# The GPU runs behind bench/results/h200x2*.json, as one device-tool call on a lent 2x H200
# machine (torch + Triton from its image; our package installed editable, without deps):
#
#   bash bench/h200x2_run.sh                 # every step below, each under its own limit
#   bash bench/h200x2_run.sh fused decode    # only these steps
#
# Steps: validate (gpu_validate: correctness eager + 100k graph-replayed ops, mismatch,
# timeout path, timing), fused (gpu_fused_linear), decode (decode_step --full), bench
# (ccl-bench --device cuda). Results go to $OUT (the device tool brings back at most 8 files:
# keep it that way).
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
steps=${*:-validate fused decode bench}
want() { [[ " $steps " == *" $1 "* ]]; }

say "install"
python3 -m pip install -q --no-build-isolation --no-deps \
    -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1 || say "pip install FAILED"
nvidia-smi --query-gpu=name,driver_version --format=csv >>"$log" 2>&1

# The wait bound is 30 s: this VM showed simultaneous multi-second host stalls of both ranks
# (bench/results/h200x2-stall-probe.json), which a 5 s bound turns into timeouts.
if want validate; then
    say "gpu_validate"
    timeout 150 python3 bench/gpu_validate.py --out "$OUT" --quick --algos one_shot --timeout 30 \
        --checked-replays 1000000 >>"$log" 2>&1 || say "gpu_validate rc=$?"
fi
if want fused; then
    say "fused linear"
    timeout 200 python3 bench/gpu_fused_linear.py --out "$OUT" --timeout 190 >>"$log" 2>&1 \
        || say "gpu_fused_linear rc=$?"
fi
if want decode; then
    say "decode step"
    timeout 200 python3 bench/decode_step.py --device cuda --full --timeout 190 \
        --json "$OUT/h200x2-decode-step.json" >>"$log" 2>&1 || say "decode_step rc=$?"
fi
if want bench; then
    say "ccl-bench"
    timeout 60 python3 -m ccl.bench --device cuda --dtype bfloat16 --max-bytes 64K -v \
        --coll-timeout 30 --no-plot --out "$OUT/h200x2-ccl-bench-bf16" >>"$log" 2>&1 \
        || say "ccl-bench rc=$?"
fi
say "done"
