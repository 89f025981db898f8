"""Semantic similarity filtering: the stored pair_sim matrices, the report and sweep, and the
pair pipeline's similarity and label filters."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import helpers
from data_pipeline import synthetic
from semantica_jax import input_pipeline, similarity

NUM_PAGES = 30
LOW, HIGH = 0.2, 0.9


def _vectors(page_number: int, n: int) -> np.ndarray:
    """Known pooled embeddings: random 4-d vectors; every 5th page is all near-duplicates."""
    rng = np.random.default_rng(page_number)
    if page_number % 5 == 0:
        return np.tile(rng.normal(size=(1, 4)), (n, 1)) + rng.normal(scale=1e-3, size=(n, 4))
    return rng.normal(size=(n, 4))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Synthetic page shards augmented like embed_cache output (pooled float16 per image)."""
    root = tmp_path_factory.mktemp("similarity")
    plain = root / "plain"
    stats = synthetic.write_synthetic_shards(plain, num_pages=NUM_PAGES, num_shards=2,
                                             images_per_page=(2, 5), image_size=16, seed=0,
                                             prefix="train")
    meta = {p["page_id"]: p for p in stats["pages"]}
    cache = root / "cache"
    cache.mkdir()
    vectors = {}
    for path in stats["files"]:
        with tf.io.TFRecordWriter(str(cache / os.path.basename(path))) as writer:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                ex = tf.train.Example.FromString(record)
                feats = ex.features.feature
                page_id = feats["page_id"].bytes_list.value[0].decode()
                vec = _vectors(meta[page_id]["page_number"], len(feats["images"].bytes_list.value))
                vectors[page_id] = vec.astype(np.float16).astype(np.float32)
                feats["pooled"].bytes_list.value.extend(v.astype("<f2").tobytes() for v in vec)
                feats["pooled_shape"].int64_list.value.append(4)
                writer.write(ex.SerializeToString())
    out = root / "sim"
    report = similarity.compute(str(cache / "train-*.tfrecord"), str(out), low=LOW, high=HIGH,
                                sweep=True, sweep_low=[-1.0, 0.0, 0.5], sweep_high=[1.0, 0.9])
    return {"root": root, "plain": str(plain), "out": str(out), "report": report,
            "vectors": vectors, "meta": meta}


def _brute(vectors, low, high):
    pages = pairs = kept_pairs = kept_pages = 0
    for vec in vectors.values():
        sim = similarity.cosine_matrix(vec)
        iu, ju = np.triu_indices(len(vec), k=1)
        s = sim[iu, ju]
        inside = (s >= low) & (s <= high)
        pages += 1
        pairs += s.size
        kept_pairs += int(inside.sum())
        kept_pages += int(inside.any())
    return pages, pairs, kept_pairs, kept_pages


def test_mirror_shards_carry_the_similarity_matrix(cached):
    files = sorted(tf.io.gfile.glob(os.path.join(cached["out"], "train-*.tfrecord")))
    assert [os.path.basename(f) for f in files] == ["train-00000-of-00002.tfrecord",
                                                    "train-00001-of-00002.tfrecord"]
    seen = 0
    for f in files:
        for record in tf.data.TFRecordDataset(f).as_numpy_iterator():
            feats = tf.train.Example.FromString(record).features.feature
            page_id = feats["page_id"].bytes_list.value[0].decode()
            n = len(feats["images"].bytes_list.value)
            sim = np.array(feats["pair_sim"].float_list.value).reshape(n, n)
            np.testing.assert_allclose(sim, similarity.cosine_matrix(cached["vectors"][page_id]),
                                       atol=1e-6)
            np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
            assert "pooled" in feats  # every input feature is kept
            seen += 1
    assert seen == NUM_PAGES


