#!/usr/bin/env bash
# The GPU runs behind bench/results/h200x2*.json, as one device-tool call on a lent 2x H200
# machine (torch + Triton from its image; our package installed editable, without deps):
#
#   bash bench/h200x2_run.sh                 # validate fused decode bench
#   bash bench/h200x2_run.sh fused decode    # only these steps
#
# Steps:
#   validate     gpu_validate: eager + 100k graph-replayed one- and two-shot ops, mismatch,
#                timeout path, timing vs NCCL / SymmetricMemory
#   fused        gpu_fused_linear (every case and tile variant)
#   fused_ab     gpu_fused_linear with CCL_INT4_SCALE_ONCE=0 (the older INT4 dequantisation)
#   decode       decode_step --full
#   decode_tiles decode_step --full with CCL_GEMV_TILES=$DECODE_TILES (row_int4=16x512x4)
#   moe          gpu_moe: the MoE stand-in's gate/up and down kernels per tile variant
#                (MOE_UP / MOE_DOWN: comma lists of BNxBKxWARPS), one GPU
#   bench        ccl-bench --device cuda
#   stall        stall_probe: the configurations that stalled before session 4's fix
#   rank_limits  stall_probe with rank 1 waiting 3x longer than rank 0 (whose bound ends a stall)
#   blocks       gpu_validate with 256- and 1024-word all-reduce programs
#   sweep        gpu_validate's sweep of all-reduce program shapes and poll variants (and of
#                the fused norm's chunks), vs NCCL
#   s7           the session-7 opt-ins against the defaults, each validated then timed:
#                gpu_validate with CCL_DEVICE_NORM_ROWWIDE=1 and with CCL_PDL=1 (own folders),
#                gpu_fused_linear with the handoff variants default,direct,direct_split2,
#                direct_split8, and decode_step with CCL_PDL=1
# DECODE_ARGS adds decode_step options (e.g. --profile).
# FUSED_VARIANTS overrides the fused step's variants (e.g. default,split1,split2,split4, or
# counter,direct,direct_split2 for the handoff A/B).
# CCL_PDL=1 in the environment turns programmatic dependent launch on for every step.
# Results go to $OUT (the device tool brings back at most 8 files: choose steps accordingly).
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

# Wait bound 30 s for the validation (a generous bound: a stall would show as a timeout).
if want validate; then
    say "gpu_validate"
    timeout 200 python3 bench/gpu_validate.py --out "$OUT" --quick --algos one_shot,two_shot \
        --timeout 30 --checked-replays 1000000 >>"$log" 2>&1 || say "gpu_validate rc=$?"
fi
if want fused; then
    say "fused linear"
    timeout 200 python3 bench/gpu_fused_linear.py --out "$OUT" --timeout 190 \
        --variants "${FUSED_VARIANTS:-default,warps8,bn_half}" >>"$log" 2>&1 \
        || say "gpu_fused_linear rc=$?"
fi
if want fused_ab; then
    say "fused linear, CCL_INT4_SCALE_ONCE=0 (A/B of the INT4 dequantisation)"
    CCL_INT4_SCALE_ONCE=0 timeout 200 python3 bench/gpu_fused_linear.py --out "$OUT" \
        --timeout 190 --variants default --tag scale-per-nibble >>"$log" 2>&1 \
        || say "gpu_fused_linear rc=$?"
fi
if want decode; then
    say "decode step"
    timeout 200 python3 bench/decode_step.py --device cuda --full --timeout 190 ${DECODE_ARGS:-} \
        --json "$OUT/h200x2-decode-step.json" >>"$log" 2>&1 || say "decode_step rc=$?"
fi
if want decode_tiles; then
    say "decode step, CCL_GEMV_TILES=${DECODE_TILES:-row_int4=16x512x4}"
    CCL_GEMV_TILES=${DECODE_TILES:-row_int4=16x512x4} timeout 200 python3 bench/decode_step.py \
        --device cuda --full --timeout 190 ${DECODE_ARGS:-} \
        --json "$OUT/h200x2-decode-step-tiles.json" >>"$log" 2>&1 || say "decode_step rc=$?"
fi
if want moe; then
    say "moe kernels"
    timeout 200 python3 bench/gpu_moe.py --up "${MOE_UP:-default}" --down "${MOE_DOWN:-default}" \
        --json "$OUT/h200-moe.json" >>"$log" 2>&1 || say "gpu_moe rc=$?"
fi
if want bench; then
    say "ccl-bench"
    timeout 60 python3 -m ccl.bench --device cuda --dtype bfloat16 --max-bytes 64K -v \
        --coll-timeout 30 --no-plot --out "$OUT/h200x2-ccl-bench-bf16" >>"$log" 2>&1 \
        || say "ccl-bench rc=$?"
fi
probe_configs="^ar 1KB$|^ar 16KB$|^ar 64KB 16 progs$|^ar 128KB 128 progs$|^ar fp32 96KB 24 progs$|norm"
if want stall; then
    say "stall probe"
    timeout 120 python3 bench/stall_probe.py --configs "$probe_configs" --repeat 3 --replays 200 \
        --timeout 1 --deadline 110 --json "$OUT/stall.json" >>"$log" 2>&1 || say "stall_probe rc=$?"
fi
if want rank_limits; then
    say "stall probe, per-rank bounds"
    timeout 150 python3 bench/stall_probe.py \
        --configs "^ar 64KB 16 progs$|^ar 128KB 128 progs$|^ar fp32 96KB 24 progs$" --repeat 3 \
        --replays 200 --timeout 0.1 --rank-limit-scale 2 --deadline 140 \
        --json "$OUT/stall-rank-limits.json" >>"$log" 2>&1 || say "stall_probe rc=$?"
fi
if want blocks; then
    for b in 256 1024; do
        say "gpu_validate, $b-word programs"
        mkdir -p "$OUT/b$b"
        CCL_DEVICE_MAX_BLOCK=$b timeout 150 python3 bench/gpu_validate.py --out "$OUT/b$b" \
            --quick --algos one_shot --timeout 30 --skip timeout,mismatch \
            --checked-replays 1000000 >>"$log" 2>&1 || say "gpu_validate rc=$?"
    done
fi
if want sweep; then
    say "poll sweep"
    mkdir -p "$OUT/sweep"
    timeout 300 python3 bench/gpu_validate.py --out "$OUT/sweep" --quick --sweep \
        --skip eager,graph,mismatch,timing,timeout --timeout 30 >>"$log" 2>&1 \
        || say "gpu_validate sweep rc=$?"
fi
if want s7; then
    for knob in CCL_DEVICE_NORM_ROWWIDE CCL_PDL; do
        say "s7: gpu_validate, $knob=1"
        mkdir -p "$OUT/$knob"
        env "$knob=1" timeout 200 python3 bench/gpu_validate.py --out "$OUT/$knob" --quick \
            --algos one_shot --timeout 30 --checked-replays 200000 --skip mismatch \
            >>"$log" 2>&1 || say "gpu_validate ($knob) rc=$?"
    done
    say "s7: fused linear handoff A/B"
    timeout 200 python3 bench/gpu_fused_linear.py --out "$OUT" --timeout 190 \
        --variants default,direct,direct_split2,direct_split8 --tag handoff >>"$log" 2>&1 \
        || say "gpu_fused_linear rc=$?"
    say "s7: decode step, CCL_PDL=1"
    CCL_PDL=1 timeout 200 python3 bench/decode_step.py --device cuda --full --timeout 190 \
        --json "$OUT/h200x2-decode-step-pdl.json" >>"$log" 2>&1 || say "decode_step rc=$?"
fi
say "done"
