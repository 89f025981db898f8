"""Image utilities for results: labelled variation grids (condition | samples) and PNG files."""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Sequence

import numpy as np

BACKGROUND = (255, 255, 255)
SEPARATOR = (128, 128, 128)  # thin lines between sample cells
FRAME = (255, 140, 0)  # orange frame around the condition column
TEXT = (0, 0, 0)
MIN_CELL = 96  # default upscaling makes cells at least this many pixels wide
COLUMN_GAP = 12  # white gap between the condition column and the samples
MARGIN = 6
MAX_LABEL_CHARS = 32


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    lo, hi = value_range
    x = (np.asarray(images, np.float32) - lo) / (hi - lo)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of [N, h, w, C] to [N, size, size, C] (display only)."""
    n, h, w, c = images.shape
    rows = (np.arange(size) * h // size).clip(0, h - 1)
    cols = (np.arange(size) * w // size).clip(0, w - 1)
    return images[:, rows][:, :, cols]


def default_scale(size: int) -> int:
    """The smallest integer factor giving cells >= MIN_CELL px, and at least 3."""
    return max(3, math.ceil(MIN_CELL / max(int(size), 1)))


def class_names_for(group_names: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """Maps eval group names "label k" to names[k] (e.g. Fashion-MNIST classes); others unchanged."""
    out = []
    for g in group_names:
        m = re.fullmatch(r"label (\d+)", str(g))
        out.append(names[int(m.group(1))] if names and m and int(m.group(1)) < len(names) else str(g))
    return out


@functools.lru_cache(maxsize=8)
def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # small bitmap font


def _text_width(text: str, px: int) -> int:
    return int(math.ceil(_font(px).getlength(text))) if text else 0


def _fit(label: str) -> str:
    label = " ".join(str(label).split())
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 3] + "..."


def variation_grid(
    conds: np.ndarray,
    samples: np.ndarray,
    samples_per_condition: int,
    size: int,
    pad: int = 2,
    *,
    scale: int | None = None,
    row_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """One row per condition: [label | condition | its samples], as uint8 [H, W, 3].

    conds: [N, h, w, 3] in [0, 1] (encoder input, resized to `size`); samples:
    [N * samples_per_condition, size, size, 3] in [-1, 1], grouped by condition. Every cell is
    upscaled by the integer `scale` (nearest neighbour; default `default_scale(size)`), cells are
    split by `pad`-px grey lines, the condition column has an orange `pad`-px frame and a wider gap
    before the samples, and a header row names the two parts. `row_labels` (one per condition)
    are written in a column on the left; None leaves that column out.
    """
    n, m = conds.shape[0], int(samples_per_condition)
    if samples.shape[0] != n * m:
        raise ValueError(f"{samples.shape[0]} samples for {n} conditions x {m} per condition")
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"{len(row_labels)} row labels for {n} conditions")
    scale = default_scale(size) if scale is None else int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    pad = max(int(pad), 1)
    cell = size * scale
    up = lambda x: np.repeat(np.repeat(x, scale, axis=-3), scale, axis=-2)  # exact nearest upscaling
    cond_u8 = _resize_nearest(to_uint8(conds, (0.0, 1.0)), cell)  # any condition size, straight to the cell
    samp_u8 = up(to_uint8(samples).reshape(n, m, size, size, 3))

    font_px = int(np.clip(cell // 6, 12, 22))
    labels = [_fit(r) for r in row_labels] if row_labels is not None else None
    label_w = (max(_text_width(t, font_px) for t in labels) + 2 * MARGIN) if labels else 0
    head_cond, head_var = _text_width("condition", font_px), _text_width("variations", font_px)
    header = font_px + 2 * MARGIN
    step = cell + pad
    cond_w = step + pad  # the condition column with its frame
    samp_w = m * step + pad
    block_h = n * step + pad
    cond_x = MARGIN + label_w  # left edge of the condition column's frame
    samp_x = cond_x + cond_w + max(COLUMN_GAP, head_cond + MARGIN - cond_w)  # headers never overlap
    top = MARGIN + header
    width = samp_x + max(samp_w, head_var) + MARGIN
    height = top + block_h + MARGIN

    grid = np.full((height, width, 3), BACKGROUND, np.uint8)
    grid[top : top + block_h, cond_x : cond_x + cond_w] = FRAME
    grid[top : top + block_h, samp_x : samp_x + samp_w] = SEPARATOR
    for i in range(n):
        y = top + pad + i * step
        grid[y : y + cell, cond_x + pad : cond_x + pad + cell] = cond_u8[i]
        for j in range(m):
            x = samp_x + pad + j * step
            grid[y : y + cell, x : x + cell] = samp_u8[i, j]

    from PIL import Image, ImageDraw

    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    font = _font(font_px)
    head_y = MARGIN + header // 2
    for text, x, w, tw in (("condition", cond_x, cond_w, head_cond), ("variations", samp_x, samp_w, head_var)):
        centred = tw <= w  # else left-aligned, so it stays inside the image
        draw.text((x + w // 2 if centred else x, head_y), text, fill=TEXT, font=font, anchor="mm" if centred else "lm")
    for i, text in enumerate(labels or []):
        draw.text((cond_x - MARGIN, top + pad + i * step + cell // 2), text, fill=TEXT, font=font, anchor="rm")
    return np.asarray(canvas, np.uint8)


def save_png(image: np.ndarray, path: str) -> str:
    """Writes a uint8 [H, W, C] image as PNG (tf.io, so gs:// paths work too)."""
    import tensorflow as tf

    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    tf.io.write_file(path, tf.io.encode_png(np.asarray(image, np.uint8)))
    return path
