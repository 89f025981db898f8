"""Image utilities for results: variation grids (condition | samples) and PNG files."""
from __future__ import annotations

import os

import numpy as np


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


def variation_grid(
    conds: np.ndarray, samples: np.ndarray, samples_per_condition: int, size: int, pad: int = 2
) -> np.ndarray:
    """One row per condition: [condition | its samples], uint8 [rows*(size+pad)+pad, ..., 3].

    conds: [N, h, w, 3] in [0, 1] (encoder input); samples: [N * samples_per_condition, size, size, 3]
    in [-1, 1], grouped by condition. A wider gap separates the condition column from the samples.
    """
    n = conds.shape[0]
    if samples.shape[0] != n * samples_per_condition:
        raise ValueError(
            f"{samples.shape[0]} samples for {n} conditions x {samples_per_condition} per condition"
        )
    cond_u8 = _resize_nearest(to_uint8(conds, (0.0, 1.0)), size)
    samp_u8 = to_uint8(samples).reshape(n, samples_per_condition, size, size, 3)
    cols = 1 + samples_per_condition
    gap = 3 * pad  # extra space after the condition column
    height = n * (size + pad) + pad
    width = cols * (size + pad) + pad + gap
    grid = np.full((height, width, 3), 255, np.uint8)
    for i in range(n):
        y = pad + i * (size + pad)
        grid[y : y + size, pad : pad + size] = cond_u8[i]
        for j in range(samples_per_condition):
            x = pad + gap + (j + 1) * (size + pad)
            grid[y : y + size, x : x + size] = samp_u8[i, j]
    return grid


def save_png(image: np.ndarray, path: str) -> str:
    """Writes a uint8 [H, W, C] image as PNG (tf.io, so gs:// paths work too)."""
    import tensorflow as tf

    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    tf.io.write_file(path, tf.io.encode_png(np.asarray(image, np.uint8)))
    return path
