#!/usr/bin/env bash
# The embedded data for a Fashion-MNIST config (idempotent; launch/local.sh and launch/study.sh
# call it): the label-grouped page shards, the frozen encoder's token cache at the config's
# encoder resolution (the directory of its data.train_files, e.g.
# data/fashion_mnist_pages_img_focus56/), and that cache's within-page similarities (the
# semantic filter's `_sim` mirror + report and sweep). Assumes the venv exists (setup_env.sh).
# Usage: bash launch/prepare_data.sh [CONFIG]      (default experiments/semantica_tiny.py)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYBIN="${SEMANTICA_VENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"
CONFIG="${1:-experiments/semantica_tiny.py}"
DATA_DIR="$ROOT/data/fashion_mnist_pages"
TRAIN="train-0000[01]-of-00008.tfrecord"
EVAL="eval-00000-of-00002.tfrecord"

# 1. Fashion-MNIST as label-grouped pages of 5 same-class images.
"$PYBIN" -m data_pipeline.fashion_mnist --out_dir "$DATA_DIR"
# 2. Where the config reads cached tokens from (nothing to cache for an in-graph encoder).
CACHE_DIR="$("$PYBIN" - "$CONFIG" <<'PY'
import os, sys
from semantica_jax.evaluation.job import load_config_file
c = load_config_file(sys.argv[1])
print(os.path.dirname(c.data.train_files) if c.encoder.cached_tokens else "")
PY
)"
[ -n "$CACHE_DIR" ] || exit 0
CACHE_DIR="${CACHE_DIR%_sim}"
# 3. The frozen encoder's tokens for the shards the tiny config trains and evaluates on.
"$PYBIN" -m semantica_jax.embed_cache --config="$CONFIG" \
    --src="$DATA_DIR/$TRAIN,$DATA_DIR/$EVAL" --out_dir="$CACHE_DIR"
# 4. Within-page similarities of those pages: the mirror `filter=similarity` trains on.
"$PYBIN" -m semantica_jax.similarity --sweep \
    --shards="$CACHE_DIR/$TRAIN,$CACHE_DIR/$EVAL" --out_dir="${CACHE_DIR}_sim" >/dev/null
