"""Where a split's raw pages come from: the page builder's sources (TensorFlow-free).

Each function returns a `Source` for `data_pipeline.build_pages.run_build`:

  manifest_source     JSONL / Parquet manifests, one page per row (read by the Beam workers)
  dirtree_source      one folder per page
  imagefolder_source  label-grouped ``root/<class>/**/<image>``
  tfds_source         a TFDS builder directory already on disk
  label_grouped_pages the page lists of label-grouped sources (also used by
                      `data_pipeline.fashion_mnist`)

The formats and rules are described in `data_pipeline.build_pages`' module docstring and
docs/DATA.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

_SIDECAR_SUFFIXES = (".txt", ".json")


@dataclasses.dataclass
class Source:
    """Where one split's raw pages come from.

    Exactly one of `pages` (a list of page dicts made by the launcher: label-grouped sources,
    dirtree) or `manifest` (a JSONL/Parquet file pattern read by the workers) is set. A raw page
    dict has ``page_id``, ``page_url``, ``images`` (refs: paths, bytes or uint8 arrays),
    ``alt_texts`` (list or None), ``label`` (int or None), ``order_key`` (int, the sort key
    inside its shard) and ``shard`` (int or None = hash of page_id).
    """

    kind: str
    pages: list[dict[str, Any]] | None = None
    manifest: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Resolves image refs that are neither paths, bytes nor arrays (e.g. an int index into a
    # dataset file) inside the workers, so the pipeline graph carries only small references.
    loader: Callable[[Any], Any] | None = None


def label_grouped_pages(
    refs: Sequence[Any],
    labels: Sequence[int] | np.ndarray,
    *,
    id_prefix: str,
    images_per_page: int,
    seed: int = 0,
    split_key: int = 0,
    num_classes: int | None = None,
    classes: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Cuts each class's images (seeded shuffle, keyed by (seed, split_key, class)) into pages
    of `images_per_page`; returns (pages in a seeded order, unused leftover images).

    Page ids are ``{id_prefix}-c{label}-{n:06d}``; ``shard`` is set later (position mod N).
    """
    if images_per_page < 2:
        raise ValueError(f"images_per_page must be >= 2 (pages need pairs), got {images_per_page}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(refs):
        raise ValueError(f"{len(refs)} images but {len(labels)} labels")
    present = sorted(int(c) for c in np.unique(labels))
    num_classes = num_classes if num_classes is not None else (present[-1] + 1 if present else 0)
    wanted = present if classes is None else sorted(set(int(c) for c in classes))
    pages: list[dict[str, Any]] = []
    unused = 0
    for c in wanted:
        rng = np.random.default_rng([seed, split_key, c])
        members = rng.permutation(np.flatnonzero(labels == c))
        for p, start in enumerate(range(0, len(members), images_per_page)):
            chunk = members[start : start + images_per_page]
            if len(chunk) < 2:
                unused += len(chunk)
                continue
            pages.append(
                {
                    "page_id": f"{id_prefix}-c{c}-{p:06d}",
                    "page_url": "",
                    "images": [refs[i] for i in chunk],
                    "alt_texts": None,
                    "label": int(c),
                }
            )
    order = np.random.default_rng([seed, split_key, num_classes]).permutation(len(pages))
    return [pages[i] for i in order], unused


def _listdir(root: str) -> Iterable[tuple[str, list[str]]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        yield dirpath, sorted(f for f in filenames if not f.startswith("."))


def dirtree_source(root: str) -> Source:
    """One page per directory that directly holds files (module docstring)."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--input={root!r}: no such directory")
    pages = []
    for dirpath, files in _listdir(root):
        images = [f for f in files if not f.endswith(_SIDECAR_SUFFIXES)]
        if not images:
            continue
        rel = os.path.relpath(dirpath, root)
        url = ""
        if "page_url.txt" in files:
            with open(os.path.join(dirpath, "page_url.txt")) as f:
                url = f.read().strip()
        alts = []
        for name in images:
            sidecar = os.path.join(dirpath, os.path.splitext(name)[0] + ".txt")
            alts.append(open(sidecar).read().strip() if os.path.isfile(sidecar) else "")
        pages.append(
            {
                "page_id": rel if rel != "." else os.path.basename(os.path.abspath(root)),
                "page_url": url,
                "images": [os.path.join(dirpath, f) for f in images],
                "alt_texts": alts if any(alts) else None,
                "label": None,
            }
        )
    if not pages:
        raise ValueError(f"--input={root!r}: no directory with files (one folder per page)")
    return Source("dirtree", pages=pages, info={"root": os.path.abspath(root)})


def imagefolder_source(
    root: str, *, images_per_page: int, seed: int = 0, classes: Sequence[int] | None = None
) -> Source:
    """Label-grouped pages from ``root/<class>/**/<image>`` (classes sorted by name)."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--input={root!r}: no such directory")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not names:
        raise ValueError(f"--input={root!r}: no class sub-directories (ImageFolder layout)")
    refs, labels = [], []
    for label, name in enumerate(names):
        for dirpath, files in _listdir(os.path.join(root, name)):
            for f in files:
                if not f.endswith(_SIDECAR_SUFFIXES):
                    refs.append(os.path.join(dirpath, f))
                    labels.append(label)
    pages, unused = label_grouped_pages(
        refs, labels, id_prefix="imagefolder", images_per_page=images_per_page, seed=seed,
        num_classes=len(names), classes=classes,
    )
    return Source("imagefolder", pages=pages,
                  info={"root": os.path.abspath(root), "label_names": names,
                        "unused_images": unused})


def tfds_source(
    builder_dir: str,
    *,
    split: str,
    images_per_page: int,
    seed: int = 0,
    image_key: str | None = None,
    label_key: str | None = None,
    classes: Sequence[int] | None = None,
) -> Source:
    """Label-grouped pages from a TFDS builder directory on disk (no download, no TF in workers:
    the launcher reads the encoded images once)."""
    import tensorflow_datasets as tfds  # launcher only

    builder = tfds.builder_from_directory(os.path.expanduser(builder_dir))
    feats = builder.info.features
    if image_key is None:
        image_key = next((k for k, f in feats.items() if isinstance(f, tfds.features.Image)), None)
    if label_key is None:
        label_key = next(
            (k for k, f in feats.items() if isinstance(f, tfds.features.ClassLabel)), None
        )
    if image_key is None or label_key is None:
        raise ValueError(
            f"{builder_dir}: need an Image and a ClassLabel feature (found {list(feats)}); pass "
            "--image_key/--label_key"
        )
    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()},
                            shuffle_files=False)
    refs, labels = [], []
    for ex in ds.as_numpy_iterator():
        refs.append(bytes(ex[image_key]))
        labels.append(int(ex[label_key]))
    names = list(feats[label_key].names)
    pages, unused = label_grouped_pages(
        refs, labels, id_prefix=f"tfds-{builder.name}-{split}", images_per_page=images_per_page,
        seed=seed, num_classes=len(names), classes=classes,
    )
    return Source("tfds", pages=pages,
                  info={"builder_dir": os.path.abspath(os.path.expanduser(builder_dir)),
                        "split": split, "image_key": image_key, "label_key": label_key,
                        "label_names": names, "unused_images": unused})


