r"""`semantica-vary`: variations of your own images from an export, as a PNG grid.

  semantica-vary --export DIR --image a.jpg [b.png ...] --num 8 --steps 100 --guidance 1.0 \
                 --seed 0 --out grid.png [--sampler ddpm|ddim] [--guidance_interval 0.0,1.0]

One row per input image: the input (centre-cropped to a square) | `--num` variations. Inputs
are decoded with TensorFlow (JPEG, PNG, GIF's first frame, BMP; grey and alpha become RGB),
centre-cropped and resized exactly like training images (antialiased bicubic) to the frozen
encoder's resolution. The same (export, image, seed) gives the same variations on any device
count. Errors (a missing or incomplete export, a file that is not an image, bad settings) end
with one line `semantica-vary: error: ...` and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class VaryError(ValueError):
    pass


def load_image(path: str, size: int, fit: str = "resize") -> np.ndarray:
    """A file -> float32 [size, size, 3] in [0, 1] (centre crop to a square, then resize, or
    pad with fit='pad' as `data.target_fit` does)."""
    import tensorflow as tf

    from semantica_jax import image_ops

    if not os.path.isfile(path):
        raise VaryError(f"{path}: no such file")
    data = open(path, "rb").read()
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        reason = re.sub(r"\{\{.*?\}\}", "", " ".join(str(e).split())).strip()  # drop TF's op names
        raise VaryError(f"{path}: not a decodable image ({reason[:120]})") from e
    h, w = int(image.shape[0]), int(image.shape[1])
    if h < 1 or w < 1:
        raise VaryError(f"{path}: empty image ({h}x{w})")
    side = min(h, w)
    image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
    image = tf.image.convert_image_dtype(image, tf.float32)
    return image_ops.resize(image, size, fit).numpy()


def vary(export_dir: str, image_paths: Sequence[str], *, num: int, steps: int, guidance: float,
         seed: int, sampler: str = "ddpm", guidance_interval: tuple[float, float] = (0.0, 1.0),
         batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [N, S, S, 3] in [0, 1], variations [N * num, S, S, 3] in [-1, 1])."""
    from semantica_jax import export as export_lib, sampling

    if num < 1:
        raise VaryError(f"--num={num} must be >= 1")
    if not image_paths:
        raise VaryError("no --image given")
    try:
        settings = sampling.SamplerSettings(sampler, int(steps), float(guidance), tuple(guidance_interval))
    except ValueError as e:
        raise VaryError(str(e)) from e
    model = export_lib.load_export(export_dir)  # ExportError names what is wrong
    c = model.config
    cond = np.stack([load_image(p, int(c.encoder.image_size)) for p in image_paths])
    shown = np.stack([load_image(p, int(c.data.image_size), str(c.data.target_fit)) for p in image_paths])
    ids = np.arange(len(image_paths) * num)
    keys = sampling.sample_keys(seed, ids)
    samples = model.sampler(batch_size).generate(
        model.ema_params, model.encoder_params(), np.repeat(cond, num, axis=0), keys, settings)
    return shown, samples


def main(argv: Sequence[str] | None = None) -> int:
    from semantica_jax import export as export_lib, images as images_lib

    parser = argparse.ArgumentParser(prog="semantica-vary", description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True, help="export directory (semantica-export)")
    parser.add_argument("--image", nargs="+", required=True, help="input image files")
    parser.add_argument("--num", type=int, default=8, help="variations per input")
    parser.add_argument("--steps", type=int, default=100, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--guidance_interval", default="0.0,1.0", help="apply guidance for t in [lo,hi]")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", required=True, help="output PNG path")
    args = parser.parse_args(argv)
    try:
        lo, hi = (float(v) for v in args.guidance_interval.split(","))
        shown, samples = vary(args.export, args.image, num=args.num, steps=args.steps, guidance=args.guidance,
                              seed=args.seed, sampler=args.sampler, guidance_interval=(lo, hi),
                              batch_size=args.batch_size)
    except (VaryError, export_lib.ExportError) as e:
        print(f"semantica-vary: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. a malformed --guidance_interval
        print(f"semantica-vary: error: {e}", file=sys.stderr)
        return 2
    size = shown.shape[1]
    grid = images_lib.variation_grid(shown, samples, args.num, size,
                                     row_labels=[os.path.basename(p) for p in args.image])
    images_lib.save_png(grid, args.out)
    print(args.out)
    return 0


def run() -> None:
    """Console-script entry (`semantica-vary`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
