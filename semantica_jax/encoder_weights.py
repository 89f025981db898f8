"""The converted encoder-weights file format: `X.npz` + its JSON sidecar `X.json`.

  X.npz   the ViT's param tree, one array per leaf, keys joined by '/'
          (e.g. `block_0/attn/query/kernel`), float32.
  X.json  the sidecar: `format` (`SIDECAR_FORMAT`), `description`, `source`, `layout`,
          `implementation`, `num_tensors`, `num_params`, `ignored_source_keys`, `encoder` (the
          `config.encoder` fields the weights need, tuples as lists) and `flags` (the same fields
          as `--config.encoder.KEY=VALUE`, `override_flags`).

The converters (`semantica_jax.converters`) write both files with `save`; `semantica_jax.encoder`
reads them (`read_npz`, `read_sidecar`) and checks the config against the sidecar. Nothing of the
project is imported here.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SIDECAR_FORMAT = "semantica_jax.encoder_weights/1"


def sidecar_path(weights_path: str) -> str:
    """The JSON written next to converted weights: `X.npz` -> `X.json`."""
    return os.path.splitext(weights_path)[0] + ".json"


def override_flags(overrides: dict[str, Any]) -> list[str]:
    """`--config.encoder.KEY=VALUE` flags for `overrides` (tuples as `(a, b, c)`)."""
    def fmt(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return "(" + ",".join(repr(float(v)) for v in value) + ")"
        return str(value)

    return [f"--config.encoder.{k}={fmt(v)}" for k, v in overrides.items()]


def read_sidecar(path: str) -> Any:
    """The parsed JSON of a sidecar file (errors of `open` / `json.load` propagate)."""
    with open(path) as f:
        return json.load(f)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of a weights npz, by its '/'-joined key."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def save(dst: str, flat: Mapping[str, np.ndarray], record: dict[str, Any]) -> tuple[str, str]:
    """Writes `dst` (.npz appended if missing) from the flat '/'-keyed arrays, then its JSON
    sidecar `record`, each atomically (temp file + rename); returns both paths."""
    npz = dst if dst.endswith(".npz") else dst + ".npz"
    json_path = sidecar_path(npz)
    os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
    _atomic_write(npz, lambda f: np.savez(f, **flat))
    text = json.dumps(record, indent=2) + "\n"
    _atomic_write(json_path, lambda f: f.write(text.encode()))
    return npz, json_path


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".incomplete")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
