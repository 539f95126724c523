#!/usr/bin/env bash
# Creates (or reuses) the project venv and installs mailbox-ccl into it. Idempotent.
#   CCL_VENV   venv path (default .venv)      PYTHON   interpreter for a new venv (python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CCL_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "# creating $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# torch: take the pinned CPU build only when no torch is present (an unpinned install would
# pull a multi-GB CUDA build); any torch in the supported range is kept as it is.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "# installing torch==2.13.0" >&2
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" "scikit-build-core>=0.10" "pybind11>=2.12" ninja
echo "# building and installing mailbox-ccl" >&2
"${PIP[@]}" --no-build-isolation -e ".[test,bench,mpi,triton]"