def manifest_source(pattern: str) -> Source:
    """A JSONL / Parquet manifest pattern, checked up front (module docstring)."""
    from apache_beam.io.filesystems import FileSystems  # Beam (~1 s) only where a manifest is read

    result = FileSystems.match([os.path.expanduser(pattern)])[0]
    files = sorted(m.path for m in result.metadata_list)
    if not files:
        raise FileNotFoundError(f"manifest {pattern!r}: no file matches")
    sizes = {m.path: m.size_in_bytes for m in result.metadata_list}
    if all(sizes[f] == 0 for f in files):
        raise ValueError(f"manifest {pattern!r} is empty ({', '.join(files[:5])}: 0 bytes, no pages)")
    kinds = {"parquet" if f.endswith(".parquet") else "jsonl" for f in files}
    if len(kinds) > 1:
        raise ValueError(f"manifest {pattern!r} mixes Parquet and JSONL files")
    return Source("manifest", manifest=os.path.expanduser(pattern),
                  info={"pattern": pattern, "files": len(files), "format": kinds.pop(),
                        "empty_files": [f for f in files if sizes[f] == 0]})


def parse_manifest_row(row: Any, origin: str) -> dict[str, Any]:
    """One manifest row -> raw page dict; raises ValueError (message names `origin`)."""
    if not isinstance(row, dict):
        raise ValueError(f"{origin}: row is not a JSON object")
    images = row.get("images", row.get("image_paths"))
    if images is None or isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
        raise ValueError(f"{origin}: 'images' must be a list of image paths")
    images = [str(x) for x in images]
    base = os.path.dirname(origin.split(":", 1)[0]) if "://" not in origin else ""
    images = [p if "://" in p or os.path.isabs(p) or not base else os.path.join(base, p)
              for p in images]
    alts = row.get("alt_texts")
    if alts is not None:
        alts = ["" if a is None else str(a) for a in alts]
        if len(alts) != len(images):
            raise ValueError(f"{origin}: {len(alts)} alt_texts for {len(images)} images")
    url = row.get("page_url") or ""
    page_id = row.get("page_id") or ""
    if not page_id:
        page_id = "url-" + hashlib.sha1(url.encode()).hexdigest()[:20] if url else (
            "row-" + hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:20])
    label = row.get("label")
    if label is not None:
        if isinstance(label, bool) or int(label) != label or int(label) < 0:
            raise ValueError(f"{origin}: label must be an int >= 0, got {label!r}")
        label = int(label)
    return {"page_id": str(page_id), "page_url": str(url), "images": images, "alt_texts": alts,
            "label": label}
