"""Shard file names, shared by every writer and reader of page shards (TensorFlow-free, so the
Beam workers of `data_pipeline.build_pages` can import it; the record format itself is in
`data_pipeline.shards`)."""
from __future__ import annotations

import os

SHARD_SUFFIX = ".tfrecord"


def shard_filename(prefix: str, index: int, num_shards: int) -> str:
    """``{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord``."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def shard_pattern(directory: str, prefix: str, num_shards: int | None = None) -> str:
    """The glob of a prefix's shards in `directory` (of any shard count unless `num_shards`)."""
    count = "*" if num_shards is None else f"{num_shards:05d}"
    return os.path.join(directory, f"{prefix}-*-of-{count}{SHARD_SUFFIX}")


def stats_filename(prefix: str) -> str:
    """The page builder's per-prefix statistics file, ``{prefix}-stats.json``."""
    return f"{prefix}-stats.json"
