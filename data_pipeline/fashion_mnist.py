"""Fashion-MNIST as label-grouped page shards: the embedded, offline default dataset.

The Debian package ``dataset-fashion-mnist`` ships Fashion-MNIST (60k train + 10k test grey
28x28 images, 10 classes) as IDX files under ``/usr/share/datasets/fashion-mnist``::

    sudo apt-get install -y dataset-fashion-mnist
    python -m data_pipeline.fashion_mnist --out_dir /tmp/fmnist_pages

This builds the paper's *label-grouped* setting: the images of each class are shuffled (seeded)
and cut into pages of ``images_per_page`` same-class images, so a (condition, target) pair is two
different images of one class. Page ids look like ``fmnist-train-c3-000123`` (split, class,
page number within the class), ``page_url`` is empty, ``label`` is the class id. A class's last
page keeps the remainder if it has >= 2 images; a single leftover image is not used (counted in
``unused_images``). Page order is shuffled across classes before writing.

The pages go through the Beam page builder (`data_pipeline.build_pages`: one DirectRunner run,
in-process, for both splits; extra command-line flags are Beam options) with the per-image rules
relaxed for 28 px images (`IMAGE_RULES`: no size limits) and stored as lossless 28x28 RGB PNG
(grey replicated to 3 channels, as every builder source is normalised to RGB). Pages, their
order and their shard assignment (round-robin) are the same as with the earlier non-Beam
writer. The train split becomes ``train-*-of-*.tfrecord`` shards and the test split, held out
for evaluation, ``eval-*-of-*.tfrecord`` shards, both in ``out_dir``, next to a ``stats.json``
with the build parameters and counts (and the builder's ``{train,eval}-stats.json``). A second build with identical parameters finds stats.json and
the shards and does nothing; a build with other parameters first removes the old shards.
``classes`` keeps a subset of the classes (for held-out-class experiments).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data_pipeline import shard_format, sources

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
APT_COMMAND = f"apt-get install -y {DEBIAN_PACKAGE}"
# split name -> (IDX file stem, shard prefix)
SPLITS = {"train": ("train", "train"), "test": ("t10k", "eval")}
STATS_FILE = "stats.json"
# 2: built by the Beam page builder (RGB PNG images, per-split {prefix}-stats.json).
FORMAT_VERSION = 2

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def idx_paths(source_dir: str, split: str) -> tuple[str, str]:
    """(images, labels) IDX gz paths of `split` ('train' or 'test') in `source_dir`."""
    stem = SPLITS[split][0]
    return (
        os.path.join(source_dir, f"{stem}-images-idx3-ubyte.gz"),
        os.path.join(source_dir, f"{stem}-labels-idx1-ubyte.gz"),
    )


def find_source_dir(source_dir: str | None = None) -> str:
    """The directory holding the four Fashion-MNIST IDX gz files.

    Looks in `source_dir` when given, else in `DEFAULT_SOURCE_DIR`, else wherever
    ``dpkg -L dataset-fashion-mnist`` says the files are.

    Raises:
      FileNotFoundError: naming the expected files and the apt command that installs them.
    """
    candidates = [source_dir] if source_dir else [DEFAULT_SOURCE_DIR, *_dpkg_dirs()]
    for candidate in candidates:
        if all(os.path.isfile(p) for split in SPLITS for p in idx_paths(candidate, split)):
            return candidate
    where = source_dir or DEFAULT_SOURCE_DIR
    missing = [p for split in SPLITS for p in idx_paths(where, split) if not os.path.isfile(p)]
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {where!r} (missing: {', '.join(missing)}). "
        f"Install them with `{APT_COMMAND}` (Debian/Ubuntu, as root), which puts them in "
        f"{DEFAULT_SOURCE_DIR}, or pass --source_dir pointing to a directory with "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz."
    )


def read_idx(path: str) -> np.ndarray:
    """Reads one (optionally gzipped) IDX file into a numpy array (native byte order)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(data) - header} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def load_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of `split` ('train' or 'test')."""
    images_path, labels_path = idx_paths(source_dir, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 [N, H, W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: expected {len(images)} labels (one per image in {images_path}), "
            f"got shape {labels.shape}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: label {labels.max()} outside [0, {NUM_CLASSES})")
    return images, labels


def label_grouped_pages(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    split: str,
    images_per_page: int = 5,
    classes: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Groups same-class images into pages (see module docstring).

    Returns (pages in a seeded random order, number of unused leftover images). Each page's
    ``images`` are the uint8 [28, 28] arrays.
    """
    return sources.label_grouped_pages(
        images, labels, id_prefix=f"fmnist-{split}", images_per_page=images_per_page, seed=seed,
        split_key=list(SPLITS).index(split), num_classes=NUM_CLASSES,
        classes=list(range(NUM_CLASSES)) if classes is None else classes,
    )


