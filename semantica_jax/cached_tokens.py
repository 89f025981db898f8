"""The cached-token shard contract: what `embed_cache` adds to page records, and the checks a
reader runs before trusting them.

`semantica_jax.embed_cache` runs the frozen encoder once over page shards and writes augmented
shards: every page record gains `CACHED_TOKEN_FEATURES` (one float16 blob per image), and the
output directory gains `EMBED_CACHE_STATS`, which records `cached_tokens_identity(config.encoder)`.
`semantica_jax.similarity` adds `PAIR_SIM_FEATURE` (the page's n x n cosine similarities). The
pair pipeline, the similarity tool and the export read these names from here.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

# Features added to page records by semantica_jax.embed_cache (one value per image of the page).
CACHED_TOKEN_FEATURES: dict[str, Any] = {
    "tokens": tf.io.RaggedFeature(tf.string),  # float16 [T, D] blob per image, little-endian
    "pooled": tf.io.RaggedFeature(tf.string),  # float16 [D'] blob per image
    "token_shape": tf.io.FixedLenFeature([2], tf.int64),  # [T, D]
    "pooled_shape": tf.io.FixedLenFeature([1], tf.int64),  # [D']
}
EMBED_CACHE_STATS = "embed_cache.json"  # next to the augmented shards
# Feature added to page records by semantica_jax.similarity: the page's n x n cosine
# similarities (row-major float32).
PAIR_SIM_FEATURE = "pair_sim"

# config.encoder fields that determine the cached tokens (the cache is always computed in float32,
# so `encoder.dtype` is not among them).
CACHE_IDENTITY_FIELDS = (
    "family", "size", "width", "depth", "num_heads", "mlp_dim", "ffn", "patch_size", "image_size",
    "pretrain_image_size", "pos_interpolation", "num_registers", "layerscale_init", "ln_eps",
    "activation", "projection_dim", "mean", "std",
)


def cached_tokens_identity(encoder_config: Any) -> dict[str, Any]:
    """What identifies the tokens an encoder config produces (JSON-able; pure config, no JAX):
    the `CACHE_IDENTITY_FIELDS`, the weights (absolute path and size, or the builtin name) and,
    for a random init, its seed."""
    ident: dict[str, Any] = {}
    for key in CACHE_IDENTITY_FIELDS:
        value = encoder_config[key]
        ident[key] = [float(v) for v in value] if isinstance(value, (list, tuple)) else value
    weights = encoder_config.weights
    if weights and os.path.exists(weights):
        ident["weights"] = os.path.abspath(weights)
        ident["weights_bytes"] = os.path.getsize(weights)
    else:
        ident["weights"] = weights
        ident["weights_bytes"] = None
    ident["init_seed"] = None if weights else int(encoder_config.init_seed)
    return ident


def check_cached_token_files(files: Sequence[str]) -> tuple[list[int], list[int]]:
    """Checks the first record of every file for `CACHED_TOKEN_FEATURES`; returns the common
    ([T, D], [D']) token and pooled shapes.

    Raises:
      ValueError: naming the first file whose records lack the features (not built by
        `python -m semantica_jax.embed_cache`) or whose shapes differ from the first file's.
    """
    shapes: tuple[list[int], list[int]] | None = None
    first_file = None
    for path in files:
        for record in tf.data.TFRecordDataset(path).take(1):
            example = tf.train.Example.FromString(record.numpy())
            feats = example.features.feature
            missing = [k for k in CACHED_TOKEN_FEATURES if k not in feats]
            if missing:
                raise ValueError(
                    f"{path} has no cached encoder tokens (features {missing} missing) but "
                    "config.encoder.cached_tokens=True: build them with `python -m "
                    "semantica_jax.embed_cache --config=... --src=... --out_dir=...` and point "
                    "config.data.*_files at the output"
                )
            found = (list(feats["token_shape"].int64_list.value),
                     list(feats["pooled_shape"].int64_list.value))
            if shapes is None:
                shapes, first_file = found, path
            elif found != shapes:
                raise ValueError(
                    f"{path}: cached token shapes {found} differ from {shapes} in {first_file}"
                )
    if shapes is None:
        raise ValueError(f"no records in any of {len(files)} cached-token files ({files[:3]})")
    return shapes


def check_pair_sim_files(files: Sequence[str]) -> None:
    """Checks that every file's first record has `PAIR_SIM_FEATURE` (pair_filter='similarity').

    Raises:
      ValueError: naming the first file without it (not written by semantica_jax.similarity).
    """
    for path in files:
        for record in tf.data.TFRecordDataset(path).take(1):
            feats = tf.train.Example.FromString(record.numpy()).features.feature
            if PAIR_SIM_FEATURE not in feats:
                raise ValueError(
                    f"{path} has no '{PAIR_SIM_FEATURE}' feature but config.data.pair_filter="
                    "'similarity': compute it with `python -m semantica_jax.similarity "
                    "--shards=... --out_dir=...` and point config.data.*_files at the output"
                )


def check_cache_identity(files: Sequence[str], encoder_config: Any) -> None:
    """Checks the `embed_cache.json` next to each file against `config.encoder`.

    Raises:
      ValueError: naming the directory when it has no `embed_cache.json`, or the fields whose
        recorded value differs from `config.encoder` (tokens from another encoder).
    """
    want = cached_tokens_identity(encoder_config)
    for directory in sorted({os.path.dirname(os.path.abspath(f)) for f in files}):
        path = os.path.join(directory, EMBED_CACHE_STATS)
        if not tf.io.gfile.exists(path):
            raise ValueError(
                f"{directory} has no {EMBED_CACHE_STATS}: these shards were not built by "
                "semantica_jax.embed_cache, so their tokens cannot be checked against "
                "config.encoder"
            )
        with tf.io.gfile.GFile(path) as f:
            recorded = json.load(f)["encoder"]
        diff = [k for k in sorted(set(want) | set(recorded)) if want.get(k) != recorded.get(k)]
        if diff:
            details = ", ".join(
                f"{k}: cache {recorded.get(k)!r} vs config {want.get(k)!r}" for k in diff
            )
            raise ValueError(
                f"cached tokens in {directory} were computed with another encoder than "
                f"config.encoder ({details}); rebuild them with semantica_jax.embed_cache"
            )


def decode_blob(blob: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """A little-endian float16 blob -> float32 tensor of static `shape`."""
    values = tf.io.decode_raw(blob, tf.float16, little_endian=True)
    return tf.cast(tf.reshape(values, shape), tf.float32)
