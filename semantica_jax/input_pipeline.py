"""tf.data pipeline of (condition, target) image pairs from page shards.

Reads the page records described in `data_pipeline.shards` (one `tf.train.Example` per page)
and yields batches of pairs of images of the *same* page:

  files (this process's share) -> [seeded file-order shuffle] -> interleaved TFRecord reads
  -> parse -> keep pages with >= min_images_per_page images -> [seeded page shuffle]
  -> [repeat] -> enumerate -> choose (cond, target) indices -> decode only those two images
  -> resize -> drop undecodable pairs -> batch -> prefetch

Pairing
  'pairs': two DISTINCT images of one page (the Semantica setting);
  'reconstruction': the same image as condition and target (the paper's baseline).
  Both arms keep the same page filter (>= `min_images_per_page`, default 2) so that they train
  on exactly the same pages; only the index choice differs. Pairs mode needs >= 2.

Determinism
  The indices are drawn with stateless randomness keyed by ``[seed, n]`` where n is the
  element's position in the (repeated, shuffled) page stream (`Dataset.enumerate` after
  `repeat`, so epochs get fresh pairs). File and page shuffles are seeded and the dataset runs
  with ``deterministic=True``, so the whole stream is a function of (files, seed, options).
  The eval dataset does not shuffle or repeat, so its pairs are identical across runs.

Images
  Decoded with ``tf.io.decode_image(channels=3, expand_animations=False)`` (grey -> RGB, first
  frame of a GIF), converted to float in [0, 1], resized to a square with
  ``tf.image.resize(method='bicubic', antialias=True)`` and clipped. Non-square images are
  resized WITHOUT cropping (aspect ratio is not kept). The condition is resized to
  `cond_image_size` (the frozen encoder's own resolution) and stays in [0, 1] (the encoder applies
  its own mean/std); the target is resized to `image_size` and mapped to [-1, 1].

Corrupt data
  A pair whose image fails to decode is dropped with a logged warning
  (`Dataset.ignore_errors(log_warning=True)` right after the decode stage) instead of killing
  training. With ``cache_decoded=True`` all images of a page are decoded before the cache and a
  page with any undecodable image is dropped whole.

Batch elements (all numeric, ready for JAX):
  target        float32 [B, image_size, image_size, 3] in [-1, 1]
  cond          float32 [B, cond_image_size, cond_image_size, 3] in [0, 1]
  label         int32 [B], -1 when the page has no label
  page_hash     int64 [B], `hash_page_id(page_id)`
  cond_index    int32 [B], target_index int32 [B]: image positions within the page
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from data_pipeline import shards

PAIRINGS = ("pairs", "reconstruction")
PAGE_HASH_BUCKETS = 2**62
_MAX_INTERLEAVE = 16  # files read concurrently


# --------------------------------------------------------------------------- files


def list_shard_files(pattern: str) -> list[str]:
    """Sorted files matching `pattern` (a glob, or several comma-separated globs).

    Uses tf.io.gfile, so gs:// and other TF filesystems work.

    Raises:
      FileNotFoundError: naming the (sub-)pattern that matches no file, or an empty pattern.
    """
    parts = [p.strip() for p in (pattern or "").split(",") if p.strip()]
    if not parts:
        raise FileNotFoundError(f"empty shard file pattern {pattern!r}")
    files: set[str] = set()
    for part in parts:
        matches = tf.io.gfile.glob(part)
        if not matches:
            where = f" (in {pattern!r})" if len(parts) > 1 else ""
            raise FileNotFoundError(f"no shard files match {part!r}{where}")
        files.update(matches)
    return sorted(files)


def files_for_process(files: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """This process's files: ``files[process_index::process_count]``.

    Every process reads a disjoint subset and together they read every file once. The file count
    must be divisible by the process count so all processes see the same amount of data.

    Raises:
      ValueError: naming the counts, when they do not divide or the index is out of range.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})"
        )
    if not files or len(files) % process_count:
        raise ValueError(
            f"{len(files)} shard files cannot be split evenly over {process_count} processes "
            f"({len(files)} % {process_count} = {len(files) % process_count if files else 0}"
            f"{', no files' if not files else ''}); write a number of shards divisible by the "
            "process count"
        )
    return list(files[process_index::process_count])


