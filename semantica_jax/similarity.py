r"""Semantic similarity filtering of (condition, target) pairs, with a report and a sweep.

The paper filters pairs by semantic similarity (necessary for quality) but did not publish the
thresholds. This tool stores what training needs to apply ANY thresholds later, and measures
what each setting keeps, so thresholds are chosen from data rather than guessed:

  # 1. the frozen encoder's pooled embeddings: reuse the token cache when there is one ...
  python -m semantica_jax.similarity --shards='data/fashion_mnist_pages_img_focus28/train-*.tfrecord' \
      --out_dir=data/fashion_mnist_pages_img_focus28_sim --low=0.5 --high=0.95 --sweep
  # ... or embed the page shards here with the config's frozen encoder
  python -m semantica_jax.similarity --config=experiments/semantica_tiny.py \
      --shards='data/crawl_pages/train-*.tfrecord' --out_dir=data/crawl_pages_sim --sweep

Output (``--out_dir``)
  Mirror shards: every input file, same name, same records in the same order, each extended by
  ``pair_sim``: the page's full n x n cosine-similarity matrix of the encoder's pooled embeddings
  (float32, row-major; ``cached_tokens.PAIR_SIM_FEATURE``). Training applies
  ``config.data.pair_filter='similarity'`` with ``data.sim_low <= s <= data.sim_high`` in tf.data,
  so one set of shards serves training with and without the filter and every threshold.
  ``--drop_unpaired`` instead drops, at build time, pages without a pair in [--low, --high]
  (counted in the report). An input ``embed_cache.json`` is copied, so cached tokens still work.
  Report:
    similarity.json       sources, encoder, counts, kept fractions (pairs, pages, images) at
                          [--low, --high], percentiles, the histogram (bins, counts), the sweep
    similarity_hist.png   histogram of within-page pair similarities, thresholds marked
    similarity_pairs.png  example pairs at several similarity levels (one row per level)
    similarity_sweep.md   (with --sweep) kept pages / pairs for every (low, high) setting

Similarities are cosines of the L2-normalised pooled vectors (CLS for DINOv2-style encoders) of
the images as the training pipeline feeds the encoder (decoded, antialiased-bicubic resized to
``config.encoder.image_size``), i.e. exactly the cached ``pooled`` vectors when reused.
Pairs are counted unordered (i < j); training samples ordered pairs, which keeps the same
fraction. How to choose thresholds: docs/DATA.md ("Semantic filtering").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from semantica_jax import cached_tokens, config_lib, fileio, input_pipeline  # noqa: E402

SIM_FEATURE = cached_tokens.PAIR_SIM_FEATURE
REPORT_JSON = "similarity.json"
HIST_PNG = "similarity_hist.png"
PAIRS_PNG = "similarity_pairs.png"
SWEEP_MD = "similarity_sweep.md"
DEFAULT_SWEEP_LOW = (-1.0, 0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_SWEEP_HIGH = (1.0, 0.99, 0.97, 0.95, 0.9)
_FINE_BINS = 2000  # over [-1, 1]: percentiles to 0.001
_HIST_BINS = 100  # reported histogram over [-1, 1] (0.02 wide)
_GRID_PAGES = 400  # pages kept (reservoir) as candidates for the example-pair grid


# --------------------------------------------------------------------------- similarity


def cosine_matrix(pooled: np.ndarray) -> np.ndarray:
    """[n, D] embeddings -> [n, n] cosine similarities (float32)."""
    x = np.asarray(pooled, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.clip(x @ x.T, -1.0, 1.0).astype(np.float32)


def _pooled_from_record(example: tf.train.Example) -> np.ndarray | None:
    feats = example.features.feature
    if "pooled" not in feats:
        return None
    blobs = feats["pooled"].bytes_list.value
    dim = int(feats["pooled_shape"].int64_list.value[0])
    return np.stack([np.frombuffer(b, "<f2").reshape(dim) for b in blobs]).astype(np.float32)


@dataclasses.dataclass
class _Tally:
    """Streaming statistics over pages (exact counts, fine histogram, grid candidates)."""

    lows: np.ndarray
    highs: np.ndarray
    seed: int = 0
    pages: int = 0
    images: int = 0
    pairs: int = 0
    pages_without_pairs: int = 0  # pages with < 2 images
    fine: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_FINE_BINS, np.int64))
    sum_sim: float = 0.0

    def __post_init__(self):
        s = len(self.lows)
        self.kept_pairs = np.zeros(s, np.int64)
        self.kept_pages = np.zeros(s, np.int64)
        self.kept_images = np.zeros(s, np.int64)  # images in at least one kept pair
        self.rng = random.Random(self.seed)
        self.candidates: list[dict[str, Any]] = []

    def add(self, sim: np.ndarray, images: Sequence[bytes], page_id: str) -> None:
        n = sim.shape[0]
        self.pages += 1
        self.images += n
        if n < 2:
            self.pages_without_pairs += 1
            return
        iu, ju = np.triu_indices(n, k=1)
        s = sim[iu, ju].astype(np.float64)
        self.pairs += s.size
        self.sum_sim += float(s.sum())
        bins = np.clip(((s + 1.0) / 2.0 * _FINE_BINS).astype(np.int64), 0, _FINE_BINS - 1)
        self.fine += np.bincount(bins, minlength=_FINE_BINS)
        inside = (s[None, :] >= self.lows[:, None]) & (s[None, :] <= self.highs[:, None])
        self.kept_pairs += inside.sum(axis=1)
        self.kept_pages += inside.any(axis=1)
        member = np.zeros((len(self.lows), n), bool)
        for k in range(len(self.lows)):
            member[k, iu[inside[k]]] = True
            member[k, ju[inside[k]]] = True
        self.kept_images += member.sum(axis=1)
        # Reservoir sample of pages (with their images) for the example grid.
        entry = {"page_id": page_id, "images": list(images), "sim": sim}
        if len(self.candidates) < _GRID_PAGES:
            self.candidates.append(entry)
        else:
            k = self.rng.randrange(self.pages)
            if k < _GRID_PAGES:
                self.candidates[k] = entry

    def percentile(self, q: float) -> float:
        cum = np.cumsum(self.fine)
        if not cum[-1]:
            return float("nan")
        idx = int(np.searchsorted(cum, q / 100.0 * cum[-1]))
        return round(-1.0 + (idx + 0.5) * 2.0 / _FINE_BINS, 4)


def _settings(low: float, high: float, sweep: bool, sweep_low, sweep_high):
    pairs = [(low, high)]
    if sweep:
        pairs += [(lo, hi) for lo in sweep_low for hi in sweep_high if lo <= hi]
    seen, out = set(), []
    for p in pairs:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


class _EmbedFn:
    """Embeds page images with the config's frozen encoder (for shards without a token cache)."""

    def __init__(self, encoder_config: Any, batch_size: int):
        from semantica_jax import embed_cache  # imports jax: only when needed

        self._encoder = embed_cache.Encoder(encoder_config, batch_size)
        self.size = self._encoder.size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self._encoder.batch_size):
            out.append(self._encoder(images[start : start + self._encoder.batch_size])[1])
        return np.concatenate(out).astype(np.float32)


