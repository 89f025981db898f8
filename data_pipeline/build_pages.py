r"""Page-shard builder on Apache Beam: page-grouped images in, WebLI-style page shards out.

One pipeline, any Beam runner: the DirectRunner on a laptop (in-process by default, or
``--direct_num_workers=N --direct_running_mode=multi_processing``), Dataflow, Flink or Spark with
the standard Beam options, passed through unchanged (docs/DATA.md has the command lines)::

  python -m data_pipeline.build_pages --source=manifest --input='crawl/pages-*.jsonl' \
      --out_dir=data/crawl_pages --num_shards=64 --prefix=train
  python -m data_pipeline.build_pages --source=dirtree --input=photos/ --out_dir=OUT --num_shards=8
  python -m data_pipeline.build_pages --source=imagefolder --input=imagenet/train \
      --images_per_page=5 --out_dir=OUT --num_shards=64
  python -m data_pipeline.build_pages --source=tfds --input=~/tensorflow_datasets/cifar10/3.0.2 \
      --split=train --out_dir=OUT --num_shards=8 --min_side=0

Sources
  manifest     JSONL (one JSON object a line) or Parquet (``.parquet``), one page per row:
               ``page_url`` (str), ``images`` (list of image paths: local, or any Beam filesystem
               such as gs://; relative paths are resolved against the manifest's directory),
               optional ``alt_texts`` (list of str, one per image), ``page_id`` (default: a hash
               of the URL, else of the row) and ``label`` (int >= 0). Rows that are not JSON
               objects, lack ``images`` or have mismatched ``alt_texts`` are skipped and counted
               (``bad_manifest_row``, the warning names the file); a repeated ``page_id`` keeps
               the first row (by hash order) and counts ``duplicate_page_id``. A pattern that
               matches nothing, or only empty files, is rejected up front naming it.
  dirtree      one folder per page: every directory that directly holds files is a page
               (page_id = its path relative to the root); ``X.txt`` next to image ``X`` is its
               alt text, ``page_url.txt`` the page URL; other files are candidate images.
  imagefolder  label-grouped: ``root/<class>/**/<image>``, classes sorted by name -> label ids;
  tfds         a TFDS builder directory already on disk (``tfds.builder_from_directory``), its
               first Image feature and first ClassLabel feature (or ``--image_key/--label_key``).
               Label-grouped sources cut each class's images (seeded shuffle) into pages of
               ``--images_per_page``; a last page keeps >= 2 leftovers, a single leftover is
               counted in ``unused_images``. Their page lists are made by the launcher (cheap
               references: paths, indices; tfds carries the encoded bytes),
               so for very large label-grouped sources write a manifest instead.

Per image (`data_pipeline.image_rules`): guarded read, decompression-bomb check before decoding,
decode + validate, RGB conversion (grey, CMYK, alpha over white), ``--min_side`` rejection,
``--max_side`` downscaling, JPEG (``--image_format=png`` for lossless) re-encoding, exact
duplicates within a page removed. Pages left with fewer than ``--min_images`` (default 2) valid
images are dropped. Every drop is counted by reason.

Output
  ``{prefix}-{i:05d}-of-{N:05d}.tfrecord``, i < N, the page format of `data_pipeline.shards`,
  every file written even when empty, under a temporary name until complete; shards of an
  earlier build of the same prefix with another N are removed first. N must be a multiple of
  the number of training hosts (each reads ``N / hosts`` files); pick N = a multiple of the
  largest host count you will train on, with shards of ~100 MB-1 GB. Pages are assigned to
  shards deterministically (label-grouped/dirtree sources: round-robin over a seeded page
  order, exactly balanced; manifests: SHA-1 of page_id mod N, balanced to ~1/sqrt(pages/N)) and
  sorted inside a shard, so a rebuild of the same input writes the same files.
  ``{prefix}-stats.json``: pages and images in/written, drops per reason, source modes (grey,
  CMYK, ...), downscaled count, bytes, pages per shard, seconds and images/s.
  Progress: every worker prints a line to stderr every ``--progress_seconds`` (pages, images,
  drops, images/s); on Dataflow the same numbers are Beam counters (namespace ``build_pages``).

Workers never import TensorFlow (`data_pipeline.records` writes the records): worker start-up is
~1 s, so the DirectRunner's multi_processing mode pays off as soon as image work dominates.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipeline import image_rules, records, shard_format
from data_pipeline.sources import (Source, dirtree_source, imagefolder_source, manifest_source,
                                   parse_manifest_row, tfds_source)

logger = logging.getLogger(__name__)

SOURCES = ("manifest", "dirtree", "imagefolder", "tfds")
PAGE_DROP_REASONS = ("too_few_images", "bad_manifest_row", "duplicate_page_id")
_STATS_TAG = "stats"
_METRICS_NAMESPACE = "build_pages"


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") >> 1


# =========================================================================== Beam transforms


class _Progress:
    """Per-worker-process progress line on stderr, at most every `every` seconds."""

    def __init__(self, every: float, label: str):
        self.every, self.label = every, label
        self.start = self.last = time.time()
        self.counts = collections.Counter()

    def add(self, **counts: int) -> None:
        self.counts.update(counts)
        now = time.time()
        if self.every and now - self.last >= self.every:
            self.last = now
            self.report()

    def report(self) -> None:
        c = self.counts
        rate = c["images_in"] / max(time.time() - self.start, 1e-9)
        print(f"[build_pages {self.label} pid {os.getpid()}] {c['pages_in']} pages "
              f"({c['pages_written']} kept), {c['images_in']} images ({c['images_written']} kept, "
              f"{c['images_dropped']} dropped), {rate:.0f} images/s", file=sys.stderr, flush=True)


def _parse_jsonl(item: tuple[str, str]) -> Iterable[Any]:
    filename, line = item
    if not line.strip():
        return
    try:
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{filename}: not a JSON line ({e}): {line[:80]!r}") from None
        yield parse_manifest_row(row, filename)
    except (ValueError, TypeError) as e:
        print(f"[build_pages] skipping manifest row: {e}", file=sys.stderr)
        yield beam.pvalue.TaggedOutput(_STATS_TAG, {"page_drop/bad_manifest_row": 1})


def _parse_parquet(row: dict, pattern: str) -> Iterable[Any]:
    try:
        yield parse_manifest_row(row, pattern)
    except (ValueError, TypeError) as e:
        print(f"[build_pages] skipping manifest row: {e}", file=sys.stderr)
        yield beam.pvalue.TaggedOutput(_STATS_TAG, {"page_drop/bad_manifest_row": 1})


def _first_of_duplicates(item: tuple[str, Iterable[dict]]) -> Iterable[Any]:
    page_id, pages = item
    pages = sorted(pages, key=lambda p: json.dumps(p, sort_keys=True, default=str))
    if len(pages) > 1:
        print(f"[build_pages] page_id {page_id!r} appears {len(pages)} times; keeping one",
              file=sys.stderr)
        yield beam.pvalue.TaggedOutput(_STATS_TAG, {"page_drop/duplicate_page_id": len(pages) - 1})
    yield pages[0]


class _ProcessPage(beam.DoFn):
    """Raw page -> (shard, (order_key, serialized Example)); stats dicts on the 'stats' output."""

    def __init__(self, rules: image_rules.ImageRules, min_images: int, num_shards: int,
                 label: str, progress_seconds: float, loader: Callable[[Any], Any] | None):
        self.rules, self.min_images, self.num_shards = rules, min_images, num_shards
        self.label, self.progress_seconds, self.loader = label, progress_seconds, loader

    def setup(self):
        self.progress = _Progress(self.progress_seconds, self.label)
        self.counters = {
            k: beam.metrics.Metrics.counter(_METRICS_NAMESPACE, f"{self.label}/{k}")
            for k in ("pages_in", "pages_written", "images_in", "images_written")
        }

    def teardown(self):
        if getattr(self, "progress", None) and self.progress.counts["pages_in"]:
            self.progress.report()

    def process(self, page: dict[str, Any]):
        stats: collections.Counter = collections.Counter(pages_in=1)
        kept, alts, digests = [], [], set()
        page_alts = page.get("alt_texts")
        for i, ref in enumerate(page["images"]):
            stats["images_in"] += 1
            if self.loader is not None and not isinstance(ref, (str, bytes, np.ndarray)):
                ref = self.loader(ref)
            try:
                image = image_rules.process_image(ref, self.rules)
            except image_rules.ImageRejected as e:
                stats[f"image_drop/{e.reason}"] += 1
                print(f"[build_pages] page {page['page_id']!r}: image skipped ({e.reason}): {e}",
                      file=sys.stderr)
                continue
            if image.digest in digests:
                stats["image_drop/duplicate"] += 1
                continue
            digests.add(image.digest)
            stats[f"source_mode/{image.source_mode}"] += 1
            kept.append(image.data)
            stats["image_bytes"] += len(image.data)
            if page_alts is not None:
                alts.append(page_alts[i])
        dropped = stats["images_in"] - len(kept)
        self.counters["pages_in"].inc()
        self.counters["images_in"].inc(stats["images_in"])
        if len(kept) < self.min_images:
            stats["page_drop/too_few_images"] += 1
            stats["images_in_dropped_pages"] += len(kept)
            self.progress.add(pages_in=1, images_in=stats["images_in"], images_dropped=dropped)
            yield beam.pvalue.TaggedOutput(_STATS_TAG, dict(stats))
            return
        stats["pages_written"] = 1
        stats["images_written"] = len(kept)
        self.counters["pages_written"].inc()
        self.counters["images_written"].inc(len(kept))
        self.progress.add(pages_in=1, pages_written=1, images_in=stats["images_in"],
                          images_written=len(kept), images_dropped=dropped)
        features = {
            "page_id": ("bytes", [page["page_id"]]),
            "page_url": ("bytes", [page.get("page_url") or ""]),
            "images": ("bytes", kept),
        }
        if page_alts is not None:
            features["alt_texts"] = ("bytes", alts)
        if page.get("label") is not None:
            features["label"] = ("int64", [int(page["label"])])
        record = records.encode_example(features)
        order_key = page.get("order_key")
        if order_key is None:
            order_key = _hash64(page["page_id"])
        shard = page.get("shard")
        if shard is None:
            shard = order_key % self.num_shards
        yield beam.pvalue.TaggedOutput(_STATS_TAG, dict(stats))
        yield int(shard), (int(order_key), record)


class _WriteShard(beam.DoFn):
    """(shard, {'pages': [(order_key, record)], 'index': [...]}) -> the shard file; stats."""

    def __init__(self, out_dir: str, prefix: str, num_shards: int):
        self.out_dir, self.prefix, self.num_shards = out_dir, prefix, num_shards

    def process(self, item):
        shard, groups = item
        pages = sorted(groups["pages"], key=lambda kv: kv[0])
        path = FileSystems.join(self.out_dir, shard_format.shard_filename(self.prefix, shard, self.num_shards))
        tmp = path + ".incomplete"
        with records.TFRecordWriter(tmp) as writer:
            for _, record in pages:
                writer.write(record)
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([tmp], [path])
        yield {f"shard_pages/{shard}": len(pages), f"shard_bytes/{shard}": writer.bytes_written,
               "file_bytes": writer.bytes_written}


class _SumDicts(beam.CombineFn):
    def create_accumulator(self):
        return collections.Counter()

    def add_input(self, acc, element):
        acc.update(element)
        return acc

    def merge_accumulators(self, accs):
        out = collections.Counter()
        for a in accs:
            out.update(a)
        return out

    def extract_output(self, acc):
        return dict(acc)


def _write_json(stats: dict, path: str) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(stats, sort_keys=True).encode("utf-8"))


@dataclasses.dataclass
class SplitSpec:
    """One output split: its source, file prefix and shard count."""

    source: Source
    prefix: str
    num_shards: int


def _expand_split(p: beam.Pipeline, spec: SplitSpec, out_dir: str,
                  rules: image_rules.ImageRules, min_images: int, progress_seconds: float):
    label = spec.prefix
    stats_parts = []
    src = spec.source
    if src.pages is not None:
        pages = p | f"{label}/Create" >> beam.Create(src.pages, reshuffle=True)
    elif src.info.get("format") == "parquet":
        rows = p | f"{label}/ReadParquet" >> beam.io.ReadFromParquet(src.manifest)
        parsed = rows | f"{label}/Parse" >> beam.FlatMap(_parse_parquet, src.manifest).with_outputs(
            _STATS_TAG, main="pages")
        stats_parts.append(parsed[_STATS_TAG])
        pages = parsed.pages
    else:
        lines = p | f"{label}/ReadJsonl" >> beam.io.ReadFromTextWithFilename(src.manifest)
        parsed = lines | f"{label}/Parse" >> beam.FlatMap(_parse_jsonl).with_outputs(
            _STATS_TAG, main="pages")
        stats_parts.append(parsed[_STATS_TAG])
        pages = parsed.pages
    if src.pages is None:  # manifests may repeat a page
        deduped = (
            pages
            | f"{label}/KeyById" >> beam.Map(lambda page: (page["page_id"], page))
            | f"{label}/GroupById" >> beam.GroupByKey()
            | f"{label}/FirstOfDuplicates" >> beam.FlatMap(_first_of_duplicates).with_outputs(
                _STATS_TAG, main="pages")
        )
        stats_parts.append(deduped[_STATS_TAG])
        pages = deduped.pages
    processed = pages | f"{label}/Process" >> beam.ParDo(
        _ProcessPage(rules, min_images, spec.num_shards, label, progress_seconds, src.loader)
    ).with_outputs(_STATS_TAG, main="records")
    stats_parts.append(processed[_STATS_TAG])
    indices = p | f"{label}/ShardIndices" >> beam.Create(
        [(i, None) for i in range(spec.num_shards)])
    written = (
        {"pages": processed.records, "index": indices}
        | f"{label}/GroupByShard" >> beam.CoGroupByKey()
        | f"{label}/WriteShards" >> beam.ParDo(_WriteShard(out_dir, spec.prefix, spec.num_shards))
    )
    stats_parts.append(written)
    partial = FileSystems.join(out_dir, shard_format.stats_filename(spec.prefix) + ".partial")
    _ = (
        tuple(stats_parts)
        | f"{label}/FlattenStats" >> beam.Flatten()
        | f"{label}/SumStats" >> beam.CombineGlobally(_SumDicts())
        | f"{label}/WriteStats" >> beam.Map(_write_json, partial)
    )
    return partial


def _local_runner(options: PipelineOptions):
    """The FnApiRunner for an unset/``DirectRunner`` runner, else None (Beam picks the runner).

    Beam 2.77's DirectRunner first tries the Prism runner, which downloads a Go binary from
    GitHub at run time (and falls back after a network timeout offline); this builder goes
    straight to the in-process FnApiRunner the DirectRunner would fall back to. It honours
    ``--direct_num_workers`` and ``--direct_running_mode`` (in_memory | multi_threading |
    multi_processing). ``--runner=PrismRunner`` still selects Prism explicitly.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    if runner not in (None, "DirectRunner", "direct", "FnApiRunner"):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def _remove_stale(out_dir: str, prefix: str, num_shards: int) -> None:
    pattern = shard_format.shard_pattern(out_dir, prefix) + "*"
    keep = {FileSystems.join(out_dir, shard_format.shard_filename(prefix, i, num_shards))
            for i in range(num_shards)}
    stale = [m.path for m in FileSystems.match([pattern])[0].metadata_list if m.path not in keep]
    if stale:
        logger.info("removing %d shard files of an earlier build of %r", len(stale), prefix)
        FileSystems.delete(stale)