def test_report_and_sweep_match_brute_force(cached):
    report = cached["report"]
    pages, pairs, kept_pairs, kept_pages = _brute(cached["vectors"], LOW, HIGH)
    assert report["pages"] == pages and report["pairs"] == pairs
    assert report["kept"]["kept_pairs"] == kept_pairs and report["kept"]["kept_pages"] == kept_pages
    assert report["kept"]["kept_pair_fraction"] == round(kept_pairs / pairs, 4)
    assert sum(report["histogram"]["counts"]) == pairs
    for row in report["sweep"]:
        _, _, kp, kg = _brute(cached["vectors"], row["low"], row["high"])
        assert (row["kept_pairs"], row["kept_pages"]) == (kp, kg), row
    assert {(r["low"], r["high"]) for r in report["sweep"]} >= {(-1.0, 1.0), (0.5, 0.9)}
    # The near-duplicate pages (every 5th) lose all their pairs to the upper threshold.
    upper = next(r for r in report["sweep"] if (r["low"], r["high"]) == (-1.0, 0.9))
    assert upper["kept_pages"] <= NUM_PAGES - NUM_PAGES // 5
    out = cached["out"]
    on_disk = json.load(open(os.path.join(out, similarity.REPORT_JSON)))
    assert on_disk["kept"] == report["kept"]
    for name in (similarity.HIST_PNG, similarity.PAIRS_PNG):
        with Image.open(os.path.join(out, name)) as img:
            assert img.size[0] > 100 and img.size[1] > 50
    assert "| low | high |" in open(os.path.join(out, similarity.SWEEP_MD)).read()
    # Same inputs and settings: nothing to do.
    again = similarity.compute(os.path.join(cached["root"], "cache", "train-*.tfrecord"), out,
                               low=LOW, high=HIGH, sweep=True, sweep_low=[-1.0, 0.0, 0.5],
                               sweep_high=[1.0, 0.9])
    assert again["skipped"] and again["kept"] == report["kept"]


def test_drop_unpaired_and_cli_errors(cached, tmp_path, capsys):
    out = str(tmp_path / "dropped")
    report = similarity.compute(os.path.join(cached["root"], "cache", "train-*.tfrecord"), out,
                                low=LOW, high=HIGH, drop_unpaired=True)
    kept = sum(1 for f in tf.io.gfile.glob(os.path.join(out, "train-*.tfrecord"))
               for _ in tf.data.TFRecordDataset(f))
    assert report["dropped_unpaired_pages"] == NUM_PAGES - report["kept"]["kept_pages"] > 0
    assert kept == report["kept"]["kept_pages"]
    # Page shards without cached embeddings need --config (the error names the file).
    rc = similarity.main([f"--shards={cached['plain']}/train-*.tfrecord",
                          f"--out_dir={tmp_path}/x"])
    assert rc == 2 and "train-00000-of-00002.tfrecord" in capsys.readouterr().err


def _pairs(files, **kw):
    stream = dict(cond_image_size=14, batch_size=1, shuffle=False, repeat=False, drop_remainder=False)
    stream.update({k: kw.pop(k) for k in ("seed",) if k in kw})
    data = input_pipeline.data_section(image_size=16, **kw)
    out = []
    for b in input_pipeline.make_pair_dataset(files, data, **stream).as_numpy_iterator():
        out.append((synthetic.decode_synthetic(b["target"][0], (-1, 1)),
                    synthetic.decode_synthetic(b["cond"][0]), int(b["label"][0])))
    return out


def test_pipeline_samples_only_allowed_pairs(cached):
    files = sorted(tf.io.gfile.glob(os.path.join(cached["out"], "train-*.tfrecord")))
    by_number = {m["page_number"]: pid for pid, m in cached["meta"].items()}
    sims = {n: similarity.cosine_matrix(cached["vectors"][pid]) for n, pid in by_number.items()}
    allowed_pages = {n for n, s in sims.items()
                     if np.any(((s >= LOW) & (s <= HIGH))[~np.eye(len(s), dtype=bool)])}
    assert 0 < len(allowed_pages) < NUM_PAGES
    runs = {}
    for seed in (0, 1, 2):
        pairs = runs[seed] = _pairs(files, pair_filter="similarity", sim_low=LOW, sim_high=HIGH,
                                    seed=seed)
        assert {t[0] for t, _, _ in pairs} == allowed_pages
        for (tp, ti), (cp, ci), _ in pairs:
            assert tp == cp and ti != ci
            # float16 embeddings: allow rounding at the thresholds
            assert LOW - 1e-3 <= sims[tp][ci, ti] <= HIGH + 1e-3
    # Deterministic given the seed; the reconstruction arm keeps the same pages.
    assert _pairs(files, pair_filter="similarity", sim_low=LOW, sim_high=HIGH) == runs[0]
    assert runs[0] != runs[1]  # other seeds, other pairs
    recon = _pairs(files, pair_filter="similarity", sim_low=LOW, sim_high=HIGH,
                   pairing="reconstruction")
    assert {t[0] for t, _, _ in recon} == allowed_pages and all(t == c for t, c, _ in recon)
    # The same shards without the filter: every page with >= 2 images.
    assert len(_pairs(files)) == NUM_PAGES


