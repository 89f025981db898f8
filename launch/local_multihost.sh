#!/usr/bin/env bash
# The pod code path on one machine: N JAX processes x M fake CPU devices each, wired the way a
# multi-host job is (JAX_COORDINATOR_ADDRESS on the loopback, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
# CPU collectives over gloo), running one experiment. Every process reads its own share of the
# shard files, and they checkpoint, preempt and resume together. Logs: WORKDIR/logs/process_<i>.log
# (appended to by every launch, each after a header line).
# Usage: NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 bash launch/local_multihost.sh [CONFIG] [main.py flags...]
#   CONFIG defaults to experiments/semantica_tiny.py:eval_shards=2 (the tiny experiment with an
#   eval split of 2 files, one per process: every process needs its own train and eval files);
#   WORKDIR (default workdirs/<config>_multihost) and PORT (default 12355) are environment
#   variables. First: launch/setup_env.sh (the venv) and `bash launch/prepare_data.sh CONFIG` (the
#   data and token cache CONFIG reads). SIGTERM/SIGINT is forwarded to every process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYBIN="${SEMANTICA_VENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"
CONFIG="${1:-experiments/semantica_tiny.py:eval_shards=2}"
[ $# -gt 0 ] && shift
N="${NUM_PROCESSES:-2}"
M="${DEVICES_PER_PROCESS:-2}"
NAME="$(basename "${CONFIG%%:*}" .py)"
WORKDIR="${WORKDIR:-$ROOT/workdirs/${NAME}_multihost}"
mkdir -p "$WORKDIR/logs"
export JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT:-12355}" JAX_NUM_PROCESSES="$N"
export XLA_FLAGS="--xla_force_host_platform_device_count=$M"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
pids=()
for ((i = 0; i < N; i++)); do
  # Appended, after a header: a later export or eval launch keeps the training run's log.
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') local_multihost: process $i of $N: $CONFIG $*" \
      >>"$WORKDIR/logs/process_$i.log"
  JAX_PROCESS_ID="$i" "$PYBIN" -m semantica_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" \
      >>"$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
rc=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "local_multihost: process $i failed; see $WORKDIR/logs/process_$i.log" >&2
    rc=1
  fi
done
[ "$rc" -eq 0 ] && echo "local_multihost: $N processes x $M devices done; logs in $WORKDIR/logs" && tail -n 1 "$WORKDIR/logs/process_0.log"
exit "$rc"
