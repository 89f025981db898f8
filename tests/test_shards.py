"""Tests of the page shard writer/reader, the synthetic shards and the Fashion-MNIST builder.

All data is tiny and made here in tmp_path (fake IDX files stand in for the Debian package).
"""
from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import fashion_mnist, shards, synthetic


def _decode(data: bytes) -> np.ndarray:
    return tf.io.decode_image(data, expand_animations=False).numpy()


def _all_pages(files):
    return [page for f in files for page in shards.read_pages(f)]


def _bmp_bytes(rgb: np.ndarray) -> bytes:
    """A minimal 24-bit BMP (a format the writer must re-encode)."""
    height, width, _ = rgb.shape
    row = width * 3
    pad = (4 - row % 4) % 4
    pixels = b"".join(
        rgb[y, :, ::-1].tobytes() + b"\x00" * pad for y in range(height - 1, -1, -1)
    )
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + dib + pixels


# --------------------------------------------------------------------------- writer / reader


def test_round_trip_png(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (4, 7), dtype=np.uint8)
    grey1 = rng.integers(0, 256, (3, 3, 1), dtype=np.uint8)
    encoded = tf.io.encode_png(rgb).numpy()
    path = tmp_path / "on_disk.png"
    path.write_bytes(tf.io.encode_png(grey[:, :, None]).numpy())
    pages = [
        {
            "page_id": "a",
            "page_url": "https://example.com/a",
            "images": [rgb, grey, grey1],
            "alt_texts": ["red", "grey", "one"],
            "label": 3,
        },
        {"page_id": "b", "images": [encoded, str(path)]},
        {"page_id": "c", "page_url": "", "images": [path], "label": 0},
    ]
    stats = shards.write_shards(pages, tmp_path / "out", num_shards=2, prefix="train")

    assert stats["pages_written"] == 3
    assert stats["images_written"] == 6
    assert stats["skipped_corrupt_images"] == 0 and stats["dropped_pages"] == 0
    assert [os.path.basename(f) for f in stats["files"]] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    assert stats["bytes"] == sum(os.path.getsize(f) for f in stats["files"])
    assert not list((tmp_path / "out").glob("*.incomplete"))
    # Round-robin: pages 0 and 2 in file 0, page 1 in file 1.
    assert [p["page_id"] for p in shards.read_pages(stats["files"][0])] == ["a", "c"]
    assert [p["page_id"] for p in shards.read_pages(stats["files"][1])] == ["b"]

    got = {p["page_id"]: p for p in _all_pages(stats["files"])}
    a, b, c = got["a"], got["b"], got["c"]
    assert a["page_url"] == "https://example.com/a" and a["label"] == 3
    assert a["alt_texts"] == ["red", "grey", "one"]
    np.testing.assert_array_equal(_decode(a["images"][0]), rgb)
    np.testing.assert_array_equal(_decode(a["images"][1])[:, :, 0], grey)
    np.testing.assert_array_equal(_decode(a["images"][2]), grey1)
    assert all(shards.sniff_format(x) == "png" for x in a["images"])
    assert b["page_url"] == "" and b["label"] is None and b["alt_texts"] == []
    assert b["images"][0] == encoded  # valid PNG bytes are stored unchanged
    assert b["images"][1] == path.read_bytes()
    assert c["label"] == 0 and c["images"] == [path.read_bytes()]


def test_jpeg_output_and_bmp_reencoding(tmp_path):
    flat = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    bmp_pixels = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    stats = shards.write_shards(
        [
            {"page_id": "j", "images": [flat]},
            {"page_id": "bmp", "images": [_bmp_bytes(bmp_pixels)]},
        ],
        tmp_path,
        num_shards=1,
        image_format="jpeg",
        jpeg_quality=90,
    )
    assert stats["reencoded_images"] == 1 and stats["images_written"] == 2
    got = {p["page_id"]: p for p in _all_pages(stats["files"])}
    assert shards.sniff_format(got["j"]["images"][0]) == "jpeg"
    assert np.abs(_decode(got["j"]["images"][0]).astype(int) - flat).max() <= 3
    # The BMP went through decode -> JPEG; check it was decoded correctly (roughly, JPEG).
    assert shards.sniff_format(got["bmp"]["images"][0]) == "jpeg"
    assert _decode(got["bmp"]["images"][0]).shape == (3, 5, 3)

    png = shards.write_shards(
        [{"page_id": "bmp", "images": [_bmp_bytes(bmp_pixels)]}], tmp_path / "png", 1
    )
    (page,) = _all_pages(png["files"])
    np.testing.assert_array_equal(_decode(page["images"][0]), bmp_pixels)


