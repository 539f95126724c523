#!/usr/bin/env bash
# Builds .venv-sglang: SGLang 0.5.23's Python modules on torch 2.13.0 CPU, enough to import
# the modules ccl_sglang patches and run integrations/sglang/check_real_sglang.py. It does NOT
# make a working SGLang server: SGLang 0.5.23 pins torch==2.14.1 and CUDA packages
# (flashinfer, sglang-kernel, ...), and its CPU path needs the sgl-kernel CPU build, which is
# not on PyPI. Idempotent; then:
#     .venv-sglang/bin/python integrations/sglang/check_real_sglang.py
#
# What it installs, and why each deviation from `pip install sglang==0.5.23`:
#   torch==2.13.0 (the local CPU wheel)  instead of torch==2.14.1 (CUDA build on PyPI)
#   sglang==0.5.23 --no-deps             its declared deps pull CUDA torch, flashinfer, ...
#   the packages the imported modules need (list below, pinned where SGLang pins them)
#   torchvision 0.28.0 --no-deps         PyPI's build links libtorch_cuda: its C ops cannot load
#                                        on CPU torch, and two unguarded fake registrations in
#                                        torchvision/_meta_registrations.py (nms, qnms) then fail
#                                        the import; they are rewritten to the file's own guarded
#                                        form (@register_meta). SGLang imports torchvision only
#                                        for image transforms (multimodal), never on our path.
#   mailbox-ccl (editable, build dir build/sglang-*)
# Env: CCL_SGLANG_VENV (default .venv-sglang), PYTHON (interpreter for a new venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${CCL_SGLANG_VENV:-.venv-sglang}"
PY="${PYTHON:-python3}"
say() { echo "# sglang-venv: $*" >&2; }

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
CONSTRAINT=$(mktemp); trap 'rm -f "$CONSTRAINT"' EXIT
echo "torch==2.13.0" > "$CONSTRAINT"

if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('sglang') == '0.5.23'; assert m.version('torch').startswith('2.13.0')" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU) + sglang 0.5.23 (--no-deps) (minutes; ~2.5 GB)"
  "${PIP[@]}" torch==2.13.0 numpy
  "${PIP[@]}" --no-deps sglang==0.5.23
fi
# Imports of parallel_state, communication_op, layernorm and layer_boundary.fusions.allreduce
# on CPU need exactly these (found by importing until nothing was missing).
"${PIP[@]}" -c "$CONSTRAINT" orjson psutil pybase64 requests triton packaging pillow starlette \
  msgspec pydantic pyzmq tqdm IPython aiohttp transformers==5.19.0 dill sentencepiece \
  apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 gguf
"${PIP[@]}" --no-deps -c "$CONSTRAINT" torchvision==0.28.0
META=$("$VENV/bin/python" -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('torchvision').origin), '_meta_registrations.py'))")
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@register_meta("\1")  # ccl venv: guarded like the others (no torchvision C ops on CPU torch)/' "$META"

if ! "$VENV/bin/python" -c "import scikit_build_core, pybind11, ninja" >/dev/null 2>&1; then
  "${PIP[@]}" "scikit-build-core>=0.10" "pybind11>=2.12" ninja
fi
say "installing mailbox-ccl (editable, build/sglang-*) into $VENV"
flock /tmp/ccl-build.lock "${PIP[@]}" --no-build-isolation --no-deps -C "build-dir=build/sglang-{wheel_tag}" -e .
"$VENV/bin/python" -W ignore -c "
import ccl._C, ccl_sglang
import sglang.srt.distributed.parallel_state, sglang.srt.layers.layernorm
import sglang.srt.layers.layer_boundary.fusions.allreduce
import importlib.metadata as m
print('# sglang-venv: ok: sglang', m.version('sglang'), 'torch', m.version('torch'))
"
