#!/usr/bin/env bash
# Launches a Semantica training run on EVERY worker of a Cloud TPU VM pod slice.
#
# Usage:
#   launch/tpu_pod.sh CONFIG --tpu NAME --zone ZONE --workdir gs://BUCKET/DIR [--project P]
#       [--num_workers N] [--remote_dir DIR] [--run_id ID] [--dry-run] [-- MAIN_FLAGS...]
# Example:
#   launch/tpu_pod.sh experiments/semantica_base.py:size=L,fsdp --tpu my-v5e-256 \
#       --zone us-west4-a --project my-project --workdir gs://my-bucket/semantica_base_L
#
# Steps (each gcloud step targets --worker=all; the script stops at the first failure):
#   1. worker count: `gcloud compute tpus tpu-vm describe` (or --num_workers);
#   2. pack the working tree (git-tracked + untracked, not ignored files) into one tarball;
#   3. copy it to every worker and check its sha256 there, so all workers run the same code;
#   4. on every worker: python3.11 if missing, unpack, `launch/setup_env.sh tpu` (the venv with
#      the pinned requirements + jax[tpu]), then import-check jax and semantica_jax;
#   5. on every worker: stop processes still holding the TPU (an earlier run), then start
#      `python -m semantica_jax.main --config=CONFIG --workdir=WORKDIR` detached (nohup setsid),
#      SEMANTICA_DISTRIBUTED=1 when the slice has >1 worker, logging to
#      REMOTE_DIR/logs/RUN_ID/<worker hostname>.log.
# --dry-run prints every command (shell-quoted) instead of running it; it needs --num_workers,
# since it does not query the pod.
#
# The most common pod failure: the program starts on only SOME workers (ssh to one worker, a
# worker whose set-up failed, a worker whose TPU is still held by an earlier run, or an ssh drop
# that kills one worker's process). The started workers then block in TPU / jax.distributed
# initialisation until a timeout, with no error pointing at the missing worker. This script
# prevents it by running every step with --worker=all and stopping before training if any
# worker fails a step (code checksum, venv import check), by freeing the TPU on every worker
# before starting, and by detaching the training process from the ssh session.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 1 ] || usage
CONFIG="$1"; shift
case "$CONFIG" in -*) usage ;; esac
TPU="" ZONE="" PROJECT="" WORKDIR="" NUM_WORKERS="" DRY_RUN=0
REMOTE_DIR="semantica"  # relative to the worker's home directory
RUN_ID="$(date -u +%Y%m%d-%H%M%S)"
MAIN_FLAGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) TPU="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --num_workers) NUM_WORKERS="${2:?--num_workers needs a value}"; shift 2 ;;
    --remote_dir) REMOTE_DIR="${2:?--remote_dir needs a value}"; shift 2 ;;
    --run_id) RUN_ID="${2:?--run_id needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) die "unknown argument '$1' (main.py flags go after --)" ;;
  esac
done

[ -n "$TPU" ] || die "--tpu NAME is required"
[ -n "$ZONE" ] || die "--zone ZONE is required"
[ -n "$WORKDIR" ] || die "--workdir is required"
case "$WORKDIR" in
  gs://*) ;;
  *) die "--workdir=$WORKDIR must be a gs:// path: every worker writes the same checkpoints" ;;
