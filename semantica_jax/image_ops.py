"""Image decoding and resizing, shared by the pair pipeline, the token cache and the metrics.

Every image the project feeds a model goes through here, so training targets, encoder inputs,
eval references and the judge see pixels prepared the same way:

  decode*      encoded bytes (JPEG / PNG / ...) -> pixels (uint8, or float32 in [0, 1]); JPEGs can
               be decoded at a DCT scale that keeps the shorter side >= the size asked for
  resize*      -> a square [size, size, 3] float32 in [0, 1]: box filter ('area') when shrinking
               both sides, antialiased bicubic otherwise; fit='pad' centres an image no larger
               than `size` on a black canvas without resampling
  target_image encoded bytes -> a training target in [-1, 1]
"""
from __future__ import annotations

import functools

import tensorflow as tf

TARGET_FITS = ("resize", "pad")


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes -> float32 [H, W, 3] in [0, 1]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.image.convert_image_dtype(image, tf.float32)


def decode_u8(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes -> uint8 [H, W, 3]."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


_JPEG_MAGIC = b"\xff\xd8\xff"
_DCT_RATIOS = (1, 2, 4, 8)


def decode_u8_at_least(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H', W', 3]: a JPEG decoded at the largest DCT scale 1/r (r in 1, 2, 4, 8) whose
    shorter side ceil(min(H, W) / r) is still >= `size` (libjpeg scales in the DCT domain, much
    cheaper than decoding full size and resizing); other formats fully decoded."""

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(encoded)
        short = tf.minimum(shape[0], shape[1])
        branch = tf.constant(0, tf.int32)
        for k, r in enumerate(_DCT_RATIOS[1:], start=1):
            branch = tf.where((short + r - 1) // r >= size, k, branch)
        return tf.switch_case(branch, [
            functools.partial(tf.io.decode_jpeg, encoded, channels=3, ratio=r)
            for r in _DCT_RATIOS])

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC)
    return tf.cond(is_jpeg, jpeg, lambda: decode_u8(encoded))


def square_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """[H, W, C] -> float32 [size, size, C]: box-filter ('area') when shrinking both sides,
    antialiased bicubic otherwise (enlarging, or mixed)."""
    shape = tf.shape(image)
    shrink = tf.logical_and(shape[0] >= size, shape[1] >= size)
    return tf.cond(
        shrink,
        lambda: tf.image.resize(image, [size, size], method="area"),
        lambda: tf.image.resize(image, [size, size], method="bicubic", antialias=True),
    )


def square_fit(image: tf.Tensor, size: int, fit: str) -> tf.Tensor:
    """`square_resize`, or with fit='pad' an image no larger than `size` on both sides centred
    on a black canvas without resampling (larger images are resized as with 'resize')."""
    if fit == "resize":
        return square_resize(image, size)
    if fit != "pad":
        raise ValueError(f"data.target_fit={fit!r}; expected one of {TARGET_FITS}")
    shape = tf.shape(image)
    fits = tf.logical_and(shape[0] <= size, shape[1] <= size)

    def pad():
        top, left = (size - shape[0]) // 2, (size - shape[1]) // 2
        return tf.image.pad_to_bounding_box(tf.cast(image, tf.float32), top, left, size, size)

    return tf.cond(fits, pad, lambda: square_resize(image, size))


def resize_u8(image: tf.Tensor, size: int, fit: str = "resize") -> tf.Tensor:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]; equals `resize(decode(...))` up to
    float rounding (the resize is linear), without a full-size float conversion pass."""
    image = square_fit(image, size, fit)
    image = tf.clip_by_value(image * (1.0 / 255.0), 0.0, 1.0)
    return tf.ensure_shape(image, [size, size, 3])


def resize(image: tf.Tensor, size: int, fit: str = "resize") -> tf.Tensor:
    image = square_fit(image, size, fit)
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [size, size, 3])


def target_image(encoded: tf.Tensor, size: int, fit: str = "resize") -> tf.Tensor:
    """Encoded image bytes -> float32 [size, size, 3] in [-1, 1], prepared exactly as training
    targets are (`data.image_size`, `data.target_fit`): the eval set, the judge and the
    memorisation reference use it."""
    return resize(decode(encoded), size, fit) * 2.0 - 1.0