def _structure_stats(flat: dict[str, int], spec: SplitSpec, out_dir: str, seconds: float,
                     params: dict[str, Any]) -> dict[str, Any]:
    def group(prefix):
        return {k.split("/", 1)[1]: v for k, v in sorted(flat.items()) if k.startswith(prefix + "/")}

    n = spec.num_shards
    shard_pages = group("shard_pages")
    shard_bytes = group("shard_bytes")
    images_in = flat.get("images_in", 0)
    info = {k: v for k, v in spec.source.info.items() if k != "empty_files" or v}
    return {
        "prefix": spec.prefix,
        "source": spec.source.kind,
        "source_info": info,
        "out_dir": out_dir,
        "num_shards": n,
        "files": [shard_format.shard_filename(spec.prefix, i, n) for i in range(n)],
        "pages": {
            "in": flat.get("pages_in", 0) + flat.get("page_drop/bad_manifest_row", 0)
            + flat.get("page_drop/duplicate_page_id", 0),
            "written": flat.get("pages_written", 0),
            "dropped": {r: flat.get(f"page_drop/{r}", 0) for r in PAGE_DROP_REASONS},
        },
        "images": {
            "in": images_in,
            "written": flat.get("images_written", 0),
            "dropped": {r: flat.get(f"image_drop/{r}", 0) for r in image_rules.IMAGE_DROP_REASONS},
            "valid_in_dropped_pages": flat.get("images_in_dropped_pages", 0),
            "source_modes": group("source_mode"),
        },
        "bytes": {"images": flat.get("image_bytes", 0), "files": flat.get("file_bytes", 0)},
        "pages_per_shard": [shard_pages.get(str(i), 0) for i in range(n)],
        "bytes_per_shard": [shard_bytes.get(str(i), 0) for i in range(n)],
        "seconds": round(seconds, 3),
        "images_per_second": round(images_in / seconds, 1) if seconds else None,
        "params": params,
    }