def test_missing_pair_sim_is_an_error_naming_the_file(cached):
    files = sorted(tf.io.gfile.glob(os.path.join(cached["plain"], "train-*.tfrecord")))
    with pytest.raises(ValueError, match="train-00000-of-00002.tfrecord has no 'pair_sim'"):
        input_pipeline.make_pair_dataset(files, input_pipeline.data_section(
            image_size=16, pair_filter="similarity"), cond_image_size=14, batch_size=2)
    with pytest.raises(ValueError, match="pair_filter"):
        input_pipeline.make_pair_dataset(files, input_pipeline.data_section(
            image_size=16, pair_filter="bogus"), cond_image_size=14, batch_size=2)


def test_label_filters_from_the_config(cached, tmp_path):
    config = helpers.tiny_config(str(tmp_path), 1)
    config.data.train_files = os.path.join(cached["plain"], "train-*.tfrecord")
    config.data.eval_files = config.data.train_files
    config.data.exclude_labels = (1, 2)
    config.data.eval_include_labels = (1, 2)
    train = input_pipeline.create_train_dataset(config, process_index=0, process_count=1,
                                                batch_size=4)
    labels = np.concatenate([b["label"] for b in train.take(20).as_numpy_iterator()])
    assert set(labels.tolist()) == set(range(10)) - {1, 2}
    evals = input_pipeline.create_eval_dataset(config, process_index=0, process_count=1,
                                               batch_size=1)
    labels = [int(b["label"][0]) for b in evals.as_numpy_iterator()]
    assert sorted(set(labels)) == [1, 2] and len(labels) == 6  # pages 1, 2, 11, 12, 21, 22
    config.data.include_labels = (3,)
    train = input_pipeline.create_train_dataset(config, process_index=0, process_count=1,
                                                batch_size=2)
    assert set(np.concatenate([b["label"] for b in train.take(5).as_numpy_iterator()])) == {3}


def test_embeddings_from_the_frozen_encoder(cached, tmp_path):
    """Shards without a token cache are embedded with the config's encoder (tiny, random)."""
    encoder = helpers.tiny_config(str(tmp_path), 1).encoder
    report = similarity.compute(os.path.join(cached["plain"], "train-00000-of-00002.tfrecord"),
                                str(tmp_path / "enc"), encoder_config=encoder)
    assert report["pages"] == NUM_PAGES // 2 and isinstance(report["encoder"], dict)
    (path,) = tf.io.gfile.glob(str(tmp_path / "enc" / "train-*.tfrecord"))
    for record in tf.data.TFRecordDataset(path).take(3).as_numpy_iterator():
        feats = tf.train.Example.FromString(record).features.feature
        n = len(feats["images"].bytes_list.value)
        sim = np.array(feats["pair_sim"].float_list.value).reshape(n, n)
        np.testing.assert_allclose(sim, sim.T, atol=1e-6)
        np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)


def test_tiny_config_variants():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "semantica_tiny", os.path.join(os.path.dirname(__file__), "..", "experiments",
                                       "semantica_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("filter=similarity,sim_low=0.6,sim_high=0.97,exclude_labels=8+9")
    assert c.data.pair_filter == "similarity" and (c.data.sim_low, c.data.sim_high) == (0.6, 0.97)
    assert c.data.exclude_labels == (8, 9) and "_sim" in c.data.train_files
    assert module.get_config("include_labels=3").data.include_labels == (3,)
    assert module.get_config(None).data.pair_filter == "none"
    c = module.get_config("enc_res=112")
    assert c.encoder.image_size == 112 and "img_focus112" in c.data.train_files
    with pytest.raises(ValueError, match="enc_res=30"):
        module.get_config("enc_res=30")
