r"""Data benchmarks: the Beam page builder's throughput and the training pair pipeline's rate.

  python benchmarks/data_bench.py                      # table on stdout + benchmarks/data_bench.json
  python benchmarks/data_bench.py --pages=300 --out=/tmp/data_bench.json

1. Builder: photo-like JPEGs (noise + gradients + shapes, 256-512 px, ~30-80 KB, quality 92)
   listed in a JSONL manifest, pages of 4 images, through `data_pipeline.build_pages`
   (decode, validate, RGB, re-encode JPEG q90; max_side 512 so nothing is resized):
   images/s end to end (pipeline start-up included) on the DirectRunner in-process and with
   2 worker processes (``--direct_num_workers=2 --direct_running_mode=multi_processing``).
2. Training side: the shards just built, through `semantica_jax.input_pipeline.make_pair_dataset`
   (pairs at 64 px, condition at --cond_size, batches of 64, AUTOTUNE parallelism) in pairs/s,
   next to the decode-only rate of the same files in the same process: the same read / parse /
   index choice, then decoding the same two images per page and nothing else (no resize, no
   batch). The ratio pairs/s / decode-only pairs/s is the pipeline's efficiency (target >= 0.9).
   Both are measured after a warm-up, alternating, `--repeats` times; the best of each is kept.
The machine's load average is recorded (other processes on the same cores lower every number).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)


def photo_like(seed: int) -> bytes:
    """A JPEG that compresses like a photo: smooth gradients, shapes, texture noise."""
    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(256, 513, size=2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)),
        127 + 100 * np.cos(y / rng.uniform(20, 80) + rng.uniform(0, 6)),
        255 * (x + y) / (w + h),
    ], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(10, 80))
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(img, np.float32) + rng.normal(0, 10, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=92)
    return out.getvalue()


def make_inputs(root: str, num_pages: int, per_page: int, unique: int) -> tuple[str, list[int]]:
    img_dir = os.path.join(root, "img")
    os.makedirs(img_dir, exist_ok=True)
    sizes = []
    for k in range(unique):
        data = photo_like(k)
        sizes.append(len(data))
        with open(os.path.join(img_dir, f"{k}.jpg"), "wb") as f:
            f.write(data)
    rng = np.random.default_rng(0)
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w") as f:
        for p in range(num_pages):
            ids = rng.choice(unique, size=per_page, replace=False)
            f.write(json.dumps({"page_url": f"https://bench.example/{p}",
                                "images": [f"img/{i}.jpg" for i in ids]}) + "\n")
    return manifest, sizes


def bench_builder(manifest: str, out_dir: str, beam_args: list[str]) -> dict:
    from data_pipeline import build_pages, sources

    spec = build_pages.SplitSpec(sources.manifest_source(manifest), "train", 4)
    t0 = time.perf_counter()
    stats = build_pages.run_build([spec], out_dir, pipeline_args=beam_args, progress_seconds=0)
    seconds = time.perf_counter() - t0
    s = stats["train"]
    return {"images": s["images"]["written"], "pages": s["pages"]["written"],
            "seconds": round(seconds, 2), "images_per_s": round(s["images"]["in"] / seconds, 1),
            "bytes": s["bytes"]["files"]}


def _rate(ds, items_per_element, warmup: int, measure: int) -> float:
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(measure):
        next(it)
    return measure * items_per_element / (time.perf_counter() - t0)


def bench_pipeline(files: list[str], cond_size: int, batch: int, pairs: int, repeats: int,
                   jpeg_dct_scaling: bool = True) -> dict:
    import tensorflow as tf

    from semantica_jax import input_pipeline

    tf.config.set_visible_devices([], "GPU")
    full = input_pipeline.make_pair_dataset(
        files, input_pipeline.data_section(image_size=64, shuffle_buffer=1000, prefetch=2,
                                           jpeg_dct_scaling=jpeg_dct_scaling),
        cond_image_size=cond_size, batch_size=batch)

    def decode_only(counter, page):
        cond, target = input_pipeline._choose_indices(0, counter, page["num_images"], "pairs")
        a = tf.io.decode_image(page["images"][cond], channels=3, expand_animations=False)
        b = tf.io.decode_image(page["images"][target], channels=3, expand_animations=False)
        return tf.size(a) + tf.size(b)

    pages = tf.data.Dataset.from_tensor_slices(files).repeat().interleave(
        tf.data.TFRecordDataset, cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    pages = pages.map(input_pipeline._parse, num_parallel_calls=tf.data.AUTOTUNE)
    decode = pages.enumerate().map(decode_only, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)
    steps = max(pairs // batch, 4)
    full_rates, decode_rates = [], []
    for _ in range(repeats):
        full_rates.append(_rate(full, batch, 3, steps))
        decode_rates.append(_rate(decode, 1, 3 * batch, steps * batch))
    best_full, best_decode = max(full_rates), max(decode_rates)
    return {"pairs_per_s": round(best_full, 1), "decode_only_pairs_per_s": round(best_decode, 1),
            "ratio": round(best_full / best_decode, 3),
            "all_pairs_per_s": [round(r, 1) for r in full_rates],
            "all_decode_only_pairs_per_s": [round(r, 1) for r in decode_rates]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--per_page", type=int, default=4)
    parser.add_argument("--unique_images", type=int, default=96)
    parser.add_argument("--cond_sizes", default="224,64",
                        help="condition (encoder input) sizes to measure, comma-separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2048, help="pairs per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_multiprocess", action="store_true")
    parser.add_argument("--out", default=os.path.join(_REPO, "benchmarks", "data_bench.json"))
    args = parser.parse_args(argv)

    result = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as root:
        manifest, sizes = make_inputs(root, args.pages, args.per_page, args.unique_images)
        result["jpeg_kb"] = {"mean": round(np.mean(sizes) / 1024, 1),
                             "min": round(min(sizes) / 1024, 1), "max": round(max(sizes) / 1024, 1)}
        builder = {"in_process": bench_builder(manifest, os.path.join(root, "a"), [])}
        if not args.skip_multiprocess:
            builder["multi_processing_2"] = bench_builder(
                manifest, os.path.join(root, "b"),
                ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
        result["builder"] = builder
        files = sorted(os.path.join(root, "a", f) for f in os.listdir(os.path.join(root, "a"))
                       if f.endswith(".tfrecord"))
        result["pipeline"] = []
        for cond_size in [int(x) for x in args.cond_sizes.split(",") if x.strip()]:
            for dct in (True, False):
                r = bench_pipeline(files, cond_size, args.batch, args.pairs, args.repeats, dct)
                r.update(image_size=64, cond_size=cond_size, batch=args.batch, jpeg_dct_scaling=dct)
                result["pipeline"].append(r)
                print(f"[data_bench] cond {cond_size} dct {dct}: {r}", file=sys.stderr, flush=True)
    result["load_average_after"] = os.getloadavg()

    print(f"\nmachine: {result['cpus']} CPUs, load average before {result['load_average_before'][0]:.2f}, "
          f"after {result['load_average_after'][0]:.2f}; JPEGs {result['jpeg_kb']} KB")
    print("| measurement | value |\n|---|---:|")
    for name, b in result["builder"].items():
        print(f"| builder {name}: images/s ({b['images']} images, {b['seconds']} s) | "
              f"{b['images_per_s']} |")
    for p in result["pipeline"]:
        what = (f"64 px target + {p['cond_size']} px cond, "
                f"{'DCT-scaled' if p['jpeg_dct_scaling'] else 'full'} target decode")
        print(f"| pair pipeline ({what}): pairs/s / decode-only pairs/s = ratio | "
              f"{p['pairs_per_s']} / {p['decode_only_pairs_per_s']} = {p['ratio']} |")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