def _pages(path: str, embed: _EmbedFn | None):
    """(tf.train.Example, pooled [n, D]) per record of `path`, in file order."""
    if embed is None:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            example = tf.train.Example.FromString(record)
            pooled = _pooled_from_record(example)
            if pooled is None:
                raise ValueError(
                    f"{path} has no cached 'pooled' embeddings (not an embed_cache shard): pass "
                    "--config so the frozen encoder embeds the images here"
                )
            yield example, pooled
        return
    from semantica_jax import embed_cache

    batch: list[tuple[tf.train.Example, np.ndarray]] = []
    count = 0

    def flush():
        images = np.concatenate([imgs for _, imgs in batch])
        pooled = embed(images)
        out, start = [], 0
        for example, imgs in batch:
            out.append((example, pooled[start : start + len(imgs)]))
            start += len(imgs)
        return out

    for record, images in embed_cache._pages_with_images(path, embed.size).as_numpy_iterator():
        batch.append((tf.train.Example.FromString(record), images))
        count += len(images)
        if count >= 256:
            yield from flush()
            batch, count = [], 0
    if batch:
        yield from flush()


def compute(
    shards: str,
    out_dir: str,
    *,
    low: float = 0.5,
    high: float = 0.95,
    sweep: bool = False,
    sweep_low: Sequence[float] = DEFAULT_SWEEP_LOW,
    sweep_high: Sequence[float] = DEFAULT_SWEEP_HIGH,
    encoder_config: Any = None,
    drop_unpaired: bool = False,
    grid_levels: int = 6,
    grid_pairs: int = 6,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Writes the mirror shards with `pair_sim` and the report into `out_dir`; returns the
    report dict (module docstring). `encoder_config` (``config.encoder``) is needed only for
    shards without cached ``pooled`` embeddings."""
    if not low <= high:
        raise ValueError(f"--low={low} > --high={high}")
    files, names, out_dir = input_pipeline.mirror_sources(shards, out_dir, "--shards")
    inputs = {name: tf.io.gfile.stat(f).length for f, name in zip(files, names)}
    request = {
        "inputs": inputs, "low": low, "high": high, "sweep": bool(sweep),
        "sweep_low": list(sweep_low) if sweep else None,
        "sweep_high": list(sweep_high) if sweep else None, "drop_unpaired": bool(drop_unpaired),
        "encoder": (cached_tokens.cached_tokens_identity(encoder_config)
                    if encoder_config is not None else None),
        "seed": seed,
    }
    previous = _read_json(os.path.join(out_dir, REPORT_JSON))
    if (previous is not None and previous.get("request") == request
            and all(tf.io.gfile.exists(os.path.join(out_dir, n)) for n in names)):
        print(f"[similarity] {out_dir}: up to date (same inputs and settings), nothing to do",
              file=sys.stderr)
        return {**previous, "skipped": True}
    embed = _EmbedFn(encoder_config, batch_size) if encoder_config is not None else None
    settings = _settings(low, high, sweep, sweep_low, sweep_high)
    tally = _Tally(np.array([s[0] for s in settings]), np.array([s[1] for s in settings]), seed=seed)
    dropped_unpaired = 0
    t0 = time.time()
    cache_dirs = set()
    for path, name in zip(files, names):
        src_dir = os.path.dirname(os.path.abspath(path))
        if tf.io.gfile.exists(os.path.join(src_dir, cached_tokens.EMBED_CACHE_STATS)):
            cache_dirs.add(src_dir)
        dst = os.path.join(out_dir, name)
        tmp = dst + ".incomplete"
        with tf.io.TFRecordWriter(tmp) as writer:
            for example, pooled in _pages(path, embed):
                feats = example.features.feature
                images = list(feats["images"].bytes_list.value)
                if len(images) != len(pooled):
                    raise ValueError(f"{path}: a page has {len(images)} images but "
                                     f"{len(pooled)} embeddings")
                sim = cosine_matrix(pooled)
                page_id = feats["page_id"].bytes_list.value[0].decode("utf-8")
                tally.add(sim, images, page_id)
                if drop_unpaired and len(images) >= 2:
                    iu, ju = np.triu_indices(len(images), k=1)
                    s = sim[iu, ju]
                    if not np.any((s >= low) & (s <= high)):
                        dropped_unpaired += 1
                        continue
                if SIM_FEATURE in feats:
                    del feats[SIM_FEATURE]
                feats[SIM_FEATURE].float_list.value.extend(sim.reshape(-1).tolist())
                writer.write(example.SerializeToString())
        tf.io.gfile.rename(tmp, dst, overwrite=True)
        print(f"[similarity] {name}: {tally.pages} pages so far ({time.time() - t0:.1f} s)",
              file=sys.stderr, flush=True)
    if len(cache_dirs) == 1:  # keep cached tokens usable from the mirror shards
        shutil.copy(os.path.join(cache_dirs.pop(), cached_tokens.EMBED_CACHE_STATS),
                    os.path.join(out_dir, cached_tokens.EMBED_CACHE_STATS))
    report = _report(tally, settings, low, high, shards, files, encoder_config, drop_unpaired,
                     dropped_unpaired, time.time() - t0)
    report["request"] = request
    fileio.write_json(os.path.join(out_dir, REPORT_JSON), report)
    _draw_histogram(report, os.path.join(out_dir, HIST_PNG))
    _draw_pairs(tally.candidates, report, os.path.join(out_dir, PAIRS_PNG), grid_levels,
                grid_pairs, seed)
    if sweep:
        with open(os.path.join(out_dir, SWEEP_MD), "w") as f:
            f.write(sweep_table(report) + "\n")
    return {**report, "skipped": False}


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _report(tally: _Tally, settings, low, high, shards, files, encoder_config, drop_unpaired,
            dropped_unpaired, seconds) -> dict[str, Any]:
    def row(k):
        lo, hi = settings[k]
        return {
            "low": lo, "high": hi,
            "kept_pairs": int(tally.kept_pairs[k]),
            "kept_pair_fraction": _frac(tally.kept_pairs[k], tally.pairs),
            "kept_pages": int(tally.kept_pages[k]),
            "kept_page_fraction": _frac(tally.kept_pages[k], tally.pages - tally.pages_without_pairs),
            "kept_images": int(tally.kept_images[k]),
            "kept_image_fraction": _frac(tally.kept_images[k], tally.images),
        }

    hist = tally.fine.reshape(_HIST_BINS, -1).sum(axis=1)
    if encoder_config is not None:
        encoder = cached_tokens.cached_tokens_identity(encoder_config)
    else:
        encoder = "cached pooled embeddings (see embed_cache.json next to the input shards)"
    return {
        "shards": shards,
        "files": [os.path.basename(f) for f in files],
        "encoder": encoder,
        "pages": tally.pages,
        "images": tally.images,
        "pairs": tally.pairs,
        "pages_with_fewer_than_2_images": tally.pages_without_pairs,
        "mean_similarity": round(tally.sum_sim / tally.pairs, 4) if tally.pairs else None,
        "percentiles": {str(q): tally.percentile(q) for q in (1, 5, 10, 25, 50, 75, 90, 95, 99)},
        "thresholds": {"low": low, "high": high},
        "kept": row(0),
        "drop_unpaired": drop_unpaired,
        "dropped_unpaired_pages": dropped_unpaired,
        "histogram": {
            "bin_edges": [round(-1.0 + 2.0 * i / _HIST_BINS, 4) for i in range(_HIST_BINS + 1)],
            "counts": [int(c) for c in hist],
        },
        "sweep": [row(k) for k in range(len(settings))],
        "seconds": round(seconds, 2),
    }


def _frac(a, b) -> float | None:
    return round(float(a) / float(b), 4) if b else None


def sweep_table(report: dict[str, Any]) -> str:
    """Markdown table of the sweep rows (kept pages / pairs / images per (low, high))."""
    lines = [
        f"Pairs within pages of {report['shards']}: {report['pages']} pages, "
        f"{report['pairs']} pairs (unordered), mean similarity {report['mean_similarity']}.",
        "",
        "| low | high | kept pages | pages % | kept pairs | pairs % | images in kept pairs % |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["sweep"]:
        lines.append(
            f"| {r['low']:g} | {r['high']:g} | {r['kept_pages']} | "
            f"{_pct(r['kept_page_fraction'])} | {r['kept_pairs']} | {_pct(r['kept_pair_fraction'])} | "
            f"{_pct(r['kept_image_fraction'])} |"
        )
    return "\n".join(lines)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


# --------------------------------------------------------------------------- pictures (PIL only)


def _draw_histogram(report: dict[str, Any], path: str) -> None:
    from PIL import Image, ImageDraw

    counts = np.array(report["histogram"]["counts"], np.float64)
    edges = np.array(report["histogram"]["bin_edges"])
    nz = np.flatnonzero(counts)
    lo_bin = max(int(nz[0]) - 2, 0) if nz.size else 0
    hi_bin = min(int(nz[-1]) + 3, len(counts)) if nz.size else len(counts)
    counts, edges = counts[lo_bin:hi_bin], edges[lo_bin : hi_bin + 1]
    width, height, margin = 720, 360, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    plot_w, plot_h = width - 2 * margin, height - 2 * margin
    top = counts.max() if counts.size and counts.max() > 0 else 1.0
    bar_w = plot_w / max(len(counts), 1)

    def x_of(value):
        return margin + (value - edges[0]) / (edges[-1] - edges[0]) * plot_w

    lo, hi = report["thresholds"]["low"], report["thresholds"]["high"]
    for i, c in enumerate(counts):
        inside = edges[i] >= lo and edges[i + 1] <= hi
        h = c / top * plot_h
        d.rectangle([margin + i * bar_w, height - margin - h, margin + (i + 1) * bar_w - 1,
                     height - margin], fill=(70, 110, 200) if inside else (170, 170, 170))
    d.line([margin, height - margin, width - margin, height - margin], fill="black")
    d.line([margin, margin, margin, height - margin], fill="black")
    for value in np.linspace(edges[0], edges[-1], 6):
        d.text((x_of(value) - 12, height - margin + 5), f"{value:.2f}", fill="black")
    for value, name in ((lo, "low"), (hi, "high")):
        if edges[0] <= value <= edges[-1]:
            d.line([x_of(value), margin, x_of(value), height - margin], fill=(200, 30, 30), width=2)
            d.text((x_of(value) + 3, margin), f"{name}={value:g}", fill=(200, 30, 30))
    k = report["kept"]
    d.text((margin, 10), f"within-page pair cosine similarity: {report['pairs']} pairs, "
           f"{report['pages']} pages; kept [{lo:g}, {hi:g}]: {_pct(k['kept_pair_fraction'])}% pairs, "
           f"{_pct(k['kept_page_fraction'])}% pages", fill="black")
    d.text((margin, 25), f"max bin {int(top)} pairs; blue = kept", fill="black")
    img.save(path)


def _decode_for_grid(data: bytes, size: int):
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:  # noqa: BLE001 - a broken image just leaves a grey tile
        return Image.new("RGB", (size, size), (128, 128, 128))
    return image.resize((size, size), Image.Resampling.BICUBIC)


def _draw_pairs(candidates, report, path, levels, pairs_per_level, seed, tile=64) -> None:
    """One row per similarity level: `pairs_per_level` (cond | target) pairs closest to it."""
    from PIL import Image, ImageDraw

    pool = []
    for c_idx, c in enumerate(candidates):
        n = c["sim"].shape[0]
        for i in range(n):
            for j in range(i + 1, n):
                pool.append((float(c["sim"][i, j]), c_idx, i, j))
    if not pool:
        Image.new("RGB", (tile, tile), "white").save(path)
        return
    sims = np.array([p[0] for p in pool])
    lo, hi = np.percentile(sims, 1), np.max(sims)
    targets = np.linspace(lo, hi, levels)
    rng = np.random.default_rng(seed)
    label_w, gap = 90, 8
    width = label_w + pairs_per_level * (2 * tile + gap)
    img = Image.new("RGB", (width, levels * (tile + gap)), "white")
    d = ImageDraw.Draw(img)
    used: set[int] = set()
    for r, level in enumerate(targets):
        order = np.argsort(np.abs(sims - level) + rng.uniform(0, 1e-6, sims.size))
        chosen = [k for k in order if k not in used][:pairs_per_level]
        used.update(chosen)
        y = r * (tile + gap)
        d.text((4, y + tile // 2 - 12), f"s~{level:.2f}", fill="black")
        if chosen:
            d.text((4, y + tile // 2 + 2), f"[{sims[chosen].min():.2f},{sims[chosen].max():.2f}]",
                   fill=(90, 90, 90))
        for col, k in enumerate(chosen):
            _, c_idx, i, j = pool[k]
            images = candidates[c_idx]["images"]
            x = label_w + col * (2 * tile + gap)
            img.paste(_decode_for_grid(images[i], tile), (x, y))
            img.paste(_decode_for_grid(images[j], tile), (x + tile, y))
    img.save(path)


# --------------------------------------------------------------------------- command line


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated floats, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semantica_jax.similarity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="glob(s) of page shards (comma-separated)")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--config", default=None,
                        help="experiment config (path[:variant]) whose frozen encoder embeds "
                        "shards without cached pooled embeddings")
    parser.add_argument("--low", type=float, default=0.5)
    parser.add_argument("--high", type=float, default=0.95)
    parser.add_argument("--sweep", action="store_true", help="tabulate every (low, high) setting")
    parser.add_argument("--sweep_low", type=_floats, default=list(DEFAULT_SWEEP_LOW))
    parser.add_argument("--sweep_high", type=_floats, default=list(DEFAULT_SWEEP_HIGH))
    parser.add_argument("--drop_unpaired", action="store_true",
                        help="drop pages without a pair in [low, high] from the output")
    parser.add_argument("--grid_levels", type=int, default=6)
    parser.add_argument("--grid_pairs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args(argv)
    encoder_config = None
    try:
        if args.config:
            encoder_config = config_lib.load_config_file(args.config).encoder
        report = compute(
            args.shards, args.out_dir, low=args.low, high=args.high, sweep=args.sweep,
            sweep_low=args.sweep_low, sweep_high=args.sweep_high, encoder_config=encoder_config,
            drop_unpaired=args.drop_unpaired, grid_levels=args.grid_levels,
            grid_pairs=args.grid_pairs, seed=args.seed, batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"similarity: error: {e}", file=sys.stderr)
        return 2
    k = report["kept"]
    print(f"{report['pages']} pages, {report['images']} images, {report['pairs']} pairs; "
          f"similarity percentiles {report['percentiles']}")
    print(f"kept at [{args.low:g}, {args.high:g}]: {_pct(k['kept_pair_fraction'])}% of pairs, "
          f"{_pct(k['kept_page_fraction'])}% of pages, {_pct(k['kept_image_fraction'])}% of images")
    if args.sweep:
        print(sweep_table(report))
    print(f"report: {os.path.join(args.out_dir, REPORT_JSON)}, {HIST_PNG}, {PAIRS_PNG}"
          + (f", {SWEEP_MD}" if args.sweep else ""))
    print(f"train with: --config.data.train_files='{args.out_dir}/<same names>' "
          f"--config.data.pair_filter=similarity --config.data.sim_low={args.low:g} "
          f"--config.data.sim_high={args.high:g}")
    return 0


def run() -> None:
    """Console-script entry (`semantica-similarity`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