esac
[ -f "$ROOT/${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found under $ROOT"
if [ -n "$NUM_WORKERS" ]; then
  [[ "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--num_workers=$NUM_WORKERS must be a positive integer"
elif [ "$DRY_RUN" = 1 ]; then
  die "--dry-run needs --num_workers N (it does not query the pod)"
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[ -n "$PROJECT" ] && WHERE+=(--project="$PROJECT")

# Prints a command (arguments shell-quoted; a multi-line --command=SCRIPT as a here-document),
# then runs it unless --dry-run.
run() {
  local arg body=""
  printf '+'
  for arg in "$@"; do
    if [[ "$arg" == *$'\n'* ]]; then
      printf " %s<<'REMOTE'" "${arg%%=*}="; body="${arg#*=}"
    else
      printf ' %q' "$arg"
    fi
  done
  printf '\n'
  [ -z "$body" ] || printf '%s\nREMOTE\n' "$body"
  [ "$DRY_RUN" = 1 ] || "$@"
}
q() { printf '%q' "$1"; }

# ------------------------------------------------------------------ 1. workers
if [ -z "$NUM_WORKERS" ]; then  # never in a dry run
  DESCRIBE=("${GCLOUD[@]}" describe "$TPU" "${WHERE[@]}" --format='value(networkEndpoints.len())')
  printf '+'; printf ' %q' "${DESCRIBE[@]}"; printf '\n'
  NUM_WORKERS="$("${DESCRIBE[@]}")"
  [[ "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "could not read the worker count of TPU $TPU (got '$NUM_WORKERS')"
fi
DISTRIBUTED=0
[ "$NUM_WORKERS" -gt 1 ] && DISTRIBUTED=1
echo "# TPU $TPU: $NUM_WORKERS worker(s); run $RUN_ID; SEMANTICA_DISTRIBUTED=$DISTRIBUTED"

# ------------------------------------------------------------------ 2. pack the code
TGZ="${TMPDIR:-/tmp}/semantica_code_${RUN_ID}.tgz"
REMOTE_TGZ="/tmp/semantica_code_${RUN_ID}.tgz"
printf '+ (cd %q && git ls-files -z --cached --others --exclude-standard | tar czf %q --null -T -)\n' "$ROOT" "$TGZ"
if [ "$DRY_RUN" = 1 ]; then
  SHA="SHA256_OF_TARBALL"
else
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar czf "$TGZ" --null -T -)
  SHA="$(sha256sum "$TGZ" | cut -d' ' -f1)"
fi

# ------------------------------------------------------------------ 3. ship it to every worker
run "${GCLOUD[@]}" scp "$TGZ" "$TPU:$REMOTE_TGZ" --worker=all "${WHERE[@]}"

# ------------------------------------------------------------------ 4. venv on every worker
SETUP="set -euo pipefail
echo '$SHA  $REMOTE_TGZ' | sha256sum -c --quiet -
if ! command -v python3.11 >/dev/null; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
fi
mkdir -p $(q "$REMOTE_DIR")  # replace the code (keep .venv and logs), so no stale file survives
find $(q "$REMOTE_DIR") -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +
tar xzf $(q "$REMOTE_TGZ") -C $(q "$REMOTE_DIR")
cd $(q "$REMOTE_DIR") && bash launch/setup_env.sh tpu
echo \"\$(hostname): jax \$(.venv/bin/python -c 'import jax, semantica_jax; print(jax.__version__)')\""
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command="$SETUP"

# ------------------------------------------------------------------ 5. start on every worker
MAIN=(.venv/bin/python -m semantica_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${MAIN_FLAGS[@]}")
MAIN_Q="$(printf '%q ' "${MAIN[@]}")"
LOG_DIR="logs/$RUN_ID"
START="set -euo pipefail
TPU_FILES='/dev/accel* /dev/vfio/[0-9]*'
sudo fuser -k -TERM \$TPU_FILES 2>/dev/null || true  # an earlier run: SIGTERM lets it checkpoint
for _ in \$(seq 120); do sudo fuser -s \$TPU_FILES 2>/dev/null || break; sleep 1; done
sudo fuser -k -KILL \$TPU_FILES 2>/dev/null || true
sudo rm -f /tmp/libtpu_lockfile
cd $(q "$REMOTE_DIR") && mkdir -p $(q "$LOG_DIR")
LOG=$(q "$LOG_DIR")/\$(hostname).log
SEMANTICA_DISTRIBUTED=$DISTRIBUTED nohup setsid $MAIN_Q > \"\$LOG\" 2>&1 < /dev/null &
echo \"\$(hostname): started pid \$! -> $(q "$REMOTE_DIR")/\$LOG\""
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command="$START"

echo "# Follow worker 0: $(printf '%q ' "${GCLOUD[@]}" ssh "$TPU" --worker=0 "${WHERE[@]}" \
  --command="tail -f $REMOTE_DIR/$LOG_DIR/*.log")"
