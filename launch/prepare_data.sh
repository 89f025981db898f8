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
# The token cache runs on the CPU unless JAX_PLATFORMS says otherwise (JAX_PLATFORMS= : any
# accelerator JAX finds); without it, the libtpu of the [test] extra probes for a TPU and logs why not.
export JAX_PLATFORMS="${JAX_PLATFORMS-cpu}"
CONFIG="${1:-experiments/semantica_tiny.py}"
DATA_DIR="$ROOT/data/fashion_mnist_pages"

# 1. Fashion-MNIST as label-grouped pages of 5 same-class images.
"$PYBIN" -m data_pipeline.fashion_mnist --out_dir "$DATA_DIR"
# 2. Where the config reads cached tokens from, and which shards (nothing to cache for an
#    in-graph encoder).
SPEC="$("$PYBIN" - "$CONFIG" <<'PY'
import os, sys
from semantica_jax.config_lib import load_config_file
c = load_config_file(sys.argv[1])
if c.encoder.cached_tokens:
    names = [os.path.basename(f) for f in (c.data.train_files, c.data.eval_files) if f]
    print(os.path.dirname(c.data.train_files), ",".join(names))
PY
)"
read -r CACHE_DIR NAMES <<<"$SPEC" || true
[ -n "${CACHE_DIR:-}" ] || exit 0
CACHE_DIR="${CACHE_DIR%_sim}"
SRC="" CACHED=""
for name in ${NAMES//,/ }; do SRC+="$DATA_DIR/$name," CACHED+="$CACHE_DIR/$name,"; done
# 3. The frozen encoder's tokens for the shards the config trains and evaluates on.
"$PYBIN" -m semantica_jax.embed_cache --config="$CONFIG" --src="${SRC%,}" --out_dir="$CACHE_DIR"
# 4. Within-page similarities of those pages: the mirror `filter=similarity` trains on.
"$PYBIN" -m semantica_jax.similarity --sweep --shards="${CACHED%,}" --out_dir="${CACHE_DIR}_sim" >/dev/null