def test_corrupt_images_skipped_and_counted(tmp_path):
    good = np.full((4, 4, 3), 7, np.uint8)
    bad_file = tmp_path / "bad.jpg"
    bad_file.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    truncated_png = tf.io.encode_png(good).numpy()[:20]
    pages = [
        {
            "page_id": "mixed",
            "images": [good, b"garbage", good + 1, bad_file],
            "alt_texts": ["g0", "bad", "g1", "bad file"],
        },
        {"page_id": "all_bad", "images": [truncated_png, b""], "label": 1},
        {"page_id": "empty", "images": []},
        {"page_id": "fine", "images": [good]},
    ]
    stats = shards.write_shards(pages, tmp_path / "out", num_shards=3)
    assert stats["skipped_corrupt_images"] == 4
    assert stats["dropped_pages"] == 2
    assert stats["pages_written"] == 2
    assert stats["images_written"] == 3
    got = {p["page_id"]: p for p in _all_pages(stats["files"])}
    assert set(got) == {"mixed", "fine"}
    assert got["mixed"]["alt_texts"] == ["g0", "g1"]  # stays aligned with the kept images
    np.testing.assert_array_equal(_decode(got["mixed"]["images"][1]), good + 1)
    # 2 pages over 3 shards: the third file exists and is empty.
    assert len(stats["files"]) == 3 and list(shards.read_pages(stats["files"][2])) == []


def _page(**fields):
    return {"page_id": "p", "images": [np.zeros((2, 2), np.uint8)], **fields}


@pytest.mark.parametrize(
    "pages, error, match",
    [
        ([_page(page_id="x"), _page(page_id="x")], ValueError, "duplicate page_id 'x'"),
        ([{"images": [b""]}], ValueError, "page_id"),
        ([_page(images=[np.zeros((2, 2))])], ValueError, "page 'p' image 0.*uint8"),
        ([_page(images=[np.zeros((2, 2, 2), np.uint8)])], ValueError, "page 'p' image 0.*shape"),
        ([_page(alt_texts=[])], ValueError, "page 'p': 0 alt_texts for 1 images"),
        ([_page(label=-2)], ValueError, "page 'p': label"),
        ([_page(images=[3.5])], ValueError, "page 'p' image 0: unsupported"),
        ([_page(images=["/nonexistent/img.png"])], FileNotFoundError, "/nonexistent/img.png"),
    ],
)
def test_write_errors_name_the_culprit(tmp_path, pages, error, match):
    with pytest.raises(error, match=match):
        shards.write_shards(pages, tmp_path, num_shards=2)
    # A failed write leaves no shard (or partial shard) behind.
    assert not list(tmp_path.iterdir())


def test_write_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        shards.write_shards([], tmp_path, num_shards=0)
    with pytest.raises(ValueError, match="image_format"):
        shards.write_shards([], tmp_path, num_shards=1, image_format="webp")


def test_parse_page_single_source_of_truth():
    example = shards.make_example("id", [b"x", b"y"], page_url="u", alt_texts=["1", "2"], label=4)
    page = shards.parse_page(example.SerializeToString())
    assert page["page_id"].numpy() == b"id" and page["page_url"].numpy() == b"u"
    assert page["images"].numpy().tolist() == [b"x", b"y"]
    assert int(page["num_images"]) == 2 and int(page["label"]) == 4
    bare = shards.parse_page(shards.make_example("id", [b"x"]).SerializeToString())
    assert int(bare["label"]) == shards.NO_LABEL and bare["alt_texts"].shape == (0,)
    assert set(shards.FEATURES) == {"page_id", "page_url", "images", "alt_texts", "label"}


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("size", [8, 28, 32, 64, 224])
def test_synthetic_code_survives_resizing(size):
    for page, index in [(0, 0), (1, 1), (12345, 7), (synthetic.MAX_PAGES - 1, 63)]:
        image = tf.image.convert_image_dtype(synthetic.synthetic_image(page, index, 32), tf.float32)
        resized = tf.image.resize(image, [size, size], method="bicubic", antialias=True)
        assert synthetic.decode_synthetic(resized.numpy()) == (page, index)
        assert synthetic.decode_synthetic(resized.numpy() * 2 - 1, (-1, 1)) == (page, index)
    jpeg = tf.io.encode_jpeg(synthetic.synthetic_image(4321, 5, 32), quality=75)
    assert synthetic.decode_synthetic(tf.io.decode_jpeg(jpeg).numpy(), (0, 255)) == (4321, 5)


def test_write_synthetic_shards(tmp_path):
    stats = synthetic.write_synthetic_shards(
        tmp_path,
        num_pages=20,
        num_shards=4,
        images_per_page=(2, 4),
        single_image_pages=3,
        corrupt_images=5,
        seed=1,
        prefix="syn",
    )
    assert stats["skipped_corrupt_images"] == 5
    assert stats["pages_written"] == 20 and stats["dropped_pages"] == 0
    meta = {p["page_id"]: p for p in stats["pages"]}
    assert sum(p["num_images"] == 1 for p in meta.values()) == 3
    assert stats["images_written"] == sum(p["num_images"] for p in meta.values())
    for shard_index, path in enumerate(stats["files"]):
        for page in shards.read_pages(path):
            m = meta[page["page_id"]]
            assert m["shard"] == shard_index
            assert page["label"] == m["page_number"] % 10
            assert len(page["images"]) == len(page["alt_texts"]) == m["num_images"]
            for i, data in enumerate(page["images"]):
                assert synthetic.decode_synthetic(_decode(data), (0, 255)) == (m["page_number"], i)


