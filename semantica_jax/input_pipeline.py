"""tf.data pipeline of (condition, target) image pairs from page shards.

Reads the page records described in `data_pipeline.shards` (one `tf.train.Example` per page)
and yields batches of pairs of images of the *same* page:

  per epoch e: files (this process's share) -> [file-order shuffle, seed (seed, e)]
  -> interleaved TFRecord reads -> parse -> keep pages with >= min_images_per_page images
  -> [page shuffle, seed (seed, e)];  epochs concatenated -> enumerate -> [skip start_element]
  -> choose (cond, target) indices -> decode only those two images
  -> resize -> drop undecodable pairs -> batch -> prefetch

Pairing
  'pairs': two DISTINCT images of one page (the Semantica setting);
  'reconstruction': the same image as condition and target (the paper's baseline).
  Both arms keep the same page filter (>= `min_images_per_page`, default 2) so that they train
  on exactly the same pages; only the index choice differs. Pairs mode needs >= 2.

Similarity filtering (``pair_filter='similarity'``, the paper's semantic filter)
  Shards augmented by `semantica_jax.similarity` carry ``pair_sim``: the page's full n x n
  matrix of cosine similarities between the frozen encoder's pooled embeddings (row-major
  float32). A (cond, target) pair (i, j), i != j, is *allowed* when ``sim_low <= s_ij <=
  sim_high``; pages without an allowed pair are skipped, and pairs are drawn uniformly among the
  allowed ordered pairs. The thresholds are applied here, so the same shards serve every
  setting: with / without the filter (``pair_filter='none'`` ignores ``pair_sim``), the upper
  threshold's effect, a sweep. ``'reconstruction'`` with the filter keeps the same pages and
  uses the condition of an allowed pair as the target too (same page set in both arms).

Label filters
  ``include_labels`` / ``exclude_labels`` keep only pages whose ``label`` is / is not listed
  (e.g. train on some classes, evaluate on held-out ones, without rebuilding shards). Both
  filters run before `enumerate`, so positions (exact resume) are positions among kept pages.

Determinism
  The indices are drawn with stateless randomness keyed by ``[seed, n]`` where n is the
  element's position in the (repeated, shuffled) page stream (`Dataset.enumerate` after the
  epochs, so epochs get fresh pairs). Epoch e shuffles files and pages with seeds derived from
  (seed, e) and `reshuffle_each_iteration=False`, so the stream is a pure function of (files,
  seed, options): it does not depend on other iterators of the same dataset (TF's reshuffling
  draws from a generator shared by all of them). `start_element` skips to a position of that
  stream (exact resume). The eval dataset does not shuffle or repeat, so its pairs are
  identical across runs.

Images
  Decoded with ``tf.io.decode_image(channels=3, expand_animations=False)`` (grey -> RGB, first
  frame of a GIF), resized to a square (from the uint8 pixels: no full-size float copy),
  scaled to [0, 1] and clipped. Shrinking (both sides >= the target size) uses
  ``method='area'`` (a box-filter average: antialiased, and ~3x cheaper than antialiased
  bicubic, which cost more than the JPEG decode itself); enlarging uses
  ``method='bicubic', antialias=True``. The same `image_ops.resize` serves training, the token
  cache, the eval job and `vary`. With ``jpeg_dct_scaling`` (default) a JPEG target is decoded at the largest DCT
  scale 1/2, 1/4 or 1/8 whose shorter side is still >= ``image_size`` (libjpeg's scaled IDCT,
  a box-like prefilter) before that resize: cheaper, and the pixels differ slightly from a full
  decode (mean |diff| ~2/255 at 64 px on noisy photos); the condition is always decoded in
  full (so cached tokens match it). Non-square images are resized WITHOUT cropping (aspect
  ratio is not kept). The condition is resized to `cond_image_size` (the frozen encoder's own
  resolution) and stays in [0, 1] (the encoder applies its own mean/std); the target is resized
  to `image_size` and mapped to [-1, 1]. With ``target_fit='pad'`` a target no larger than
  `image_size` is instead centred on a black canvas, pixel for pixel (Fashion-MNIST's 28 px on
  32: no resampling, no ringing; larger targets are still resized).

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
  element_index int64 [B]: position of the pair's page in this process's page stream (the
                `enumerate` counter); the next run resumes exactly at max(element_index) + 1
                (`start_element`), so pairs dropped for corrupt images never shift the stream.
With ``config.encoder.cached_tokens=True`` (shards augmented by `semantica_jax.embed_cache`):
  cond_tokens   float32 [B, T, D]: the frozen encoder's tokens of the condition image
  cond_pooled   float32 [B, D']: its pooled vector

Cached tokens
  `semantica_jax.embed_cache` writes shards that mirror the page shards record for record and add
  `cached_tokens.CACHED_TOKEN_FEATURES` (one float16 blob per image) plus an `embed_cache.json`
  recording the encoder config that produced them (`cached_tokens` holds that contract). With `cached_tokens` the pipeline parses those features and
  emits the condition image's tokens (for 'reconstruction' the same index as the target). Every
  file's first record is checked up front (a file without the features raises naming it), and
  `create_*_dataset` check the recorded encoder against `config.encoder` (a mismatch names the
  field).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import tensorflow as tf

from data_pipeline import shards
from semantica_jax import config_lib, image_ops
from semantica_jax.cached_tokens import (
    CACHED_TOKEN_FEATURES, PAIR_SIM_FEATURE, check_cache_identity, check_cached_token_files,
    check_pair_sim_files, decode_blob,
)
from semantica_jax.image_ops import TARGET_FITS

PAIRINGS = ("pairs", "reconstruction")
PAIR_FILTERS = ("none", "similarity")
PAGE_HASH_BUCKETS = 2**62
_MAX_INTERLEAVE = 16  # files read concurrently
_MAX_EPOCHS = 2**62  # "repeat forever"


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


def mirror_sources(pattern: str, out_dir: str, flag: str) -> tuple[list[str], list[str], str]:
    """(files, base names, absolute out_dir) for tools that write mirror shards of `pattern`
    into `out_dir` under the same names (embed_cache, similarity); creates `out_dir`. Raises
    ValueError (naming `flag`) when two sources share a name or `out_dir` is a source directory."""
    files = list_shard_files(pattern)
    names = [os.path.basename(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"{flag}={pattern!r} matches files of the same name in different directories")
    out_dir = os.path.abspath(out_dir)
    if any(os.path.dirname(os.path.abspath(f)) == out_dir for f in files):
        raise ValueError(f"--out_dir={out_dir!r} is a source directory; pick another one")
    tf.io.gfile.makedirs(out_dir)
    return files, names, out_dir


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
    data: Any,
    *,
    cond_image_size: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
    start_element: int = 0,
    cached_tokens: bool = False,
    split: str = "train",
) -> tf.data.Dataset:
    """Batches of (cond, target) pairs from page shard `files` (see module docstring).

    `data` is the experiment's `config.data` section (big_vision style: the pipeline reads its
    options from the section; `data_section(**fields)` builds one from the defaults). The
    fields it reads: image_size (target side), target_fit ('resize' | 'pad', see "Images"),
    pairing ('pairs' | 'reconstruction'), min_images_per_page (pages with fewer are skipped;
    >= 2 for 'pairs'), shuffle_buffer (pages), file_shuffle (shuffle the file order, seeded,
    each epoch, when shuffling), num_parallel_calls (-1 = tf.data.AUTOTUNE: tuned with
    `autotune`, else one call per core), prefetch (batches; -1 = AUTOTUNE, 0 = none),
    cache_decoded (decode every page once and keep it in memory: small datasets such as
    Fashion-MNIST), jpeg_dct_scaling (a JPEG target decoded at the largest DCT scale 1/2, 1/4
    or 1/8 whose shorter side stays >= image_size; the condition is always fully decoded, so its
    pixels match `semantica_jax.embed_cache`'s), pair_filter ('none' | 'similarity': only pairs
    with sim_low <= s <= sim_high of the stored `pair_sim`; every file's first record is checked
    for it), include_labels / exclude_labels (eval_include_labels / eval_exclude_labels with
    split='eval'), autotune (tf.data's autotuning thread; off by default: with the pinned
    TensorFlow an iterator whose tuning thread has run a while blocks its destructor until the
    thread's tuning period, up to 60 s, ends, which every training run paid at exit).

    Args:
      files: shard paths, already this process's share (`files_for_process`).
      data: the `config.data` section (above).
      cond_image_size: condition side (the encoder's input resolution).
      batch_size: per-process batch size.
      seed: seed of the file and page shuffles and of the index choice.
      shuffle: shuffle pages (and, with `data.file_shuffle`, the file order each epoch).
      repeat: repeat forever.
      drop_remainder: drop the last partial batch (static batch shape for jit).
      start_element: skip this many elements of the page stream before pairing (exact resume:
        pass the `element_index` after the last one consumed). Skipped pages are read and parsed
        but never decoded, so skipping is cheap (no image decoding).
      cached_tokens: also emit `cond_tokens` / `cond_pooled` from embed_cache shards (every
        file's first record is checked for the features; see `check_cached_token_files`).
      split: 'train' or 'eval': which of the section's label filters apply.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    prefix = "" if split == "train" else "eval_"
    image_size, target_fit, pairing = int(data.image_size), str(data.target_fit), data.pairing
    shuffle_buffer, min_images_per_page = int(data.shuffle_buffer), int(data.min_images_per_page)
    num_parallel_calls, prefetch = int(data.num_parallel_calls), int(data.prefetch)
    cache_decoded, file_shuffle = bool(data.cache_decoded), bool(data.file_shuffle)
    pair_filter, sim_low, sim_high = data.pair_filter, float(data.sim_low), float(data.sim_high)
    jpeg_dct_scaling, autotune = bool(data.jpeg_dct_scaling), bool(data.get("autotune", False))
    include_labels, exclude_labels = data[prefix + "include_labels"], data[prefix + "exclude_labels"]
    if target_fit not in TARGET_FITS:
        raise ValueError(f"data.target_fit={target_fit!r}; expected one of {TARGET_FITS}")
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
    if pair_filter not in PAIR_FILTERS:
        raise ValueError(f"pair_filter must be one of {PAIR_FILTERS}, got {pair_filter!r}")
    if pair_filter == "similarity" and not sim_low <= sim_high:
        raise ValueError(f"sim_low={sim_low} > sim_high={sim_high}: no pair can be allowed")
    include_labels = [int(x) for x in include_labels]
    exclude_labels = [int(x) for x in exclude_labels]
    files = list(files)
    if not files:
        raise ValueError("make_pair_dataset got an empty list of files")
    if pair_filter == "similarity":
        check_pair_sim_files(files)
    token_shape, pooled_shape = check_cached_token_files(files) if cached_tokens else (None, None)
    parallel = tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls

    def read_pages(file_order: tf.data.Dataset) -> tf.data.Dataset:
        if len(files) > 1:
            ds = file_order.interleave(
                tf.data.TFRecordDataset,
                cycle_length=min(len(files), _MAX_INTERLEAVE),
                block_length=1,
                num_parallel_calls=parallel,
                deterministic=True,
            )
        else:
            ds = file_order.flat_map(tf.data.TFRecordDataset)
        ds = ds.map(functools.partial(_parse, cached_tokens=cached_tokens,
                                      pair_filter=pair_filter, sim_low=sim_low,
                                      sim_high=sim_high, pairing=pairing),
                    num_parallel_calls=parallel, deterministic=True)
        return ds.filter(functools.partial(
            _keep_page, min_images=min_images_per_page, pair_filter=pair_filter,
            include_labels=include_labels, exclude_labels=exclude_labels))

    file_names = tf.data.Dataset.from_tensor_slices(files)
    cached = None
    if cache_decoded:  # decoded once, in file order; the per-epoch shuffle below reorders pages
        cached = read_pages(file_names).map(_decode_all, num_parallel_calls=parallel, deterministic=True)
        cached = cached.ignore_errors(log_warning=True).cache()

    def epoch_pages(epoch: tf.Tensor) -> tf.data.Dataset:
        # Shuffles are seeded by (seed, epoch) and never reshuffled by the iterator, so the
        # stream does not depend on how many iterators of this dataset were made before (TF's
        # reshuffle_each_iteration draws from a generator shared by all of a dataset's iterators).
        if cached is not None:
            ds = cached
        else:
            order = file_names
            if shuffle and file_shuffle and len(files) > 1:
                order = order.shuffle(len(files), seed=_epoch_seed(seed, epoch, 0),
                                      reshuffle_each_iteration=False)
            ds = read_pages(order)
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=_epoch_seed(seed, epoch, 1),
                            reshuffle_each_iteration=False)
        return ds

    epochs = tf.data.Dataset.range(_MAX_EPOCHS if repeat else 1)
    ds = epochs.flat_map(epoch_pages)
    ds = ds.enumerate()
    if start_element:
        ds = ds.skip(int(start_element))

    def make_pair(counter: tf.Tensor, page: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        cond_index, target_index = _choose_indices(
            seed, counter, page["num_images"], pairing, page.get("allowed"))
        if cache_decoded:
            cond_img = _cached_image(page, cond_index)
            target_img = (
                cond_img if pairing == "reconstruction" else _cached_image(page, target_index)
            )
            target = image_ops.resize(target_img, image_size, target_fit)
            cond = image_ops.resize(cond_img, cond_image_size)
        else:
            cond_u8 = image_ops.decode_u8(page["images"][cond_index])
            if pairing == "reconstruction":
                target_u8 = cond_u8
            elif jpeg_dct_scaling:
                target_u8 = image_ops.decode_u8_at_least(page["images"][target_index], image_size)
            else:
                target_u8 = image_ops.decode_u8(page["images"][target_index])
            target = image_ops.resize_u8(target_u8, image_size, target_fit)
            cond = image_ops.resize_u8(cond_u8, cond_image_size)
        pair = {
            "target": target * 2.0 - 1.0,
            "cond": cond,
            "label": tf.cast(page["label"], tf.int32),
            "page_hash": page["page_hash"],
            "cond_index": cond_index,
            "target_index": target_index,
            "element_index": counter,
        }
        if cached_tokens:
            pair["cond_tokens"] = decode_blob(page["tokens"][cond_index], token_shape)
            pair["cond_pooled"] = decode_blob(page["pooled"][cond_index], pooled_shape)
        return pair

    ds = ds.map(make_pair, num_parallel_calls=parallel, deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if prefetch:
        ds = ds.prefetch(tf.data.AUTOTUNE if prefetch == -1 else prefetch)
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = bool(autotune)
    return ds.with_options(options)


def create_train_dataset(
    config: Any,
    *,
    process_index: int,
    process_count: int,
    batch_size: int,
    seed: int | None = None,
    start_element: int = 0,
) -> tf.data.Dataset:
    """Endless, shuffled training pairs of this process from ``config.data.train_files``.

    `batch_size` is the per-process batch. The condition is resized to
    ``config.encoder.image_size``, the target to ``config.data.image_size``. `seed` (default
    ``config.seed``) seeds the file/page shuffles and the pair choice.
    """
    files = _process_files(config, "train_files", process_index, process_count)
    return make_pair_dataset(files, config.data, cond_image_size=int(config.encoder.image_size),
                             batch_size=batch_size, seed=int(config.seed if seed is None else seed),
                             start_element=start_element, cached_tokens=bool(config.encoder.cached_tokens))


def create_eval_dataset(
    config: Any, *, process_index: int, process_count: int, batch_size: int
) -> tf.data.Dataset:
    """One pass over this process's ``config.data.eval_files`` pairs: no shuffle, no repeat.

    The pair choice uses ``config.seed`` exactly as in training, so the eval set is identical
    across runs (and across restarts). Partial last batches are dropped (static shapes).
    """
    files = _process_files(config, "eval_files", process_index, process_count)
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.cache_decoded = False  # a single pass gains nothing from a cache
    return make_pair_dataset(files, data, cond_image_size=int(config.encoder.image_size),
                             batch_size=batch_size, seed=int(config.seed), shuffle=False, repeat=False,
                             cached_tokens=bool(config.encoder.cached_tokens), split="eval")


def data_section(**fields: Any) -> ml_collections.ConfigDict:
    """A `config.data` section: the defaults (`config_lib.default_config().data`) with `fields`
    set (an unknown field raises naming it), for callers without an experiment config."""
    data = config_lib.default_config().data
    config_lib.apply_overrides(data, fields)
    return data


# --------------------------------------------------------------------------- internals


def _process_files(config: Any, field: str, process_index: int, process_count: int) -> list[str]:
    """This process's share of the shards of `config.data.<field>`, checked against the token
    cache's encoder when `config.encoder.cached_tokens`."""
    pattern = config.data[field]
    if not pattern:
        raise ValueError(f"config.data.{field} is empty: set it to a glob of page shards")
    files = files_for_process(list_shard_files(pattern), process_index, process_count)
    if config.encoder.cached_tokens:
        check_cache_identity(files, config.encoder)
    return files


def _parse(
    serialized: tf.Tensor,
    cached_tokens: bool = False,
    pair_filter: str = "none",
    sim_low: float = -1.0,
    sim_high: float = 1.0,
    pairing: str = "pairs",
) -> dict[str, tf.Tensor]:
    page = shards.parse_page(serialized)
    out = {
        "images": page["images"],
        "num_images": page["num_images"],
        "label": page["label"],
        "page_hash": hash_page_id(page["page_id"]),
    }
    if cached_tokens:
        cached = tf.io.parse_single_example(
            serialized, {k: CACHED_TOKEN_FEATURES[k] for k in ("tokens", "pooled")}
        )
        out.update(tokens=cached["tokens"], pooled=cached["pooled"])
    if pair_filter == "similarity":
        sim = tf.io.parse_single_example(
            serialized, {PAIR_SIM_FEATURE: tf.io.RaggedFeature(tf.float32)})[PAIR_SIM_FEATURE]
        n = page["num_images"]
        # A matrix of the wrong size (a page changed after the similarities were computed)
        # allows nothing, so the page is skipped rather than mis-indexed.
        ok = tf.equal(tf.size(sim), n * n)
        sim = tf.cond(ok, lambda: sim, lambda: tf.fill([n * n], float("nan")))
        allowed = tf.logical_and(sim >= sim_low, sim <= sim_high)
        off_diagonal = tf.reshape(tf.logical_not(tf.eye(n, dtype=tf.bool)), [-1])
        out["allowed"] = tf.logical_and(allowed, off_diagonal)
    return out


def _keep_page(
    page: dict[str, tf.Tensor],
    min_images: int,
    pair_filter: str,
    include_labels: Sequence[int],
    exclude_labels: Sequence[int],
) -> tf.Tensor:
    keep = page["num_images"] >= min_images
    if pair_filter == "similarity":
        keep = tf.logical_and(keep, tf.reduce_any(page["allowed"]))
    label = page["label"]
    if include_labels:
        keep = tf.logical_and(keep, tf.reduce_any(tf.equal(label, tf.constant(include_labels, tf.int64))))
    if exclude_labels:
        keep = tf.logical_and(
            keep, tf.logical_not(tf.reduce_any(tf.equal(label, tf.constant(exclude_labels, tf.int64)))))
    return keep


def _epoch_seed(seed: int, epoch: tf.Tensor, stream: int) -> tf.Tensor:
    """A distinct int64 shuffle seed per (seed, epoch, stream)."""
    return tf.constant(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64) * 2 + stream


def _choose_indices(
    seed: int,
    counter: tf.Tensor,
    num_images: tf.Tensor,
    pairing: str,
    allowed: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """(cond, target) indices in [0, num_images), distinct for 'pairs', keyed by [seed, counter].

    With `allowed` (the flattened n x n mask of the similarity filter) the pair is uniform over
    the allowed ordered pairs; for 'reconstruction' its condition is used twice.
    """
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(counter, tf.int64)])
    draws = tf.random.stateless_uniform([2], seed=key, minval=0, maxval=2**62, dtype=tf.int64)
    n = tf.cast(num_images, tf.int64)
    if allowed is not None:
        flat = tf.where(allowed)[:, 0]  # int64 positions i * n + j of the allowed pairs
        chosen = flat[draws[0] % tf.size(flat, out_type=tf.int64)]
        cond = chosen // n
        target = cond if pairing == "reconstruction" else chosen % n
        return tf.cast(cond, tf.int32), tf.cast(target, tf.int32)
    cond = draws[0] % n
    if pairing == "reconstruction":
        target = cond
    else:  # uniform over the n - 1 other images
        target = (cond + 1 + draws[1] % (n - 1)) % n
    return tf.cast(cond, tf.int32), tf.cast(target, tf.int32)


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
