"""Page shards: the on-disk format every Semantica data source is turned into.

Shard format
============
A dataset is a set of TFRecord files of serialized `tf.train.Example` protos, **one record per
web page** (or per "page-like" group, e.g. a set of same-class images). Features:

==============  ===========  ======================================================================
feature         type         meaning
==============  ===========  ======================================================================
``page_id``     bytes_list   exactly 1 value: a unique id string (UTF-8)
``page_url``    bytes_list   exactly 1 value: the page URL, may be empty (UTF-8)
``images``      bytes_list   >= 1 values: the page's encoded images, JPEG or PNG bytes
``alt_texts``   bytes_list   optional; when present, one UTF-8 string per image, same order
``label``       int64_list   optional, 1 value >= 0 (e.g. the class id of a label-grouped page);
                             readers see -1 when it is absent
==============  ===========  ======================================================================

A page never spans two records, so sharding a dataset by *file* (one subset of files per host)
never splits a pair. Files are named ``{prefix}-{i:05d}-of-{n:05d}.tfrecord`` (``i`` from 0), e.g.
``train-00003-of-00008.tfrecord``; a glob such as ``DIR/train-*.tfrecord`` selects one split.

The parsing spec `FEATURES` (used through `parse_page`) is the single source of truth shared by
this writer, `read_pages` and the training input pipeline (`semantica_jax.input_pipeline`).

Writing
=======
`write_shards` streams an iterable of page dicts into ``num_shards`` files. Pages are dealt out
**round-robin** over the files in the order they arrive (page k goes to file k mod num_shards,
counting only pages actually written), so files stay balanced without knowing the page count in
advance; shuffle the pages beforehand if their order is correlated with anything. If there are
fewer pages than files, some files are empty (still valid TFRecord files). Files are written
under a temporary name and renamed when complete, so a crashed run never leaves a file that
matches the shard glob.

Every image is checked by decoding it (`tf.io.decode_image`). JPEG and PNG bytes that decode
are stored unchanged; other formats TensorFlow can decode (GIF, BMP) are re-encoded to
``image_format``; bytes that do not decode are *skipped and counted*. A page left with no image
is dropped and counted. uint8 arrays are encoded to ``image_format`` (these are trusted and
not decoded again).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import tensorflow as tf

from data_pipeline import shard_format

logger = logging.getLogger(__name__)

# tf.io.parse_single_example spec of one page record (see module docstring).
FEATURES: dict[str, Any] = {
    "page_id": tf.io.FixedLenFeature([], tf.string),
    "page_url": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "images": tf.io.RaggedFeature(tf.string),
    "alt_texts": tf.io.RaggedFeature(tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}

NO_LABEL = -1  # what readers see when a page has no `label` feature
IMAGE_FORMATS = ("png", "jpeg")

# An image as accepted by `write_shards`: a file path, a uint8 array, or encoded bytes.
ImageLike = Union[str, os.PathLike, np.ndarray, bytes]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(data: bytes) -> str | None:
    """'png' or 'jpeg' from the leading magic bytes; None for anything else."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def parse_page(serialized: tf.Tensor | bytes) -> dict[str, tf.Tensor]:
    """Parses one serialized page record (works eagerly and inside tf.data / tf.function).

    Returns a dict of tensors: ``page_id`` (string scalar), ``page_url`` (string scalar),
    ``images`` (string [N]), ``alt_texts`` (string [N] or [0]), ``label`` (int64 scalar, -1
    when absent) and ``num_images`` (int32 scalar, N).
    """
    page = tf.io.parse_single_example(serialized, FEATURES)
    page["num_images"] = tf.size(page["images"], out_type=tf.int32)
    return page


