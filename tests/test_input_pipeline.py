"""Tests of the tf.data pair pipeline on real (tiny, synthetic) TFRecord shards."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import shards, synthetic
from semantica_jax import config_lib, image_ops, input_pipeline

NUM_PAGES = 40
NUM_SHARDS = 8
SINGLE_IMAGE_PAGES = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Synthetic shards: 40 pages (4 of them with one image) over 8 files."""
    out = tmp_path_factory.mktemp("synthetic")
    stats = synthetic.write_synthetic_shards(
        out,
        num_pages=NUM_PAGES,
        num_shards=NUM_SHARDS,
        images_per_page=(2, 5),
        image_size=32,
        single_image_pages=SINGLE_IMAGE_PAGES,
        seed=0,
        prefix="train",
    )
    by_hash = {int(input_pipeline.hash_page_id(p["page_id"])): p for p in stats["pages"]}
    assert len(by_hash) == NUM_PAGES  # no hash collision among the test pages
    return {"dir": str(out), "files": stats["files"], "by_hash": by_hash}


_STREAM_ARGS = ("cond_image_size", "batch_size", "seed", "shuffle", "repeat", "drop_remainder",
                "start_element", "cached_tokens", "split")


def _dataset(files, **kwargs):
    """make_pair_dataset with `kwargs` split into the stream's arguments and config.data fields."""
    args = dict(image_size=32, cond_image_size=28, batch_size=8, shuffle_buffer=64)
    args.update(kwargs)
    stream = {k: args.pop(k) for k in _STREAM_ARGS if k in args}
    return input_pipeline.make_pair_dataset(files, input_pipeline.data_section(**args), **stream)


def _collect(ds, num_batches=None):
    """Concatenates the batches of `ds` (all of it, or the first `num_batches`)."""
    if num_batches is not None:
        ds = ds.take(num_batches)
    batches = list(ds.as_numpy_iterator())
    assert batches, "dataset yielded nothing"
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# --------------------------------------------------------------------------- files