def hash_page_id(page_id: tf.Tensor | str) -> tf.Tensor:
    """int64 hash of page id(s) in [0, 2**62), the pipeline's `page_hash`."""
    return tf.strings.to_hash_bucket_fast(page_id, PAGE_HASH_BUCKETS)


# --------------------------------------------------------------------------- dataset


def make_pair_dataset(
    files: Sequence[str],
    *,
    image_size: int,
    cond_image_size: int,
    batch_size: int,
    pairing: str = "pairs",
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    shuffle_buffer: int = 10_000,
    min_images_per_page: int = 2,
    num_parallel_calls: int = -1,
    prefetch: int = 2,
    cache_decoded: bool = False,
    drop_remainder: bool = True,
    file_shuffle: bool = True,
) -> tf.data.Dataset:
    """Batches of (cond, target) pairs from page shard `files` (see module docstring).

    Args:
      files: shard paths, already this process's share (`files_for_process`).
      image_size: target side (pixels).
      cond_image_size: condition side (the encoder's input resolution).
      batch_size: per-process batch size.
      pairing: 'pairs' (two distinct images of a page) or 'reconstruction' (one image twice).
      seed: seed of the file and page shuffles and of the index choice.
      shuffle: shuffle pages (and, with `file_shuffle`, the file order each epoch).
      repeat: repeat forever.
      shuffle_buffer: page shuffle buffer size (pages, holding their encoded images).
      min_images_per_page: pages with fewer images are skipped (>= 2 for 'pairs').
      num_parallel_calls: parallelism of the map stages; -1 = tf.data.AUTOTUNE.
      prefetch: batches to prefetch; -1 = AUTOTUNE, 0 = none.
      cache_decoded: decode every image of every page once and keep the decoded pages in memory
        (for small datasets that fit, e.g. Fashion-MNIST; saves re-decoding every epoch).
      drop_remainder: drop the last partial batch (static batch shape for jit).
      file_shuffle: shuffle the file order (seeded, each epoch) when `shuffle` is set.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    for name, value in (
        ("image_size", image_size),
        ("cond_image_size", cond_image_size),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    min_required = 2 if pairing == "pairs" else 1
    if min_images_per_page < min_required:
        raise ValueError(
            f"min_images_per_page={min_images_per_page} is too small for pairing={pairing!r} "
            f"(needs >= {min_required})"
        )
    files = list(files)
    if not files:
        raise ValueError("make_pair_dataset got an empty list of files")
    parallel = tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and file_shuffle and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if len(files) > 1:
        ds = ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(files), _MAX_INTERLEAVE),
            block_length=1,
            num_parallel_calls=parallel,
            deterministic=True,
        )
    else:
        ds = ds.flat_map(tf.data.TFRecordDataset)
    ds = ds.map(_parse, num_parallel_calls=parallel, deterministic=True)
    ds = ds.filter(lambda page: page["num_images"] >= min_images_per_page)
    if cache_decoded:
        ds = ds.map(_decode_all, num_parallel_calls=parallel, deterministic=True)
        ds = ds.ignore_errors(log_warning=True)
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate()

    def make_pair(counter: tf.Tensor, page: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        cond_index, target_index = _choose_indices(seed, counter, page["num_images"], pairing)
        if cache_decoded:
            cond_img = _cached_image(page, cond_index)
            target_img = (
                cond_img if pairing == "reconstruction" else _cached_image(page, target_index)
            )
        else:
            cond_img = _decode(page["images"][cond_index])
            target_img = (
                cond_img if pairing == "reconstruction" else _decode(page["images"][target_index])
            )
        return {
            "target": _resize(target_img, image_size) * 2.0 - 1.0,
            "cond": _resize(cond_img, cond_image_size),
            "label": tf.cast(page["label"], tf.int32),
            "page_hash": page["page_hash"],
            "cond_index": cond_index,
            "target_index": target_index,
        }

    ds = ds.map(make_pair, num_parallel_calls=parallel, deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if prefetch:
        ds = ds.prefetch(tf.data.AUTOTUNE if prefetch == -1 else prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def create_train_dataset(
    config: Any,
    *,
    process_index: int,
    process_count: int,
    batch_size: int,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Endless, shuffled training pairs of this process from ``config.data.train_files``.

    `batch_size` is the per-process batch. The condition is resized to
    ``config.encoder.image_size``, the target to ``config.data.image_size``. `seed` (default
    ``config.seed``) seeds the file/page shuffles and the pair choice.
    """
    if not config.data.train_files:
        raise ValueError("config.data.train_files is empty: set it to a glob of page shards")
    files = files_for_process(
        list_shard_files(config.data.train_files), process_index, process_count
    )
    kwargs = _common_kwargs(config)
    if seed is not None:
        kwargs["seed"] = int(seed)
    return make_pair_dataset(files, batch_size=batch_size, shuffle=True, repeat=True, **kwargs)


