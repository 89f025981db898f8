"""The Beam page builder (data_pipeline.build_pages) on real files with every kind of bad input.

One DirectRunner pipeline (module fixture) builds four splits at once: a JSONL manifest full of
broken, odd and duplicate inputs, the same rows as Parquet, a directory tree and an ImageFolder
tree; the tests check the shards and the per-reason counts of that single run.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipeline import build_pages, fashion_mnist, image_rules, records, shards, sources

RULES = image_rules.ImageRules(min_side=16, max_side=128, max_pixels=1_000_000, jpeg_quality=90)


# --------------------------------------------------------------------------- files on disk


def _photo(seed: int, w: int = 48, h: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1)
    return np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(img: Image.Image, path, **kw) -> str:
    img.save(path, **kw)
    return str(path)


def _png_with_declared_size(path, width: int, height: int) -> str:
    """A valid 4x4 PNG whose IHDR claims width x height (the CRC is fixed up)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(bytes(data))
    return str(path)


def make_images(d) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    p = {}
    for k in range(12):
        p[f"good{k}"] = _save(Image.fromarray(_photo(k)), d / f"good{k}.jpg", quality=92)
    p["good6_copy"] = str(d / "good6_copy.jpg")
    shutil.copy(p["good6"], p["good6_copy"])
    p["grey"] = _save(Image.fromarray(_photo(20)[..., 0]), d / "grey.png")
    p["cmyk"] = _save(Image.fromarray(np.concatenate([_photo(21), _photo(22)[..., :1]], -1),
                                      mode="CMYK"), d / "cmyk.jpg", quality=90)
    rgba = np.concatenate([_photo(23), np.full((40, 48, 1), 128, np.uint8)], -1)
    p["rgba"] = _save(Image.fromarray(rgba, mode="RGBA"), d / "rgba.png")
    p["i16"] = _save(Image.fromarray((_photo(24)[..., 0].astype(np.uint16) * 257)), d / "i16.png")
    pal = Image.fromarray(_photo(25)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p["palette"] = _save(pal, d / "palette.gif", transparency=0)
    good_bytes = open(p["good0"], "rb").read()
    p["truncated"] = str(d / "truncated.jpg")
    with open(p["truncated"], "wb") as f:
        f.write(good_bytes[: len(good_bytes) // 2])
    p["zero"] = str(d / "zero.jpg")
    open(p["zero"], "wb").close()
    p["notes"] = str(d / "notes.jpg")
    with open(p["notes"], "w") as f:
        f.write("this is not an image\n")
    p["bomb"] = _png_with_declared_size(d / "bomb.png", 100_000, 100_000)  # PIL's own bomb check
    p["big_declared"] = _png_with_declared_size(d / "big_declared.png", 2000, 1000)  # > max_pixels
    p["tiny"] = _save(Image.fromarray(_photo(26, 8, 8)), d / "tiny.png")
    p["big"] = _save(Image.fromarray(_photo(27, 300, 200)), d / "big.jpg", quality=90)
    p["missing"] = str(d / "missing.jpg")
    return p


MANIFEST_ROWS = [
    {"page_url": "https://a.example/good", "images": ["good0", "good1", "good2"],
     "alt_texts": ["a0", "a1", "a2"]},
    {"page_url": "https://a.example/modes", "images": ["grey", "cmyk", "rgba", "i16", "palette"],
     "label": 4},
    {"page_url": "https://a.example/mixed", "images": ["truncated", "good3", "zero", "good4",
                                                        "notes", "bomb", "big_declared",
                                                        "missing", "tiny"]},
    {"page_url": "https://a.example/single", "images": ["good5"]},
    {"page_url": "https://a.example/allbad", "images": ["zero", "notes"]},
    {"page_url": "https://a.example/dup", "images": ["good6", "good6_copy", "good7"]},
    {"page_url": "https://a.example/big", "images": ["big", "good8"], "page_id": "custom-id"},
]


def _rel(row, images_dir="img"):
    return {**row, "images": [f"{images_dir}/{os.path.basename(PATHS[n])}" for n in row["images"]]}


PATHS: dict[str, str] = {}


def write_manifest(root) -> str:
    lines = [json.dumps(_rel(r)) for r in MANIFEST_ROWS]
    lines += [
        "not json at all",
        json.dumps({"page_url": "https://a.example/noimages"}),
        json.dumps({"images": ["img/good9.jpg"], "alt_texts": ["x", "y"]}),
        json.dumps({"page_url": "https://a.example/good", "images": ["img/good9.jpg",
                                                                    "img/good10.jpg"]}),
        "",
    ]
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_parquet(root) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_rel(MANIFEST_ROWS[i]) for i in (0, 1, 6)]
    table = pa.table({
        "page_url": [r["page_url"] for r in rows],
        "images": [r["images"] for r in rows],
        "page_id": [r.get("page_id") for r in rows],
        "label": [r.get("label") for r in rows],
    })
    path = root / "manifest.parquet"
    pq.write_table(table, path)
    return str(path)


def write_tree(root) -> str:
    tree = root / "tree"
    a = tree / "pageA"
    a.mkdir(parents=True)
    Image.fromarray(_photo(30)).save(a / "x.jpg")
    Image.fromarray(_photo(31)).save(a / "y.png")
    (a / "x.txt").write_text("alt of x")
    (a / "page_url.txt").write_text("https://tree.example/a")
    b = tree / "sub" / "pageB"
    b.mkdir(parents=True)
    Image.fromarray(_photo(32)).save(b / "a.png")
    Image.fromarray(_photo(33)).save(b / "b.jpg")
    (b / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    c = tree / "pageC"
    c.mkdir()
    Image.fromarray(_photo(34)).save(c / "only.jpg")
    return str(tree)


def write_imagefolder(root) -> str:
    folder = root / "folder"
    for label, (name, n) in enumerate((("cat", 5), ("dog", 4))):
        (folder / name).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(_photo(100 + 10 * label + k)).save(folder / name / f"{k}.jpg")
    return str(folder)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build_pages")
    PATHS.update(make_images(root / "img"))
    specs = [
        build_pages.SplitSpec(sources.manifest_source(write_manifest(root)), "train", 3),
        build_pages.SplitSpec(sources.manifest_source(write_parquet(root)), "pq", 1),
        build_pages.SplitSpec(sources.dirtree_source(write_tree(root)), "tree", 2),
        build_pages.SplitSpec(sources.imagefolder_source(write_imagefolder(root),
                                                             images_per_page=2), "folder", 2),
    ]
    out = root / "out"
    stats = build_pages.run_build(specs, str(out), rules=RULES, progress_seconds=0)
    return {"root": root, "out": str(out), "stats": stats}


def _pages(out, prefix):
    files = sorted(tf.io.gfile.glob(os.path.join(out, f"{prefix}-*.tfrecord")))
    return {p["page_id"]: p for f in files for p in shards.read_pages(f)}


def _decode(data):
    return tf.io.decode_image(data, expand_animations=False).numpy()


# --------------------------------------------------------------------------- the manifest split


def test_manifest_counts_every_drop_by_reason(built):
    s = built["stats"]["train"]
    assert s["pages"] == {
        "in": 11, "written": 5,
        "dropped": {"too_few_images": 2, "bad_manifest_row": 3, "duplicate_page_id": 1},
    }
    assert s["images"]["in"] == 25 and s["images"]["written"] == 14
    assert s["images"]["dropped"] == {
        "missing_file": 1, "read_error": 0, "file_too_large": 0, "empty_file": 2,
        "not_an_image": 2, "too_many_pixels": 2, "too_small": 1, "corrupt": 1, "duplicate": 1,
    }
    assert s["images"]["valid_in_dropped_pages"] == 1  # the single-image page's image
    # Valid images by source mode (the single-image page's valid image included).
    assert s["images"]["source_modes"] == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGB": 10,
                                           "RGBA": 1}
    assert sum(s["pages_per_shard"]) == 5 and len(s["files"]) == 3
    assert s["bytes"]["files"] == sum(os.path.getsize(os.path.join(built["out"], f))
                                      for f in s["files"])
    on_disk = json.load(open(os.path.join(built["out"], "train-stats.json")))
    assert on_disk["pages"] == s["pages"] and on_disk["params"]["rules"]["max_side"] == 128


def test_manifest_pages_are_valid_rgb_jpegs(built):
    pages = _pages(built["out"], "train")
    assert len(pages) == 5
    by_url = {p["page_url"]: p for p in pages.values()}
    good = by_url["https://a.example/good"]
    assert good["alt_texts"] == ["a0", "a1", "a2"] and len(good["images"]) == 3
    modes = by_url["https://a.example/modes"]
    assert modes["label"] == 4 and len(modes["images"]) == 5
    for page in pages.values():
        for data in page["images"]:
            assert shards.sniff_format(data) == "jpeg"
            assert _decode(data).shape[-1] == 3
    # Grey stays grey after RGB conversion; alpha is composited over white (brighter).
    grey = _decode(modes["images"][0]).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 3
    rgba = _decode(modes["images"][2]).astype(float)
    assert rgba.mean() > _photo(23).astype(float).mean() + 30
    assert len(by_url["https://a.example/mixed"]["images"]) == 2
    assert len(by_url["https://a.example/dup"]["images"]) == 2  # exact duplicate removed
    big = pages["custom-id"]
    assert _decode(big["images"][0]).shape[:2] == (85, 128)  # 300x200 downscaled to max_side
    assert "https://a.example/single" not in by_url and "https://a.example/allbad" not in by_url


def test_shards_parse_with_the_training_features(built):
    for f in built["stats"]["train"]["files"]:
        for record in tf.data.TFRecordDataset(os.path.join(built["out"], f)):
            page = shards.parse_page(record)
            assert int(page["num_images"]) >= 2


def test_parquet_dirtree_imagefolder(built):
    pq = _pages(built["out"], "pq")
    assert sorted(len(p["images"]) for p in pq.values()) == [2, 3, 5]
    assert pq["custom-id"]["page_url"] == "https://a.example/big"
    tree = _pages(built["out"], "tree")
    assert sorted(tree) == ["pageA", "sub/pageB"]  # pageC has one image
    assert tree["pageA"]["page_url"] == "https://tree.example/a"
    assert tree["pageA"]["alt_texts"] == ["alt of x", ""]
    t = built["stats"]["tree"]
    assert t["pages"]["dropped"]["too_few_images"] == 1 and t["images"]["dropped"]["corrupt"] == 1
    folder = _pages(built["out"], "folder")
    assert len(folder) == 4 and sorted(p["label"] for p in folder.values()) == [0, 0, 1, 1]
    f = built["stats"]["folder"]
    assert f["source_info"]["label_names"] == ["cat", "dog"]
    assert f["source_info"]["unused_images"] == 1
    assert f["pages_per_shard"] == [2, 2]  # label-grouped sources are dealt round-robin


def test_rebuild_is_deterministic_and_multiprocess(built, tmp_path):
    """The DirectRunner with 2 worker processes writes byte-identical shards; a rebuild with
    fewer shards removes the old files of the prefix."""
    out = str(tmp_path / "mp")
    spec = build_pages.SplitSpec(
        sources.manifest_source(str(built["root"] / "manifest.jsonl")), "train", 3)
    stats = build_pages.run_build(
        [spec], out, rules=RULES, progress_seconds=0,
        pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert stats["train"]["pages"] == built["stats"]["train"]["pages"]
    for name in stats["train"]["files"]:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(built["out"], name), "rb") as b:
            assert a.read() == b.read(), name
    spec.num_shards = 1
    build_pages.run_build([spec], out, rules=RULES, progress_seconds=0)
    assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == [
        "train-00000-of-00001.tfrecord"]


# --------------------------------------------------------------------------- rejected inputs


def test_empty_and_missing_manifests_are_rejected_naming_them(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        sources.manifest_source(str(empty))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        sources.manifest_source(str(tmp_path / "nothing-here-*.jsonl"))
    rc = build_pages.main(["--source=manifest", f"--input={empty}", f"--out_dir={tmp_path}/o"])
    assert rc == 2 and "empty.jsonl" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such directory"):
        sources.dirtree_source(str(tmp_path / "nope"))


def test_image_rules_each_bad_input(built):
    expect = {"truncated": "corrupt", "zero": "empty_file", "notes": "not_an_image",
              "bomb": "too_many_pixels", "big_declared": "too_many_pixels", "tiny": "too_small",
              "missing": "missing_file"}
    for name, reason in expect.items():
        with pytest.raises(image_rules.ImageRejected) as e:
            image_rules.process_image(PATHS[name], RULES)
        assert e.value.reason == reason and os.path.basename(PATHS[name]) in str(e.value)
    out = image_rules.process_image(PATHS["cmyk"], RULES)
    assert out.source_mode == "CMYK" and _decode(out.data).shape == (40, 48, 3)
    big = image_rules.process_image(np.zeros((10, 300, 3), np.uint8),
                                    image_rules.ImageRules(min_side=0, max_side=100,
                                                           image_format="png"))
    assert (big.width, big.height) == (100, 3) and shards.sniff_format(big.data) == "png"
    with pytest.raises(ValueError, match="image_format"):
        image_rules.ImageRules(image_format="webp")


def test_records_match_tensorflow(tmp_path):
    features = {"page_id": ("bytes", ["p"]), "images": ("bytes", [b"a", b"\x00" * 200]),
                "label": ("int64", [-3, 2**40]), "pair_sim": ("float", [0.5, -1.0])}
    path = str(tmp_path / "r.tfrecord")
    with records.TFRecordWriter(path) as w:
        w.write(records.encode_example(features))
    (record,) = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    ex = tf.train.Example.FromString(record).features.feature
    assert list(ex["images"].bytes_list.value) == [b"a", b"\x00" * 200]
    assert list(ex["label"].int64_list.value) == [-3, 2**40]
    assert list(ex["pair_sim"].float_list.value) == [0.5, -1.0]
    assert list(records.read_records(path)) == [record]


# --------------------------------------------------------------------------- label-grouped sources


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_through_its_cli(tmp_path, capsys):
    """The embedded data's own command runs the Beam builder with fashion_mnist's rules."""
    src = tmp_path / "fm"
    src.mkdir()
    for stem, n in (("train", 31), ("t10k", 12)):
        images = (np.arange(n, dtype=np.uint8)[:, None, None] * 7 + np.zeros((1, 28, 28), np.uint8))
        _write_idx(src / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(src / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    out = str(tmp_path / "out")
    rc = fashion_mnist.main([f"--source_dir={src}", f"--out_dir={out}", "--train_shards=2", "--eval_shards=1",
                             "--images_per_page=3"])
    assert rc == 0, capsys.readouterr().err
    pages = _pages(out, "train")
    assert all(p["page_id"].startswith("fmnist-train-c") for p in pages.values())
    assert sum(len(p["images"]) for p in pages.values()) == 31 - 1  # class 0 has 4: one unused
    # fashion_mnist's own rules (28 px kept, lossless PNG)
    assert all(shards.sniff_format(i) == "png" for p in pages.values() for i in p["images"])
    assert "config.data.train_files=" in capsys.readouterr().out
    # The generic builder has no fashion_mnist source: one line naming the choices, exit 2.
    with pytest.raises(SystemExit) as e:
        build_pages.main(["--source=fashion_mnist", f"--out_dir={out}"])
    assert e.value.code == 2 and "invalid choice: 'fashion_mnist'" in capsys.readouterr().err


def test_tfds_builder_directory(tmp_path):
    import tensorflow_datasets as tfds

    class TinyLabeled(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(12):
                yield i, {"image": _photo(200 + i, 32, 32), "label": i % 3}

    builder = TinyLabeled(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    source = sources.tfds_source(builder.data_dir, split="train", images_per_page=2)
    assert source.info["label_names"] == ["a", "b", "c"] and len(source.pages) == 6
    stats = build_pages.run_build([build_pages.SplitSpec(source, "train", 2)],
                                  str(tmp_path / "out"), rules=RULES, progress_seconds=0)
    assert stats["train"]["pages"]["written"] == 6 and stats["train"]["images"]["written"] == 12