def make_example(
    page_id: str,
    images: Sequence[bytes],
    *,
    page_url: str = "",
    alt_texts: Sequence[str] | None = None,
    label: int | None = None,
) -> tf.train.Example:
    """Builds the `tf.train.Example` of one page from already-encoded image bytes.

    No validation of the image bytes happens here (`write_shards` does that); this is the
    low-level builder, also handy in tests that need a deliberately broken record.
    """
    feature = {
        "page_id": _bytes_feature([page_id.encode("utf-8")]),
        "page_url": _bytes_feature([page_url.encode("utf-8")]),
        "images": _bytes_feature(list(images)),
    }
    if alt_texts is not None:
        feature["alt_texts"] = _bytes_feature([t.encode("utf-8") for t in alt_texts])
    if label is not None:
        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def encode_array(array: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """Encodes a uint8 image array (HxW, HxWx1 or HxWx3) to PNG or JPEG bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise ValueError(
            f"image arrays must have shape HxW, HxWx1 or HxWx3 (non-empty), got {array.shape}"
        )
    if image_format == "png":
        return tf.io.encode_png(array).numpy()
    if image_format == "jpeg":
        return tf.io.encode_jpeg(array, quality=jpeg_quality).numpy()
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


@dataclasses.dataclass
class _Counters:
    pages_written: int = 0
    images_written: int = 0
    skipped_corrupt_images: int = 0
    reencoded_images: int = 0
    dropped_pages: int = 0


def write_shards(
    pages: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    num_shards: int,
    prefix: str = "pages",
    image_format: str = "png",
    jpeg_quality: int = 95,
) -> dict[str, Any]:
    """Writes pages into ``num_shards`` TFRecord files ``out_dir/{prefix}-*-of-*.tfrecord``.

    Args:
      pages: iterable of dicts with keys ``page_id`` (str, required, unique), ``images`` (list;
        each item a file path, a uint8 array HxW / HxWx1 / HxWx3, or encoded image bytes),
        and optionally ``page_url`` (str), ``alt_texts`` (list[str], one per image) and
        ``label`` (int >= 0).
      out_dir: output directory (created if missing; local or any tf.io.gfile filesystem).
      num_shards: number of files; pages are dealt round-robin over them.
      prefix: file name prefix, e.g. 'train' or 'eval'.
      image_format: 'png' or 'jpeg', used for arrays and for non-JPEG/PNG inputs.
      jpeg_quality: JPEG quality when ``image_format='jpeg'``.

    Returns:
      Stats dict: pages_written, images_written, skipped_corrupt_images (images that failed to
      decode), reencoded_images (decodable non-JPEG/PNG inputs), dropped_pages (pages left
      with no image), files (the shard paths, in index order) and bytes (their total size).

    Raises:
      ValueError: bad arguments, a page without ``page_id``, a duplicate ``page_id``, an
        ``alt_texts`` list whose length differs from ``images``, a bad array shape/dtype, a
        negative label, or an image item of an unsupported type (the message names the page).
      FileNotFoundError: an image path that does not exist (names the page and the path).
    """
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    out_dir = os.fspath(out_dir)
    tf.io.gfile.makedirs(out_dir)
    paths = [
        os.path.join(out_dir, shard_format.shard_filename(prefix, i, num_shards)) for i in range(num_shards)
    ]
    tmp_paths = [p + ".incomplete" for p in paths]
    counters = _Counters()
    seen_ids: set[str] = set()
    writers = [tf.io.TFRecordWriter(p) for p in tmp_paths]
    try:
        for page in pages:
            example = _page_to_example(page, seen_ids, counters, image_format, jpeg_quality)
            if example is None:
                continue
            writers[counters.pages_written % num_shards].write(example.SerializeToString())
            counters.pages_written += 1
        for writer in writers:
            writer.close()
        for tmp, final in zip(tmp_paths, paths):
            tf.io.gfile.rename(tmp, final, overwrite=True)
    except BaseException:
        for writer in writers:
            writer.close()
        for tmp in tmp_paths:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        raise
    stats: dict[str, Any] = dataclasses.asdict(counters)
    stats["files"] = paths
    stats["bytes"] = sum(tf.io.gfile.stat(p).length for p in paths)
    logger.info(
        "wrote %d pages / %d images into %d files under %s (%d corrupt images skipped, "
        "%d pages dropped)",
        counters.pages_written,
        counters.images_written,
        num_shards,
        out_dir,
        counters.skipped_corrupt_images,
        counters.dropped_pages,
    )
    return stats


def read_pages(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields the pages of one shard file as python dicts (for inspection and tests).

    Each dict has ``page_id`` (str), ``page_url`` (str), ``images`` (list[bytes]),
    ``alt_texts`` (list[str], empty when absent) and ``label`` (int, or None when absent).
    """
    for record in tf.data.TFRecordDataset(os.fspath(path)):
        page = parse_page(record)
        label = int(page["label"].numpy())
        yield {
            "page_id": page["page_id"].numpy().decode("utf-8"),
            "page_url": page["page_url"].numpy().decode("utf-8"),
            "images": [bytes(b) for b in page["images"].numpy()],
            "alt_texts": [t.decode("utf-8") for t in page["alt_texts"].numpy()],
            "label": None if label == NO_LABEL else label,
        }


# --------------------------------------------------------------------------- internals


def _bytes_feature(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _page_to_example(
    page: Mapping[str, Any],
    seen_ids: set[str],
    counters: _Counters,
    image_format: str,
    jpeg_quality: int,
) -> tf.train.Example | None:
    """Validates one page dict and builds its Example; None when the page is dropped."""
    page_id = page.get("page_id")
    if not isinstance(page_id, str) or not page_id:
        raise ValueError(f"every page needs a non-empty str 'page_id'; got page {_short(page)}")
    if page_id in seen_ids:
        raise ValueError(f"duplicate page_id {page_id!r}")
    seen_ids.add(page_id)
    images = page.get("images")
    if images is None or isinstance(images, (bytes, str, np.ndarray)):
        raise ValueError(f"page {page_id!r}: 'images' must be a list of images, got {type(images)}")
    images = list(images)
    alt_texts = page.get("alt_texts")
    if alt_texts is not None:
        alt_texts = list(alt_texts)
        if len(alt_texts) != len(images):
            raise ValueError(
                f"page {page_id!r}: {len(alt_texts)} alt_texts for {len(images)} images"
            )
    label = page.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"page {page_id!r}: label must be an int >= 0, got {label!r}")
    page_url = page.get("page_url") or ""

    kept_images: list[bytes] = []
    kept_alts: list[str] = []
    for i, item in enumerate(images):
        encoded = _encode_image(item, page_id, i, counters, image_format, jpeg_quality)
        if encoded is None:
            continue
        kept_images.append(encoded)
        if alt_texts is not None:
            kept_alts.append(str(alt_texts[i]))
    if not kept_images:
        counters.dropped_pages += 1
        logger.warning("page %r dropped: no valid image", page_id)
        return None
    counters.images_written += len(kept_images)
    return make_example(
        page_id,
        kept_images,
        page_url=str(page_url),
        alt_texts=kept_alts if alt_texts is not None else None,
        label=None if label is None else int(label),
    )


def _encode_image(
    item: ImageLike,
    page_id: str,
    index: int,
    counters: _Counters,
    image_format: str,
    jpeg_quality: int,
) -> bytes | None:
    """One image item -> JPEG/PNG bytes, or None (counted) when it does not decode."""
    where = f"page {page_id!r} image {index}"
    if isinstance(item, np.ndarray):
        try:
            return encode_array(item, image_format, jpeg_quality)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"{where}: image file {path!r} does not exist")
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        where += f" ({path})"
    else:
        raise ValueError(
            f"{where}: unsupported image item of type {type(item).__name__} "
            "(expected a path, a uint8 array or encoded bytes)"
        )
    try:
        decoded = tf.io.decode_image(data, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        counters.skipped_corrupt_images += 1
        logger.warning("%s skipped: does not decode (%s)", where, _first_line(e))
        return None
    if sniff_format(data) is not None:
        return data
    # Decodable but neither JPEG nor PNG (e.g. GIF, BMP): store in the shard format instead.
    counters.reencoded_images += 1
    channels = decoded.shape[-1]
    if channels == 4:
        decoded = decoded[..., :3]
    elif channels == 2:
        decoded = decoded[..., :1]
    return encode_array(decoded.numpy(), image_format, jpeg_quality)


def _short(page: Mapping[str, Any]) -> str:
    text = repr({k: page[k] for k in list(page)[:3]})
    return text if len(text) < 200 else text[:200] + "..."


def _first_line(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__
