#!/usr/bin/env bash
# Quick start (b): set up, then run the whole test suite. Fails when any test fails, and also
# when no test ran at all (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
"${CCL_VENV:-.venv}/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
