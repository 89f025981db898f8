"""Synthetic page shards whose pixels say which page and which image they are.

Used by tests and smoke runs: every image is a flat-coloured 2x2 grid of quadrants. The
top-left, top-right and bottom-left quadrants spell the page number, the bottom-right quadrant
spells the image's index within its page, each RGB channel holding one base-4 digit at levels
0, 85, 170, 255. The quadrants are large flat regions and the code is coarse (the decision
threshold is +-42 grey levels), so `decode_synthetic` recovers (page, index) from an image that
was decoded, converted to float and resized (bicubic, antialiased, down to 8x8 or up to any
size), or JPEG-compressed.

Capacity: 4**9 = 262,144 pages, 4**3 = 64 images per page. Pages carry
``label = page_number % 10``, a URL and one alt text per image, so every optional shard field
is exercised.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from data_pipeline import shards

LEVELS = np.array([0, 85, 170, 255], dtype=np.uint8)
_BASE = len(LEVELS)
PAGE_DIGITS = 9  # 3 quadrants x 3 channels
INDEX_DIGITS = 3  # 1 quadrant x 3 channels
MAX_PAGES = _BASE**PAGE_DIGITS
MAX_IMAGES_PER_PAGE = _BASE**INDEX_DIGITS
MIN_IMAGE_SIZE = 8
NUM_LABELS = 10
# Bytes that no image decoder accepts (used to inject corrupt images).
CORRUPT_IMAGE_BYTES = b"\x89PNG\r\n\x1a\n this is not really a PNG"


def _digits(value: int, num_digits: int) -> list[int]:
    return [(value // _BASE**k) % _BASE for k in range(num_digits)]


def synthetic_image(page_number: int, index: int, image_size: int = 32) -> np.ndarray:
    """The uint8 [image_size, image_size, 3] image of image `index` of page `page_number`."""
    if not 0 <= page_number < MAX_PAGES:
        raise ValueError(f"page_number must be in [0, {MAX_PAGES}), got {page_number}")
    if not 0 <= index < MAX_IMAGES_PER_PAGE:
        raise ValueError(f"index must be in [0, {MAX_IMAGES_PER_PAGE}), got {index}")
    if image_size < MIN_IMAGE_SIZE or image_size % 2:
        raise ValueError(f"image_size must be even and >= {MIN_IMAGE_SIZE}, got {image_size}")
    page_levels = LEVELS[_digits(page_number, PAGE_DIGITS)].reshape(3, 3)
    index_levels = LEVELS[_digits(index, INDEX_DIGITS)]
    quadrant_colours = np.stack([page_levels[0], page_levels[1], page_levels[2], index_levels])
    half = image_size // 2
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:half, :half] = quadrant_colours[0]
    image[:half, half:] = quadrant_colours[1]
    image[half:, :half] = quadrant_colours[2]
    image[half:, half:] = quadrant_colours[3]
    return image


def decode_synthetic(image: Any, value_range: tuple[float, float] = (0.0, 1.0)) -> tuple[int, int]:
    """(page_number, index) of a synthetic image after decoding / resizing / float conversion.

    Args:
      image: array-like [H, W, 3] (numpy or an eager tensor), any square-ish size >= 4.
      value_range: the (black, white) values of `image`, e.g. (0, 1) for the pipeline's `cond`,
        (-1, 1) for its `target`, (0, 255) for uint8 pixels.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    lo, hi = value_range
    image = (image - lo) / (hi - lo) * 255.0
    height, width = image.shape[:2]

    def quadrant_mean(row: int, col: int) -> np.ndarray:
        # The middle half of the quadrant, far from the blurred borders.
        r0, r1 = row * height // 2 + height // 8, row * height // 2 + 3 * height // 8
        c0, c1 = col * width // 2 + width // 8, col * width // 2 + 3 * width // 8
        return image[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)].mean(axis=(0, 1))

    def to_digits(values: np.ndarray) -> np.ndarray:
        return np.abs(values[:, None] - LEVELS[None, :].astype(np.float64)).argmin(axis=1)

    page_digits = np.concatenate(
        [to_digits(quadrant_mean(r, c)) for r, c in ((0, 0), (0, 1), (1, 0))]
    )
    index_digits = to_digits(quadrant_mean(1, 1))
    page = int(sum(int(d) * _BASE**k for k, d in enumerate(page_digits)))
    index = int(sum(int(d) * _BASE**k for k, d in enumerate(index_digits)))
    return page, index


