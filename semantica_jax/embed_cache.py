r"""Embedding cache: run the frozen encoder once over page shards, write augmented shards.

The encoder is frozen, so its tokens for a given image never change: computing them once saves
the encoder forward in every training step (and lets data filtering read pooled vectors).

  python -m semantica_jax.embed_cache --config=experiments/semantica_tiny.py \
      --src='data/fashion_mnist_pages/train-*.tfrecord' --out_dir=data/fashion_mnist_tokens

Output: for every source shard a file of the SAME name in `--out_dir` holding the same records in
the same order, each extended by `cached_tokens.CACHED_TOKEN_FEATURES`: per image a float16
[T, D] `tokens` blob (CLS, registers, patches, exactly what `FrozenEncoder.encode` returns) and a
float16 [D'] `pooled` blob, plus `token_shape` / `pooled_shape`. `out_dir/embed_cache.json`
records the encoder identity (`cached_tokens.cached_tokens_identity`: architecture, resolution,
weights), the shapes and, per file, the record and image counts. Then train with
`--config.data.train_files='OUT_DIR/train-*.tfrecord' --config.encoder.cached_tokens=True`.

Images go through the pipeline's own decode and resize (`image_ops.decode`, `_resize`:
antialiased bicubic to `config.encoder.image_size`, [0, 1]), so cached tokens equal the in-graph
encoder's tokens of the pipeline's `cond` images (up to float16 rounding). The encoder runs in
float32, jitted, on fixed-size batches sharded over all local devices (the last batch of a file is
padded).

Idempotent and resumable: files already listed as complete in `embed_cache.json` (same encoder
identity, same source size) are skipped; each output file is written under a temporary name and
renamed when complete. An `out_dir` whose `embed_cache.json` records another encoder raises
(naming the differing fields) instead of mixing tokens of two encoders.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from data_pipeline import shards  # noqa: E402
from semantica_jax import cached_tokens, config_lib, fileio, image_ops, input_pipeline, sharding  # noqa: E402
from semantica_jax import encoder as encoder_lib  # noqa: E402

CACHE_FORMAT = "semantica_jax.embed_cache/1"


@dataclasses.dataclass
class _Page:
    """A page waiting for its images' tokens (written when all are filled, in input order)."""

    record: bytes
    tokens: list[np.ndarray | None]
    pooled: list[np.ndarray | None]

    @property
    def done(self) -> bool:
        return all(t is not None for t in self.tokens)


