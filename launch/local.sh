#!/usr/bin/env bash
# The README's main job: set-up (venv + Debian data package), the embedded Fashion-MNIST page
# shards, the frozen encoder's token cache, then the tiny experiment end to end on this
# machine's CPU (2 fake devices, data-parallel). Leaves TensorBoard events, sample grids (PNG), an Orbax checkpoint and
# metrics.json in the workdir.
# Then exports the final checkpoint, evaluates it (few-shot metrics, eval/*.json + grids) and
# writes a semantica-vary grid of two held-out images.
# Usage: bash launch/local.sh [CONFIG] [extra main.py flags...]
#   CONFIG defaults to experiments/semantica_tiny.py; WORKDIR env var overrides the workdir.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" --apt test,data,demo
PYBIN="${SEMANTICA_VENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"

CONFIG="${1:-experiments/semantica_tiny.py}"
[ $# -gt 0 ] && shift
NAME="$(basename "${CONFIG%%:*}" .py)"
WORKDIR="${WORKDIR:-$ROOT/workdirs/$NAME}"
DATA_DIR="$ROOT/data/fashion_mnist_pages"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Two fake CPU devices: data parallelism is 1.8-3x faster than one device on a 2-core CPU.
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=2}"

# 1. The embedded data, the encoder's token cache and the similarity mirror (idempotent).
bash "$ROOT/launch/prepare_data.sh" "$CONFIG"

# 2. Train.
"$PYBIN" -m semantica_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"

# 3. Export the final checkpoint (EMA params + config), evaluate the export with the few-shot
#    protocol (the config's `eval` section), and vary two held-out images with semantica-vary.
"$PYBIN" -m semantica_jax.main --mode=export --workdir="$WORKDIR" --export_dir="$WORKDIR/export"
"$PYBIN" -m semantica_jax.main --mode=eval --config="$CONFIG" --workdir="$WORKDIR" \
    --eval_export="$WORKDIR/export" "$@"
mkdir -p "$WORKDIR/vary"
"$PYBIN" - "$DATA_DIR/eval-00001-of-00002.tfrecord" "$WORKDIR/vary" <<'PY'
import sys
from data_pipeline import shards
src, out = sys.argv[1], sys.argv[2]
for i, page in zip(range(2), shards.read_pages(src)):
    open(f"{out}/input_{i}.png", "wb").write(page["images"][0])
PY
"$PYBIN" -m semantica_jax.vary --export="$WORKDIR/export" --image "$WORKDIR"/vary/input_0.png \
    "$WORKDIR"/vary/input_1.png --num=8 --sampler=ddim --steps=50 --seed=0 --out="$WORKDIR/vary/grid.png" >/dev/null

echo
echo "Results in $WORKDIR:"
echo "  train metrics:  $WORKDIR/metrics.json"
echo "  sample grids:   $(ls "$WORKDIR"/samples/*.png 2>/dev/null | tail -n 1)"
echo "  checkpoints:    $WORKDIR/checkpoints/$(ls "$WORKDIR/checkpoints" | sort -n | tail -n 1)"
echo "  export:         $WORKDIR/export"
echo "  few-shot eval:  $(ls "$WORKDIR"/eval/export_step_*.json | tail -n 1) (+ eval/grids/*.png)"
echo "  vary:           $WORKDIR/vary/grid.png (semantica-vary on two held-out images)"
echo "  TensorBoard:    $PYBIN -m tensorboard.main --logdir $WORKDIR"
cat "$WORKDIR/metrics.json"
echo
"$PYBIN" - "$(ls "$WORKDIR"/eval/export_step_*.json | tail -n 1)" "$CONFIG" <<'PY'
import json, sys
from semantica_jax import config_lib
from semantica_jax.evaluation import job
result = json.load(open(sys.argv[1]))
names = config_lib.load_config_file(sys.argv[2]).data.class_names
print(f"Few-shot eval of the export (step {result['step']}, {result['groups']} classes x {result['shots']} "
      f"held-out conditions x {result['samples_per_condition']} variations):")
print(job.headline(result, names))
PY
echo "Main job took $((SECONDS / 60)) min $((SECONDS % 60)) s."
