#!/usr/bin/env bash
# The paper-claims study in one command: set-up (venv + Debian data package), the
# embedded Fashion-MNIST page shards, the encoder token cache and the similarity mirror (the same
# idempotent steps as launch/local.sh), then every arm of the study file: train, export, few-shot
# eval, and studies/<name>/REPORT.md (+ report.json, grids/). Rerun to resume: finished arms are
# skipped. Budget and arms: docs/STUDY.md.
# Usage: bash launch/study.sh [semantica_study flags...]
#   e.g. bash launch/study.sh                          # experiments/study_tiny.py -> studies/tiny
#        bash launch/study.sh --smoke                  # 6 steps per arm -> studies/tiny_smoke (wiring only)
#        bash launch/study.sh --only=pairs,reconstruction --seeds=0
#        bash launch/study.sh --report_only
#   STUDY=path.py[:arg] picks another study file (default experiments/study_tiny.py); its arms
#   bring their own data, so the data steps below only serve the tiny study (skip: PREPARE_DATA=0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" --apt test,data,demo
PYBIN="${SEMANTICA_VENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"

STUDY="${STUDY:-experiments/study_tiny.py}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Two fake CPU devices: data parallelism is 1.8-3x faster than one device on a 2-core CPU.
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=2}"

if [ "${PREPARE_DATA:-1}" = 1 ]; then
  # The embedded data, the token cache and the similarity mirror of the tiny config (idempotent).
  bash "$ROOT/launch/prepare_data.sh" experiments/semantica_tiny.py
fi

# 4. Every arm (sequentially; logs in studies/<name>/<arm>/seed<k>/{train,eval}.log), then the report.
exec "$PYBIN" -m semantica_study --study="$STUDY" "$@"