def create_eval_dataset(
    config: Any, *, process_index: int, process_count: int, batch_size: int
) -> tf.data.Dataset:
    """One pass over this process's ``config.data.eval_files`` pairs: no shuffle, no repeat.

    The pair choice uses ``config.seed`` exactly as in training, so the eval set is identical
    across runs (and across restarts). Partial last batches are dropped (static shapes).
    """
    if not config.data.eval_files:
        raise ValueError("config.data.eval_files is empty: this config has no eval split")
    files = files_for_process(
        list_shard_files(config.data.eval_files), process_index, process_count
    )
    kwargs = _common_kwargs(config)
    kwargs["cache_decoded"] = False  # a single pass gains nothing from a cache
    return make_pair_dataset(files, batch_size=batch_size, shuffle=False, repeat=False, **kwargs)


# --------------------------------------------------------------------------- internals


def _common_kwargs(config: Any) -> dict[str, Any]:
    d = config.data
    return dict(
        image_size=int(d.image_size),
        cond_image_size=int(config.encoder.image_size),
        pairing=d.pairing,
        seed=int(config.seed),
        shuffle_buffer=int(d.shuffle_buffer),
        min_images_per_page=int(d.min_images_per_page),
        num_parallel_calls=int(d.num_parallel_calls),
        prefetch=int(d.prefetch),
        cache_decoded=bool(d.cache_decoded),
        file_shuffle=bool(d.file_shuffle),
    )


def _parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    page = shards.parse_page(serialized)
    return {
        "images": page["images"],
        "num_images": page["num_images"],
        "label": page["label"],
        "page_hash": hash_page_id(page["page_id"]),
    }


def _choose_indices(
    seed: int, counter: tf.Tensor, num_images: tf.Tensor, pairing: str
) -> tuple[tf.Tensor, tf.Tensor]:
    """(cond, target) indices in [0, num_images), distinct for 'pairs', keyed by [seed, counter]."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(counter, tf.int64)])
    draws = tf.random.stateless_uniform([2], seed=key, minval=0, maxval=2**62, dtype=tf.int64)
    n = tf.cast(num_images, tf.int64)
    cond = draws[0] % n
    if pairing == "reconstruction":
        target = cond
    else:  # uniform over the n - 1 other images
        target = (cond + 1 + draws[1] % (n - 1)) % n
    return tf.cast(cond, tf.int32), tf.cast(target, tf.int32)


def _decode(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes -> float32 [H, W, 3] in [0, 1]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.image.convert_image_dtype(image, tf.float32)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    image = tf.image.resize(image, [size, size], method="bicubic", antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [size, size, 3])


def _decode_all(page: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Decodes every image of a page into flat uint8 pixels + per-image shapes (cacheable)."""

    def decode_flat(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        dims = tf.shape(image, out_type=tf.int64)
        # Re-stacked rather than returned as is: a raw Shape output inside map_fn trips a
        # (harmless but noisy) TF type-inference warning.
        return tf.reshape(image, [-1]), tf.stack([dims[0], dims[1], dims[2]])

    pixels, shapes = tf.map_fn(
        decode_flat,
        page["images"],
        fn_output_signature=(
            tf.RaggedTensorSpec(shape=[None], dtype=tf.uint8, ragged_rank=0),
            tf.TensorSpec([3], tf.int64),
        ),
    )
    out = {k: v for k, v in page.items() if k != "images"}
    out["pixels"] = pixels.flat_values
    out["offsets"] = pixels.row_splits
    out["shapes"] = shapes
    return out


def _cached_image(page: dict[str, tf.Tensor], index: tf.Tensor) -> tf.Tensor:
    """Image `index` of a `_decode_all` page as float32 [H, W, 3] in [0, 1]."""
    start, stop = page["offsets"][index], page["offsets"][index + 1]
    image = tf.reshape(page["pixels"][start:stop], page["shapes"][index])
    return tf.image.convert_image_dtype(image, tf.float32)