def run_build(
    splits: Sequence[SplitSpec],
    out_dir: str,
    *,
    rules: image_rules.ImageRules = image_rules.ImageRules(),
    min_images: int = 2,
    pipeline_args: Sequence[str] = (),
    progress_seconds: float = 10.0,
    params: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs one Beam pipeline writing every split; returns {prefix: stats} (also written as
    ``{prefix}-stats.json`` in `out_dir`)."""
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images}")
    prefixes = [s.prefix for s in splits]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"duplicate prefixes {prefixes}")
    for s in splits:
        if not isinstance(s.num_shards, int) or s.num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {s.num_shards!r}")
        if s.source.pages is not None:  # round-robin over the launcher's (seeded) page order
            for pos, page in enumerate(s.source.pages):
                page.setdefault("order_key", pos)
                page.setdefault("shard", pos % s.num_shards)
    out_dir = os.path.expanduser(out_dir)
    if "://" not in out_dir:
        out_dir = os.path.abspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
    for s in splits:
        _remove_stale(out_dir, s.prefix, s.num_shards)
    params = dict(params or {})
    params.update(rules=dataclasses.asdict(rules), min_images=min_images)
    options = PipelineOptions(list(pipeline_args))
    t0 = time.time()
    p = beam.Pipeline(runner=_local_runner(options), options=options)
    partials = [_expand_split(p, s, out_dir, rules, min_images, progress_seconds) for s in splits]
    p.run().wait_until_finish()
    seconds = time.time() - t0
    out = {}
    for s, partial in zip(splits, partials):
        with FileSystems.open(partial) as f:
            flat = json.loads(f.read().decode("utf-8"))
        FileSystems.delete([partial])
        stats = _structure_stats(flat, s, out_dir, seconds, params)
        _write_json_pretty(stats, FileSystems.join(out_dir, shard_format.stats_filename(s.prefix)))
        out[s.prefix] = stats
    return out


def _write_json_pretty(stats: dict, path: str) -> None:
    tmp = path + ".incomplete"
    with FileSystems.create(tmp) as f:
        f.write((json.dumps(stats, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


# =========================================================================== command line


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.build_pages",
        description="Build WebLI-style page shards with Apache Beam. Unknown flags are Beam "
        "pipeline options (--runner, --direct_num_workers, --direct_running_mode, Dataflow ...).",
    )
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--input", default="", help="manifest pattern / root directory / TFDS "
                        "builder dir")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--num_shards", type=int, default=8,
                        help="a multiple of the number of training hosts")
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--split", default="train",
                        help="tfds split")
    parser.add_argument("--images_per_page", type=int, default=5, help="label-grouped sources")
    parser.add_argument("--classes", type=_parse_ints, default=None,
                        help="label-grouped sources: comma-separated class ids to keep")
    parser.add_argument("--image_key", default=None, help="tfds: image feature")
    parser.add_argument("--label_key", default=None, help="tfds: label feature")
    parser.add_argument("--seed", type=int, default=0)
    d = image_rules.ImageRules()
    # Unset rules take ImageRules' defaults.
    parser.add_argument("--min_side", type=int, default=None, help=f"default {d.min_side}")
    parser.add_argument("--max_side", type=int, default=None, help=f"default {d.max_side}")
    parser.add_argument("--max_pixels", type=int, default=None, help=f"default {d.max_pixels}")
    parser.add_argument("--max_file_bytes", type=int, default=None,
                        help=f"default {d.max_file_bytes}")
    parser.add_argument("--image_format", choices=("jpeg", "png"), default=None,
                        help=f"default {d.image_format}")
    parser.add_argument("--jpeg_quality", type=int, default=None, help=f"default {d.jpeg_quality}")
    parser.add_argument("--min_images", type=int, default=2,
                        help="pages with fewer valid images are dropped")
    parser.add_argument("--progress_seconds", type=float, default=10.0)
    return parser


def make_source(args: argparse.Namespace) -> Source:
    if args.source == "manifest":
        if not args.input:
            raise ValueError("--source=manifest needs --input=PATTERN")
        return manifest_source(args.input)
    if args.source == "dirtree":
        return dirtree_source(args.input)
    if args.source == "imagefolder":
        return imagefolder_source(args.input, images_per_page=args.images_per_page,
                                  seed=args.seed, classes=args.classes)
    if args.source == "tfds":
        return tfds_source(args.input, split=args.split, images_per_page=args.images_per_page,
                           seed=args.seed, image_key=args.image_key, label_key=args.label_key,
                           classes=args.classes)
    raise ValueError(f"--source={args.source!r}; expected one of {SOURCES}")


def main(argv: Sequence[str] | None = None) -> int:
    args, beam_args = make_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rules = dataclasses.asdict(image_rules.ImageRules())
        for key in rules:
            if getattr(args, key) is not None:
                rules[key] = getattr(args, key)
        rules = image_rules.ImageRules(**rules)
        source = make_source(args)
        print(f"[build_pages] {args.source}: "
              + (f"{len(source.pages)} pages listed" if source.pages is not None
                 else f"{source.info['files']} manifest file(s)")
              + f" -> {args.out_dir}/{args.prefix}-*-of-{args.num_shards:05d}.tfrecord",
              file=sys.stderr)
        result = run_build(
            [SplitSpec(source, args.prefix, args.num_shards)], args.out_dir, rules=rules,
            min_images=args.min_images, pipeline_args=beam_args,
            progress_seconds=args.progress_seconds,
            params={"source": args.source, "input": args.input, "seed": args.seed,
                    "images_per_page": args.images_per_page, "classes": args.classes},
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"build_pages: error: {e}", file=sys.stderr)
        return 2
    stats = result[args.prefix]
    drops = {k: v for k, v in {**stats["pages"]["dropped"], **stats["images"]["dropped"]}.items() if v}
    print(f"{stats['pages']['written']} pages / {stats['images']['written']} images written "
          f"into {stats['num_shards']} shards ({stats['bytes']['files'] / 1e6:.1f} MB) in "
          f"{stats['seconds']:.1f} s ({stats['images_per_second']} images/s); drops: {drops or 'none'}")
    print(f"stats: {os.path.join(args.out_dir, shard_format.stats_filename(args.prefix))}")
    print(f"config.data.train_files={shard_format.shard_pattern(args.out_dir, args.prefix, args.num_shards)}")
    if not stats["pages"]["written"]:
        print("build_pages: error: no valid page was written (see the drops above)",
              file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry (`semantica-build-pages`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