def test_list_shard_files(synth, tmp_path):
    d = synth["dir"]
    files = input_pipeline.list_shard_files(os.path.join(d, "train-*.tfrecord"))
    assert files == sorted(synth["files"]) and len(files) == NUM_SHARDS
    two = input_pipeline.list_shard_files(
        f"{d}/train-00000-*.tfrecord, {d}/train-0000[12]-*.tfrecord,{d}/train-00000-*"
    )
    assert [os.path.basename(f)[:11] for f in two] == ["train-00000", "train-00001", "train-00002"]
    missing = str(tmp_path / "nope-*.tfrecord")
    with pytest.raises(FileNotFoundError, match="nope-\\*.tfrecord"):
        input_pipeline.list_shard_files(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        input_pipeline.list_shard_files(f"{d}/train-*,{missing}")
    with pytest.raises(FileNotFoundError, match="empty"):
        input_pipeline.list_shard_files("")


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_files_for_process_disjoint_and_complete(process_count):
    files = [f"f{i}" for i in range(8)]
    shares = [
        input_pipeline.files_for_process(files, i, process_count) for i in range(process_count)
    ]
    assert all(len(s) == 8 // process_count for s in shares)
    flat = [f for s in shares for f in s]
    assert sorted(flat) == files and len(set(flat)) == len(files)


def test_files_for_process_errors():
    files = [f"f{i}" for i in range(8)]
    with pytest.raises(ValueError, match="8 shard files cannot be split evenly over 3 processes"):
        input_pipeline.files_for_process(files, 0, 3)
    with pytest.raises(ValueError, match="process_index=4.*process_count=4"):
        input_pipeline.files_for_process(files, 4, 4)
    with pytest.raises(ValueError, match="0 shard files"):
        input_pipeline.files_for_process([], 0, 1)


# --------------------------------------------------------------------------- pairs


def test_pairs_are_distinct_images_of_one_page(synth):
    ds = _dataset(synth["files"], repeat=False, drop_remainder=False, seed=5)
    got = _collect(ds)
    n = len(got["page_hash"])
    multi = [p for p in synth["by_hash"].values() if p["num_images"] >= 2]
    # One pass = every page with >= 2 images exactly once; 1-image pages never.
    assert n == len(multi) == NUM_PAGES - SINGLE_IMAGE_PAGES
    assert sorted(got["page_hash"].tolist()) == sorted(
        int(input_pipeline.hash_page_id(p["page_id"])) for p in multi
    )
    for i in range(n):
        page = synth["by_hash"][int(got["page_hash"][i])]
        c, t = int(got["cond_index"][i]), int(got["target_index"][i])
        assert c != t and 0 <= c < page["num_images"] and 0 <= t < page["num_images"]
        assert got["label"][i] == page["label"]
        # Pixel content says the same: both images come from this page, at these indices.
        assert synthetic.decode_synthetic(got["cond"][i], (0, 1)) == (page["page_number"], c)
        assert synthetic.decode_synthetic(got["target"][i], (-1, 1)) == (page["page_number"], t)


def test_batch_structure_and_ranges(synth):
    batch = next(iter(_dataset(synth["files"], batch_size=4)))
    assert batch["target"].shape == (4, 32, 32, 3) and batch["target"].dtype == tf.float32
    assert batch["cond"].shape == (4, 28, 28, 3) and batch["cond"].dtype == tf.float32
    assert batch["label"].dtype == tf.int32 and batch["page_hash"].dtype == tf.int64
    assert batch["cond_index"].dtype == tf.int32 and batch["target_index"].dtype == tf.int32
    target, cond = batch["target"].numpy(), batch["cond"].numpy()
    assert target.min() >= -1 and target.max() <= 1
    assert cond.min() >= 0 and cond.max() <= 1
    # The synthetic images contain pure black and white, so both ends of the range are used.
    assert target.min() < -0.9 and target.max() > 0.9 and cond.max() > 0.9


def test_reconstruction_pairs_are_identical(synth):
    ds = _dataset(
        synth["files"], pairing="reconstruction", cond_image_size=32, repeat=False, seed=2
    )
    got = _collect(ds)
    np.testing.assert_array_equal(got["cond_index"], got["target_index"])
    np.testing.assert_allclose(got["cond"] * 2 - 1, got["target"], atol=1e-6)
    for i in range(len(got["page_hash"])):
        page = synth["by_hash"][int(got["page_hash"][i])]
        assert page["num_images"] >= 2  # same page filter as the pairs arm
        assert synthetic.decode_synthetic(got["cond"][i]) == (
            page["page_number"],
            int(got["cond_index"][i]),
        )


def test_deterministic_given_seed(synth):
    a = _collect(_dataset(synth["files"], seed=7), 6)
    b = _collect(_dataset(synth["files"], seed=7), 6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    c = _collect(_dataset(synth["files"], seed=8), 6)
    assert not np.array_equal(a["page_hash"], c["page_hash"])
    # Same page order (no shuffle), different seed: the index choice alone changes.
    d = _collect(_dataset(synth["files"], seed=7, shuffle=False), 6)
    e = _collect(_dataset(synth["files"], seed=8, shuffle=False), 6)
    np.testing.assert_array_equal(d["page_hash"], e["page_hash"])
    indices = lambda x: np.stack([x["cond_index"], x["target_index"]])  # noqa: E731
    assert not np.array_equal(indices(d), indices(e))


def test_autotune_is_off_unless_asked_and_gives_the_same_stream(synth):
    """tf.data's tuning thread is off by default (its iterator's destructor can block for up to
    a tuning period, 60 s, at the end of a run); turning it on changes no element."""
    off = _dataset(synth["files"], seed=3)
    on = _dataset(synth["files"], seed=3, autotune=True)
    assert off.options().autotune.enabled is False
    assert on.options().autotune.enabled is True
    a, b = _collect(off, 4), _collect(on, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    config = config_lib.default_config()
    assert config.data.autotune is False


def test_epochs_reshuffle_and_redraw_pairs(synth):
    per_epoch = NUM_PAGES - SINGLE_IMAGE_PAGES  # 36 = 4 batches of 9
    got = _collect(_dataset(synth["files"], seed=1, batch_size=9), 12)  # 3 epochs
    epochs = [slice(k * per_epoch, (k + 1) * per_epoch) for k in range(3)]
    for s in epochs:  # every epoch holds every page once
        assert len(set(got["page_hash"][s].tolist())) == per_epoch
    assert not np.array_equal(got["page_hash"][epochs[0]], got["page_hash"][epochs[1]])
    triples = list(zip(got["page_hash"], got["cond_index"], got["target_index"]))
    pairs = [set(triples[s]) for s in epochs]
    assert pairs[0] != pairs[1]  # fresh pair choice per epoch


@pytest.mark.parametrize("cache_decoded", [False, True])
def test_start_element_resumes_the_exact_stream(synth, cache_decoded):
    """Skipping to a position gives what an uninterrupted iterator gives there, across epochs,
    however many other iterators of the same dataset exist (exact resume)."""
    kwargs = dict(seed=5, batch_size=6, cache_decoded=cache_decoded)
    ds = _dataset(synth["files"], **kwargs)
    other = iter(ds.as_numpy_iterator())  # an unrelated iterator drawn first (e.g. grid conditions)
    next(other)
    full = _collect(ds, 16)  # 96 pairs, over 2 epochs of 36 pages
    assert np.array_equal(full["element_index"], np.arange(96))
    resumed = _collect(_dataset(synth["files"], start_element=42, **kwargs), 9)
    for key in full:
        np.testing.assert_array_equal(full[key][42:96], resumed[key], err_msg=key)


def test_cache_decoded_gives_the_same_stream(synth):
    kwargs = dict(seed=3, shuffle=False, batch_size=6)
    plain = _collect(_dataset(synth["files"], **kwargs), 9)  # 54 pairs > 1 epoch
    cached = _collect(_dataset(synth["files"], cache_decoded=True, **kwargs), 9)
    for key in plain:
        np.testing.assert_allclose(plain[key], cached[key], atol=1e-6, err_msg=key)


@pytest.mark.parametrize("cache_decoded", [False, True])
def test_corrupt_images_in_shards_do_not_stop_the_stream(tmp_path, cache_decoded):
    good = [shards.encode_array(synthetic.synthetic_image(9, i, 16)) for i in range(2)]
    path = str(tmp_path / "mixed-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(shards.make_example("bad", [b"junk", b"more junk"]).SerializeToString())
        w.write(shards.make_example("good", good).SerializeToString())
        w.write(shards.make_example("bad2", [b"junk", good[0]]).SerializeToString())
    ds = _dataset([path], batch_size=1, repeat=False, shuffle=False, cache_decoded=cache_decoded)
    got = _collect(ds)
    # Only the good page survives: 'bad' has no decodable image, and every pair of 'bad2'
    # involves its undecodable image.
    assert got["page_hash"].tolist() == [int(input_pipeline.hash_page_id("good"))]
    assert np.all(got["label"] == -1)  # pages without a label feature
    for i in range(len(got["page_hash"])):
        assert synthetic.decode_synthetic(got["cond"][i])[0] == 9


def test_grey_and_non_square_images(tmp_path):
    grey = np.tile(np.linspace(0, 255, 30).astype(np.uint8), (20, 1))  # 20x30 gradient
    rgb = np.zeros((10, 40, 3), np.uint8)
    path = str(tmp_path / "odd-00000-of-00001.tfrecord")
    stats = shards.write_shards(
        [{"page_id": "odd", "images": [grey, rgb], "label": 2}], tmp_path, 1, prefix="odd"
    )
    assert stats["files"] == [path]
    got = _collect(_dataset([path], batch_size=1, repeat=False, pairing="reconstruction"))
    assert got["target"].shape == (1, 32, 32, 3) and got["cond"].shape == (1, 28, 28, 3)
    assert got["label"].tolist() == [2]
    img = got["cond"][0]
    if got["cond_index"][0] == 0:  # grey -> three equal channels
        np.testing.assert_allclose(img[..., 0], img[..., 1])
        np.testing.assert_allclose(img[..., 0], img[..., 2])


def test_argument_errors(synth):
    with pytest.raises(ValueError, match="'pair'"):
        _dataset(synth["files"], pairing="pair")
    with pytest.raises(ValueError, match="min_images_per_page=1.*'pairs'"):
        _dataset(synth["files"], min_images_per_page=1)
    with pytest.raises(ValueError, match="batch_size"):
        _dataset(synth["files"], batch_size=0)
    # Reconstruction may use 1-image pages when asked to.
    got = _collect(
        _dataset(
            synth["files"], pairing="reconstruction", min_images_per_page=1, repeat=False,
            drop_remainder=False,
        )
    )
    assert len(got["page_hash"]) == NUM_PAGES


# --------------------------------------------------------------------------- from config


def _config(synth, eval_pattern=None):
    config = config_lib.default_config()
    config.seed = 11
    config.data.train_files = os.path.join(synth["dir"], "train-*.tfrecord")
    config.data.eval_files = eval_pattern if eval_pattern is not None else config.data.train_files
    config.data.image_size = 16
    config.data.shuffle_buffer = 32
    config.encoder.image_size = 14
    return config


def test_create_train_dataset(synth):
    config = _config(synth)
    ds = input_pipeline.create_train_dataset(config, process_index=1, process_count=4, batch_size=3)
    batches = list(ds.take(5).as_numpy_iterator())  # more than this process's pages: repeats
    assert batches[0]["target"].shape == (3, 16, 16, 3)
    assert batches[0]["cond"].shape == (3, 14, 14, 3)
    mine = {
        int(input_pipeline.hash_page_id(p["page_id"]))
        for p in synth["by_hash"].values()
        if p["shard"] % 4 == 1
    }
    assert {int(h) for b in batches for h in b["page_hash"]} <= mine
    # `seed` overrides config.seed (the trainer re-seeds on resume); same seed = same stream.
    def first_hashes(**kw):
        ds = input_pipeline.create_train_dataset(
            config, process_index=0, process_count=1, batch_size=8, **kw
        )
        return next(iter(ds))["page_hash"].numpy().tolist()

    assert first_hashes() == first_hashes(seed=11) != first_hashes(seed=12)
    with pytest.raises(ValueError, match="8 shard files cannot be split evenly over 3"):
        input_pipeline.create_train_dataset(config, process_index=0, process_count=3, batch_size=3)
    config.data.train_files = ""
    with pytest.raises(ValueError, match="config.data.train_files"):
        input_pipeline.create_train_dataset(config, process_index=0, process_count=1, batch_size=3)


def test_create_eval_dataset_is_fixed_and_sharded(synth):
    config = _config(synth)
    make = lambda i: _collect(  # noqa: E731
        input_pipeline.create_eval_dataset(config, process_index=i, process_count=2, batch_size=2)
    )
    first, again, other = make(0), make(0), make(1)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert not set(first["page_hash"].tolist()) & set(other["page_hash"].tolist())
    for pairs, process in ((first, 0), (other, 1)):
        usable = sum(
            p["num_images"] >= 2 and p["shard"] % 2 == process for p in synth["by_hash"].values()
        )
        assert len(pairs["page_hash"]) == usable - usable % 2  # partial last batch dropped
    config.data.eval_files = ""
    with pytest.raises(ValueError, match="config.data.eval_files"):
        input_pipeline.create_eval_dataset(config, process_index=0, process_count=1, batch_size=2)
    config.data.eval_files = os.path.join(synth["dir"], "missing-*")
    with pytest.raises(FileNotFoundError, match="missing-\\*"):
        input_pipeline.create_eval_dataset(config, process_index=0, process_count=1, batch_size=2)


@pytest.mark.parametrize("cache_decoded", [False, True])
def test_target_fit_pad_centres_pixels_without_resampling(synth, cache_decoded):
    """target_fit='pad': a 32 px image on a 36 px canvas keeps every pixel, black around it; the
    condition is still resized to the encoder's size; images larger than the canvas are resized."""
    ds = _dataset(synth["files"], pairing="reconstruction", image_size=36, cond_image_size=32, repeat=False,
                  target_fit="pad", cache_decoded=cache_decoded)
    got = _collect(ds)
    np.testing.assert_allclose(got["target"][:, 2:34, 2:34], got["cond"] * 2 - 1, atol=1e-6)
    border = np.ones(got["target"].shape[1:3], bool)
    border[2:34, 2:34] = False
    assert np.all(got["target"][:, border] == -1.0)
    image = tf.io.encode_png(tf.cast(tf.random.uniform([40, 40, 3], 0, 255, seed=1), tf.uint8))
    np.testing.assert_allclose(image_ops.target_image(image, 36, "pad"),
                               image_ops.target_image(image, 36, "resize"))
    with pytest.raises(ValueError, match="target_fit='crop'"):
        _dataset(synth["files"], target_fit="crop")