class Encoder:
    """The frozen encoder, jitted on fixed-size batches sharded over the local devices."""

    def __init__(self, encoder_config: Any, batch_size: int):
        ec = ml_collections.ConfigDict(encoder_config.to_dict())
        ec.dtype = "float32"  # computed once: full precision, stored as float16
        self.encoder = encoder_lib.FrozenEncoder.from_config(ec)
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)  # multiple of devices
        self.mesh = Mesh(np.asarray(devices).reshape(len(devices), 1, 1), sharding.MESH_AXES)
        self.rules = config_lib.DEFAULT_AXIS_RULES
        with sharding.mesh_and_rules(self.mesh, self.rules):
            self.params = self.encoder.load_params(self.mesh, self.rules)
        self.batch_sharding = NamedSharding(self.mesh, P(sharding.BATCH_AXES))
        param_sh = jax.tree.map(lambda x: x.sharding, self.params)

        def encode(params, images):
            tokens, pooled = self.encoder.encode(params, images)
            return tokens.astype(jnp.float16), pooled.astype(jnp.float16)

        self._encode = jax.jit(
            encode, in_shardings=(param_sh, self.batch_sharding),
            out_shardings=(self.batch_sharding, self.batch_sharding),
        )
        self.size = int(ec.image_size)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n <= batch_size, S, S, 3] float32 -> float16 tokens [n, T, D], pooled [n, D']."""
        n = images.shape[0]
        batch = np.zeros((self.batch_size, self.size, self.size, 3), np.float32)
        batch[:n] = images
        with sharding.mesh_and_rules(self.mesh, self.rules):
            tokens, pooled = self._encode(self.params, jax.device_put(batch, self.batch_sharding))
        return np.asarray(tokens)[:n], np.asarray(pooled)[:n]


def _pages_with_images(path: str, image_size: int) -> tf.data.Dataset:
    """(serialized record, [N, S, S, 3] float32 images) per page, in file order."""

    def decode(record):
        page = shards.parse_page(record)
        images = tf.map_fn(
            lambda b: image_ops.resize(image_ops.decode(b), image_size),
            page["images"], fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        return record, images

    return tf.data.TFRecordDataset(path).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ).prefetch(4)


def _augmented(page: _Page) -> bytes:
    example = tf.train.Example.FromString(page.record)
    feats = example.features.feature
    feats["tokens"].bytes_list.value.extend(t.astype("<f2").tobytes() for t in page.tokens)
    feats["pooled"].bytes_list.value.extend(p.astype("<f2").tobytes() for p in page.pooled)
    feats["token_shape"].int64_list.value.extend(page.tokens[0].shape)
    feats["pooled_shape"].int64_list.value.extend(page.pooled[0].shape)
    return example.SerializeToString()


def _cache_file(src: str, dst: str, encode: Encoder) -> dict[str, Any]:
    """Writes the augmented copy of shard `src` to `dst`; returns its counts."""
    pending: collections.deque[_Page] = collections.deque()
    images: list[np.ndarray] = []
    slots: list[tuple[_Page, int]] = []
    records = num_images = 0
    tmp = dst + ".incomplete"
    writer = tf.io.TFRecordWriter(tmp)

    def flush(count: int) -> None:
        nonlocal images, slots
        tokens, pooled = encode(np.stack(images[:count]))
        for (page, i), tok, pool in zip(slots[:count], tokens, pooled):
            page.tokens[i], page.pooled[i] = tok, pool
        images, slots = images[count:], slots[count:]
        while pending and pending[0].done:  # pages leave in input order
            writer.write(_augmented(pending.popleft()))

    try:
        for record, page_images in _pages_with_images(src, encode.size).as_numpy_iterator():
            n = page_images.shape[0]
            if not n:
                raise ValueError(f"{src}: record {records} is a page without images")
            page = _Page(record, [None] * n, [None] * n)
            pending.append(page)
            records += 1
            num_images += n
            for i in range(n):
                images.append(page_images[i])
                slots.append((page, i))
            while len(images) >= encode.batch_size:
                flush(encode.batch_size)
        if images:
            flush(len(images))
        writer.close()
        tf.io.gfile.rename(tmp, dst, overwrite=True)
    except BaseException:
        writer.close()
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise
    return {"records": records, "images": num_images}


def build_cache(
    encoder_config: Any, src: str, out_dir: str, *, batch_size: int = 256
) -> dict[str, Any]:
    """Writes augmented copies of the shards matching `src` into `out_dir` (see module doc).

    Args:
      encoder_config: `config.encoder` (weights, architecture, `image_size`).
      src: glob (or comma-separated globs) of page shards (`input_pipeline.list_shard_files`).
      out_dir: output directory; must not be a source directory.
      batch_size: images per encoder call (rounded up to a multiple of the local devices).

    Returns:
      The `embed_cache.json` record, plus 'written' / 'skipped' (file names of this call) and
      'seconds' / 'images_per_second' of the encoder work of this call.

    Raises:
      ValueError: `out_dir` holds a cache of another encoder (names the fields), two source files
        share a name, or `out_dir` is a source directory.
    """
    files, names, out_dir = input_pipeline.mirror_sources(src, out_dir, "--src")
    stats_path = os.path.join(out_dir, cached_tokens.EMBED_CACHE_STATS)
    identity = cached_tokens.cached_tokens_identity(encoder_config)
    stats: dict[str, Any] = {"format": CACHE_FORMAT, "encoder": identity, "files": {}}
    if tf.io.gfile.exists(stats_path):
        with tf.io.gfile.GFile(stats_path) as f:
            old = json.load(f)
        diff = [k for k in sorted(set(identity) | set(old["encoder"]))
                if identity.get(k) != old["encoder"].get(k)]
        if diff:
            raise ValueError(
                f"{stats_path} records another encoder (fields {diff}: "
                f"{ {k: old['encoder'].get(k) for k in diff} } vs config "
                f"{ {k: identity.get(k) for k in diff} }); use another --out_dir or delete it"
            )
        stats = old

    encode: Encoder | None = None
    written, skipped, seconds, images = [], [], 0.0, 0
    for path, name in zip(files, names):
        dst = os.path.join(out_dir, name)
        entry = stats["files"].get(name)
        src_bytes = tf.io.gfile.stat(path).length
        if entry and entry.get("src_bytes") == src_bytes and tf.io.gfile.exists(dst):
            skipped.append(name)
            continue
        if encode is None:  # build (and compile) only when there is work
            encode = Encoder(encoder_config, batch_size)
        t0 = time.perf_counter()
        counts = _cache_file(path, dst, encode)
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        images += counts["images"]
        stats["files"][name] = {**counts, "src_bytes": src_bytes, "seconds": round(elapsed, 3)}
        if counts["records"] and "token_shape" not in stats:
            stats.update(_shapes(dst))
        fileio.write_json(stats_path, stats)
        written.append(name)
        logging.info("embed_cache: %s: %d pages, %d images in %.1f s", name, counts["records"],
                     counts["images"], elapsed)
    return {**stats, "written": written, "skipped": skipped, "seconds": seconds,
            "images_per_second": images / seconds if seconds else None}


def _shapes(path: str) -> dict[str, list[int]]:
    token_shape, pooled_shape = cached_tokens.check_cached_token_files([path])
    return {"token_shape": token_shape, "pooled_shape": pooled_shape, "dtype": "float16"}


def run(argv: Sequence[str] | None = None) -> None:
    """Command line (`python -m semantica_jax.embed_cache`, see the module docstring).

    Flags are defined here, not at import, so importing this module never touches absl's flags.
    """
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Experiment config (its config.encoder is cached).", lock_config=True
    )
    src_flag = flags.DEFINE_string("src", "", "Glob of page shards; '' = config.data.train_files.")
    out_flag = flags.DEFINE_string("out_dir", None, "Where the augmented shards and stats go.")
    batch_flag = flags.DEFINE_integer("batch_size", 256, "Images per encoder call.")
    flags.mark_flags_as_required(["config", "out_dir"])

    def main(args: Sequence[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"Unexpected arguments: {args[1:]}")
        tf.config.set_visible_devices([], "GPU")  # tf.data only; JAX owns the accelerators
        config = config_flag.value
        result = build_cache(config.encoder, src_flag.value or config.data.train_files,
                             out_flag.value, batch_size=batch_flag.value)
        rate = result["images_per_second"]
        print(f"embed_cache: wrote {len(result['written'])} files, skipped "
              f"{len(result['skipped'])} (complete) in {result['seconds']:.1f} s"
              + (f" ({rate:.1f} images/s)" if rate else "")
              + f"; tokens {result.get('token_shape')}, pooled {result.get('pooled_shape')}")
        print(f"train with: --config.data.train_files='{out_flag.value}/<same names>' "
              "--config.encoder.cached_tokens=True")

    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
