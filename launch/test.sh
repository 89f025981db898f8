#!/usr/bin/env bash
# The README's test command: set up the venv (idempotent), then run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" test
cd "$ROOT"
exec "${SEMANTICA_VENV:-$ROOT/.venv}/bin/python" -m pytest -q tests "$@"
