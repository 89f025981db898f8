#!/usr/bin/env bash
# The README's test command: set up the venv (idempotent), then run the test suite.
# Extra arguments replace the default target, e.g. `bash launch/test.sh tests/test_train.py -x`.
# Test files run on SEMANTICA_TEST_WORKERS pytest-xdist workers (default 2; 0 runs in this process);
# each file stays on one worker, so module fixtures (trained models, compiled programs) are shared;
# tests/conftest.py puts the slowest files first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" --apt=browser test,data,demo
cd "$ROOT"
if [ $# -eq 0 ]; then set -- tests; fi
exec "${SEMANTICA_VENV:-$ROOT/.venv}/bin/python" -m pytest -q --durations=25 \
    -n "${SEMANTICA_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
