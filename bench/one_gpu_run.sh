#!/usr/bin/env bash
# The one-GPU runs (a lent nvidia-h100-x1 / nvidia-h200 machine, when no two-GPU machine is
# lent), as one device-tool call: torch + Triton from its image, our package installed
# editable without deps.
#
#   bash bench/one_gpu_run.sh                     # same_device gemv gemv_bcast ncu
#   bash bench/one_gpu_run.sh gemv                # only these steps
#
# Steps:
#   same_device  gpu_same_device: both ranks on this GPU (two streams), correctness of the
#                fused norm and the fused linear's direct handoff, and the timeout path
#   gemv         gpu_gemv: the GEMV tiles alone vs torch F.linear (GEMV_VARIANTS)
#   gemv_bcast   gpu_gemv INT4 M=8 with CCL_INT4_DOT_LOAD=bcast (GEMV_BCAST_VARIANTS)
#   ncu          Nsight Compute on the INT4 M=8 dot GEMV and the INT4 gate/up kernel
#   pdl          gpu_same_device and gpu_gemv again with CCL_PDL=1 (programmatic dependent
#                launch: correctness, and the GEMV's back-to-back time against the gemv step)
# Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/ccl-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
log="$OUT/run.log"
say() { echo "## $(date +%T) $*" | tee -a "$log"; }
steps=${*:-same_device gemv gemv_bcast pdl ncu}
want() { [[ " $steps " == *" $1 "* ]]; }

say "install"
python3 -m pip install -q --no-build-isolation --no-deps \
    -C cmake.define.CCL_TORCH_BACKEND=OFF -e . >>"$log" 2>&1 || say "pip install FAILED"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
say "gpu: $gpu"
case "$gpu" in *H100*) HBM=3.35 ;; *) HBM=4.8 ;; esac
tag=$(echo "$gpu" | grep -o 'H[0-9]00' | tr 'H' 'h' | head -1)
tag=${tag:-gpu}

if want same_device; then
    say "same device"
    timeout 240 python3 bench/gpu_same_device.py --json "$OUT/$tag-same-device.json" \
        >>"$log" 2>&1 || say "gpu_same_device rc=$?"
fi
if want gemv; then
    say "gemv"
    timeout 200 python3 bench/gpu_gemv.py --hbm-tbps $HBM --variants "${GEMV_VARIANTS:-default}" \
        --json "$OUT/$tag-gemv.json" >>"$log" 2>&1 || say "gpu_gemv rc=$?"
fi
if want gemv_bcast; then
    say "gemv, CCL_INT4_DOT_LOAD=bcast"
    CCL_INT4_DOT_LOAD=bcast timeout 200 python3 bench/gpu_gemv.py --hbm-tbps $HBM --cases int4_M8 \
        --variants "${GEMV_BCAST_VARIANTS:-default}" --tag bcast \
        --json "$OUT/$tag-gemv-bcast.json" >>"$log" 2>&1 || say "gpu_gemv rc=$?"
fi
if want pdl; then
    say "same device + gemv, CCL_PDL=1"
    CCL_PDL=1 timeout 240 python3 bench/gpu_same_device.py --json "$OUT/$tag-same-device-pdl.json" \
        >>"$log" 2>&1 || say "gpu_same_device (pdl) rc=$?"
    CCL_PDL=1 timeout 200 python3 bench/gpu_gemv.py --hbm-tbps $HBM --tag pdl \
        --json "$OUT/$tag-gemv-pdl.json" >>"$log" 2>&1 || say "gpu_gemv (pdl) rc=$?"
fi
if want ncu; then
    say "ncu"
    for k in linear_kernel moe_gate_up_kernel; do
        timeout 200 ncu --target-processes all --kernel-name "regex:$k" --launch-skip 3 \
            --launch-count 1 --section SpeedOfLight --section WarpStateStats \
            --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
            python3 bench/ncu_target.py "$k" > "$OUT/$tag-ncu-$k.txt" 2>&1 || say "ncu $k rc=$?"
    done
fi
say "done"
