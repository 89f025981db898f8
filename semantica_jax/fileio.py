"""Atomic JSON files, local or on any TensorFlow filesystem (gs://...).

`write_json` writes through a temporary file renamed over the target, so a reader (a resuming
run, an eval job polling a workdir, a study collecting results) sees the old file or the new
one, never a partial one. Local paths use `os` only; paths with a scheme go through
`tf.io.gfile` (on GCS the rename is a copy + delete: the target is still never partial).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def write_json(path: str, obj: Any, *, default: Callable[[Any], Any] | None = None,
               sort_keys: bool = False) -> None:
    """Writes `obj` as indented JSON (NaN allowed) to `path`, creating its directory."""
    text = json.dumps(obj, indent=2, default=default, sort_keys=sort_keys) + "\n"
    tmp = f"{path}.tmp{os.getpid()}"
    if "://" in path:
        import tensorflow as tf  # remote filesystems only: local writes never load TensorFlow

        tf.io.gfile.makedirs(os.path.dirname(path))
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