def synthetic_page_id(page_number: int, prefix: str = "synthetic") -> str:
    return f"{prefix}-{page_number:06d}"


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    num_pages: int = 32,
    num_shards: int = 4,
    images_per_page: int | tuple[int, int] = (2, 5),
    image_size: int = 32,
    single_image_pages: int = 0,
    corrupt_images: int = 0,
    seed: int = 0,
    prefix: str = "synthetic",
    image_format: str = "png",
) -> dict[str, Any]:
    """Writes `num_pages` synthetic pages into `num_shards` shards (see module docstring).

    Args:
      out_dir: output directory.
      num_pages: number of pages (page numbers 0..num_pages-1, ids ``{prefix}-{n:06d}``).
      num_shards: number of files (pages dealt round-robin: page n is in file n % num_shards).
      images_per_page: an int, or an inclusive (min, max) range sampled per page with `seed`.
      image_size: side of the square images (even, >= 8).
      single_image_pages: how many of the pages (chosen with `seed`) get exactly one image.
      corrupt_images: how many undecodable images to add to random pages; the writer skips
        and counts them, so ``stats['skipped_corrupt_images'] == corrupt_images`` and the
        stored images keep positions equal to their encoded index.
      seed: seed of every random choice above.
      prefix: file name prefix and page id prefix.
      image_format: 'png' (lossless, default) or 'jpeg'.

    Returns:
      The `shards.write_shards` stats plus ``pages``: one dict per page with ``page_id``,
      ``page_number``, ``num_images`` (stored images), ``label`` and ``shard`` (file index).
    """
    if isinstance(images_per_page, int):
        lo, hi = images_per_page, images_per_page
    else:
        lo, hi = images_per_page
    if not 1 <= lo <= hi <= MAX_IMAGES_PER_PAGE:
        raise ValueError(
            f"images_per_page must satisfy 1 <= min <= max <= {MAX_IMAGES_PER_PAGE}, "
            f"got {images_per_page}"
        )
    if not 0 < num_pages <= MAX_PAGES:
        raise ValueError(f"num_pages must be in [1, {MAX_PAGES}], got {num_pages}")
    if not 0 <= single_image_pages <= num_pages:
        raise ValueError(
            f"single_image_pages must be in [0, num_pages={num_pages}], got {single_image_pages}"
        )
    if corrupt_images < 0:
        raise ValueError(f"corrupt_images must be >= 0, got {corrupt_images}")

    rng = np.random.default_rng(seed)
    counts = rng.integers(lo, hi + 1, size=num_pages)
    counts[rng.choice(num_pages, size=single_image_pages, replace=False)] = 1
    corrupt_per_page = np.bincount(
        rng.integers(0, num_pages, size=corrupt_images), minlength=num_pages
    )

    def pages():
        for n in range(num_pages):
            items: list[Any] = [synthetic_image(n, i, image_size) for i in range(counts[n])]
            alts = [f"page {n} image {i}" for i in range(counts[n])]
            for _ in range(corrupt_per_page[n]):
                pos = int(rng.integers(0, len(items) + 1))
                items.insert(pos, CORRUPT_IMAGE_BYTES)
                alts.insert(pos, f"page {n} corrupt image")
            yield {
                "page_id": synthetic_page_id(n, prefix),
                "page_url": f"https://synthetic.example/{prefix}/{n}",
                "images": items,
                "alt_texts": alts,
                "label": n % NUM_LABELS,
            }

    stats = shards.write_shards(
        pages(), out_dir, num_shards=num_shards, prefix=prefix, image_format=image_format
    )
    stats["pages"] = [
        {
            "page_id": synthetic_page_id(n, prefix),
            "page_number": n,
            "num_images": int(counts[n]),
            "label": n % NUM_LABELS,
            "shard": n % num_shards,
        }
        for n in range(num_pages)
    ]
    stats["image_size"] = image_size
    return stats