def source(
    split: str,
    *,
    source_dir: str | None = None,
    images_per_page: int = 5,
    seed: int = 0,
    classes: Sequence[int] | None = None,
):
    """The `sources.Source` of one split ('train' or 'test') for the Beam builder."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {list(SPLITS)}, got {split!r}")
    source_dir = find_source_dir(source_dir)
    _, labels = load_split(source_dir, split)
    # Pages refer to images by index; workers read the IDX file once (`IdxImages`), so the
    # pipeline graph stays small.
    pages, unused = label_grouped_pages(np.arange(len(labels)), labels, split=split,
                                        images_per_page=images_per_page, classes=classes, seed=seed)
    for page in pages:
        page["images"] = [int(i) for i in page["images"]]
    return sources.Source(
        "fashion_mnist", pages=pages,
        info={"source_dir": source_dir, "split": split, "label_names": list(CLASS_NAMES),
              "unused_images": unused},
        loader=IdxImages(source_dir, split),
    )


class IdxImages:
    """Picklable image loader for the Beam workers: index -> uint8 [28, 28] of one split."""

    def __init__(self, source_dir: str, split: str):
        self.source_dir, self.split = source_dir, split
        self._images: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"source_dir": self.source_dir, "split": self.split, "_images": None}

    def __call__(self, index: int) -> np.ndarray:
        if self._images is None:
            self._images = load_split(self.source_dir, self.split)[0]
        return self._images[int(index)]


# Fashion-MNIST images are 28x28 grey: keep them all, never resize, store lossless RGB PNG.
IMAGE_RULES = dict(min_side=0, max_side=0, image_format="png")


def build(
    out_dir: str,
    *,
    images_per_page: int = 5,
    train_shards: int = 8,
    eval_shards: int = 2,
    classes: Sequence[int] | None = None,
    source_dir: str | None = None,
    seed: int = 0,
    pipeline_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Builds (or finds already built) the Fashion-MNIST page shards in `out_dir`.

    Both splits go through ONE run of the Beam page builder (`data_pipeline.build_pages`, the
    DirectRunner in-process unless `pipeline_args` say otherwise), with `IMAGE_RULES`.

    Returns the stats.json content plus ``skipped`` (True when an identical build was found) and
    ``train_files`` / ``eval_files`` (glob patterns for config.data.*_files).
    """
    # Beam (~1 s to import) is loaded only to build, not whenever a config reads CLASS_NAMES.
    from data_pipeline import build_pages, image_rules

    if classes is not None:
        bad = [c for c in classes if not 0 <= int(c) < NUM_CLASSES]
        if bad or not classes:
            raise ValueError(
                f"classes must be a non-empty subset of 0..{NUM_CLASSES - 1}, got {classes}"
            )
        classes = sorted({int(c) for c in classes})
    for name, value in (("train_shards", train_shards), ("eval_shards", eval_shards)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if images_per_page < 2:
        raise ValueError(f"images_per_page must be >= 2 (pages need pairs), got {images_per_page}")
    source_dir = find_source_dir(source_dir)
    params = {
        "format_version": FORMAT_VERSION,
        "images_per_page": images_per_page,
        "train_shards": train_shards,
        "eval_shards": eval_shards,
        "classes": classes if classes is not None else list(range(NUM_CLASSES)),
        "seed": seed,
        "image_rules": IMAGE_RULES,
        # Cheap fingerprint of the source: file names and sizes.
        "source_files": {
            os.path.basename(p): os.path.getsize(p)
            for s in SPLITS
            for p in idx_paths(source_dir, s)
        },
    }
    patterns = {
        "train_files": shard_format.shard_pattern(out_dir, SPLITS["train"][1]),
        "eval_files": shard_format.shard_pattern(out_dir, SPLITS["test"][1]),
    }
    stats_path = os.path.join(out_dir, STATS_FILE)
    existing = _read_stats(stats_path)
    if existing is not None and existing.get("params") == params:
        files = [f for split in existing["splits"].values() for f in split["files"]]
        if all(os.path.isfile(os.path.join(out_dir, f)) for f in files):
            logger.info("%s: identical build found (%s), skipping", out_dir, stats_path)
            return {**existing, **patterns, "skipped": True}

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(stats_path):
        os.remove(stats_path)  # the shards below no longer match it
    for split, (_, prefix) in SPLITS.items():
        for stale in glob.glob(shard_format.shard_pattern(out_dir, prefix)):
            logger.info("removing shard of a previous build: %s", stale)
            os.remove(stale)

    specs = []
    for split, (_, prefix) in SPLITS.items():
        src = source(split, source_dir=source_dir, images_per_page=images_per_page, seed=seed,
                     classes=classes)
        specs.append(build_pages.SplitSpec(
            src, prefix, train_shards if split == "train" else eval_shards))
    result = build_pages.run_build(
        specs, out_dir, rules=image_rules.ImageRules(**IMAGE_RULES), min_images=2,
        pipeline_args=pipeline_args, params={"source": "fashion_mnist", **params},
    )
    splits: dict[str, Any] = {}
    for (split, (_, prefix)), spec in zip(SPLITS.items(), specs):
        built = result[prefix]
        splits[split] = {
            "prefix": prefix,
            "pages": built["pages"]["written"],
            "images": built["images"]["written"],
            "unused_images": spec.source.info["unused_images"],
            "dropped_pages": built["pages"]["dropped"],
            "dropped_images": built["images"]["dropped"],
            "bytes": built["bytes"]["files"],
            "files": built["files"],
            "seconds": built["seconds"],
        }
    stats = {"params": params, "source_dir": source_dir, "splits": splits}
    tmp = stats_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    os.replace(tmp, stats_path)
    return {**stats, **patterns, "skipped": False}


def _read_stats(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _dpkg_dirs() -> Iterator[str]:
    """Directories that `dpkg -L dataset-fashion-mnist` lists a train images file in."""
    if shutil.which("dpkg") is None:
        return
    try:
        out = subprocess.run(
            ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.endswith("train-images-idx3-ubyte.gz"):
            yield os.path.dirname(line)


def _parse_classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes must be comma-separated ints, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.fashion_mnist", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out_dir", required=True, help="where the shards and stats.json go")
    parser.add_argument("--images_per_page", type=int, default=5)
    parser.add_argument("--train_shards", type=int, default=8)
    parser.add_argument("--eval_shards", type=int, default=2)
    parser.add_argument("--classes", type=_parse_classes, default=None,
                        help="comma-separated class ids to keep, e.g. 0,1,2 (default: all)")
    parser.add_argument("--source_dir", default=None,
                        help=f"directory of the IDX gz files (default: {DEFAULT_SOURCE_DIR})")
    parser.add_argument("--seed", type=int, default=0)
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = build(
            args.out_dir,
            images_per_page=args.images_per_page,
            train_shards=args.train_shards,
            eval_shards=args.eval_shards,
            classes=args.classes,
            source_dir=args.source_dir,
            seed=args.seed,
            pipeline_args=beam_args,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"fashion_mnist: error: {e}", file=sys.stderr)
        return 2
    if result["skipped"]:
        print(f"{args.out_dir}: already built with these parameters, nothing to do")
    for split, s in result["splits"].items():
        print(f"{split}: {s['pages']} pages, {s['images']} images, {len(s['files'])} files")
    print(f"config.data.train_files={result['train_files']}")
    print(f"config.data.eval_files={result['eval_files']}")
    return 0


def run() -> None:
    """Console-script entry (`semantica-build-fmnist`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