# --------------------------------------------------------------------------- fashion-mnist


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """Fake IDX files: image k of a split is filled with the value k; labels cycle 0..9."""
    source = tmp_path / "src"
    source.mkdir()
    sizes = {"train": 47, "t10k": 23}
    for stem, n in sizes.items():
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx(source / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(source / f"{stem}-labels-idx1-ubyte.gz", labels)
    return str(source), {"train": 47, "test": 23}


def test_read_idx(fake_fmnist, tmp_path):
    source, _ = fake_fmnist
    images, labels = fashion_mnist.load_split(source, "train")
    assert images.shape == (47, 28, 28) and images.dtype == np.uint8
    assert images[5, 3, 3] == 5 and labels.tolist() == [k % 10 for k in range(47)]
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad.gz: not an IDX file"):
        fashion_mnist.read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="short.gz.*shape \\(10,\\)"):
        fashion_mnist.read_idx(str(short))


def test_fashion_mnist_build(fake_fmnist, tmp_path):
    source, sizes = fake_fmnist
    out = str(tmp_path / "pages")
    result = fashion_mnist.build(
        out, images_per_page=2, train_shards=4, eval_shards=2, source_dir=source, seed=3
    )
    assert result["skipped"] is False
    assert sorted(os.listdir(out)) == sorted(
        ["stats.json", "train-stats.json", "eval-stats.json"]
        + [f"train-{i:05d}-of-00004.tfrecord" for i in range(4)]
        + [f"eval-{i:05d}-of-00002.tfrecord" for i in range(2)]
    )
    assert tf.io.gfile.glob(result["train_files"]) and tf.io.gfile.glob(result["eval_files"])
    on_disk = json.load(open(os.path.join(out, "stats.json")))
    assert on_disk["params"]["images_per_page"] == 2 and on_disk["params"]["seed"] == 3

    for split, prefix in (("train", "train"), ("test", "eval")):
        pages = _all_pages(sorted(tf.io.gfile.glob(os.path.join(out, f"{prefix}-*.tfrecord"))))
        used = []
        for page in pages:
            label = page["label"]
            assert page["page_id"].startswith(f"fmnist-{split}-c{label}-")
            assert page["page_url"] == ""
            assert len(page["images"]) == 2
            for data in page["images"]:
                pixels = _decode(data)
                assert pixels.shape == (28, 28, 3)  # grey replicated to RGB, lossless PNG
                assert (pixels == pixels[..., :1]).all()
                k = int(pixels[0, 0, 0])
                assert k % 10 == label  # every image of the page has the page's class
                used.append(k)
        assert len(used) == len(set(used))  # no image used twice
        # Classes with an odd image count leave exactly one image unused.
        per_class = np.bincount(np.arange(sizes[split]) % 10, minlength=10)
        assert len(used) == int((per_class - per_class % 2).sum())
        assert result["splits"][split]["unused_images"] == int((per_class % 2).sum())
        assert result["splits"][split]["pages"] == len(pages)

    again = fashion_mnist.build(
        out, images_per_page=2, train_shards=4, eval_shards=2, source_dir=source, seed=3
    )
    assert again["skipped"] is True and again["splits"] == result["splits"]

    # Other parameters: rebuilt, and the shards of the previous build are gone.
    subset = fashion_mnist.build(
        out, images_per_page=3, train_shards=2, eval_shards=1, classes=[1, 4], source_dir=source
    )
    assert subset["skipped"] is False
    assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == [
        "eval-00000-of-00001.tfrecord",
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    labels = {p["label"] for p in _all_pages(tf.io.gfile.glob(subset["train_files"]))}
    assert labels == {1, 4}


def test_fashion_mnist_missing_source_and_cli(fake_fmnist, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as e:
        fashion_mnist.build(str(tmp_path / "o"), source_dir=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value)
    assert len(fashion_mnist.CLASS_NAMES) == 10 and fashion_mnist.CLASS_NAMES[9] == "Ankle boot"

    source, _ = fake_fmnist
    out = str(tmp_path / "cli")
    argv = ["--out_dir", out, "--images_per_page", "4", "--train_shards", "2",
            "--eval_shards", "1", "--classes", "0,1,2", "--source_dir", source]
    assert fashion_mnist.main(argv) == 0
    assert "config.data.train_files=" in capsys.readouterr().out
    assert fashion_mnist.main(argv) == 0
    assert "already built" in capsys.readouterr().out
    assert fashion_mnist.main(["--out_dir", out, "--source_dir", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
