"""Embedding cache: encoder once over shards -> augmented shards -> pipeline `cond_tokens`.

A tiny random-init ViT (width 32, patch 4, 8 px: 5 tokens) over synthetic page shards, sharded
over the 8 fake CPU devices. The key check: the tokens the pipeline reads for a pair's condition
are the tokens the frozen encoder computes for that pair's `cond` image.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import shards, synthetic
from semantica_jax import cached_tokens, config_lib, embed_cache, image_ops, input_pipeline
from semantica_jax import encoder as encoder_lib

ENC_SIZE = 8
FP16_TOL = 2e-3  # tokens are stored as float16 (values here are O(1))


def _config(train_files: str, **encoder):
    c = config_lib.default_config()
    c.batch_size = 6
    c.data.train_files = train_files
    c.data.image_size = 8
    c.data.shuffle_buffer = 16
    c.encoder.size = "tiny"
    c.encoder.patch_size = 4
    c.encoder.image_size = ENC_SIZE
    c.encoder.allow_random_init = True
    c.encoder.cached_tokens = True
    for key, value in encoder.items():
        setattr(c.encoder, key, value)
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    src = root / "pages"
    synthetic.write_synthetic_shards(src, num_pages=10, num_shards=2, images_per_page=(2, 4),
                                     image_size=16)
    out = str(root / "tokens")
    config = _config(str(src / "*.tfrecord"))
    result = embed_cache.build_cache(config.encoder, config.data.train_files, out, batch_size=8)
    return {"src": str(src), "out": out, "config": config, "result": result}


@pytest.fixture(scope="module")
def encode(cache):
    """The same frozen encoder (same seeded random init), unsharded, jitted."""
    enc = encoder_lib.FrozenEncoder.from_config(cache["config"].encoder)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    with jax.set_mesh(mesh):
        params = enc.load_params(mesh, config_lib.DEFAULT_AXIS_RULES)
    params = jax.device_get(params)
    return jax.jit(lambda x: enc.encode(params, x))


def test_cache_mirrors_the_shards(cache):
    result, out, src = cache["result"], cache["out"], cache["src"]
    names = sorted(os.listdir(src))
    assert sorted(result["written"]) == names and result["skipped"] == []
    assert result["token_shape"] == [1 + 4, 32] and result["pooled_shape"] == [32]
    with open(os.path.join(out, cached_tokens.EMBED_CACHE_STATS)) as f:
        stats = json.load(f)
    assert stats["encoder"] == cached_tokens.cached_tokens_identity(cache["config"].encoder)
    assert sum(e["records"] for e in stats["files"].values()) == 10
    for name in names:
        before = list(shards.read_pages(os.path.join(src, name)))
        after = list(shards.read_pages(os.path.join(out, name)))
        assert before == after  # same records, same order, original features untouched
        assert stats["files"][name]["images"] == sum(len(p["images"]) for p in before)


def test_cached_tokens_are_the_encoders_tokens(cache, encode):
    """Every image of a page: the stored blob == the encoder on the pipeline's resize of it."""
    import tensorflow as tf

    name = sorted(os.listdir(cache["src"]))[0]
    for record in tf.data.TFRecordDataset(os.path.join(cache["out"], name)).take(3):
        example = tf.train.Example.FromString(record.numpy()).features.feature
        blobs = example["tokens"].bytes_list.value
        images = [image_ops.resize(image_ops.decode(b), ENC_SIZE).numpy()
                  for b in example["images"].bytes_list.value]
        assert len(blobs) == len(images) == len(example["pooled"].bytes_list.value)
        tokens, pooled = encode(jnp.asarray(np.stack(images)))
        for i, blob in enumerate(blobs):
            stored = np.frombuffer(blob, "<f2").reshape(5, 32).astype(np.float32)
            np.testing.assert_allclose(stored, tokens[i], atol=FP16_TOL, rtol=1e-3)
            stored_pooled = np.frombuffer(example["pooled"].bytes_list.value[i], "<f2")
            np.testing.assert_allclose(stored_pooled, pooled[i], atol=FP16_TOL, rtol=1e-3)


@pytest.mark.parametrize("pairing", ["pairs", "reconstruction"])
def test_pipeline_emits_the_cond_images_tokens(cache, encode, pairing):
    config = _config(os.path.join(cache["out"], "*.tfrecord"))
    config.data.pairing = pairing
    ds = input_pipeline.create_train_dataset(config, process_index=0, process_count=1, batch_size=6)
    batch = next(ds.as_numpy_iterator())
    assert batch["cond_tokens"].shape == (6, 5, 32) and batch["cond_tokens"].dtype == np.float32
    assert batch["cond_pooled"].shape == (6, 32)
    assert batch["cond"].shape == (6, ENC_SIZE, ENC_SIZE, 3)  # images are still emitted
    tokens, pooled = encode(jnp.asarray(batch["cond"]))
    np.testing.assert_allclose(batch["cond_tokens"], tokens, atol=FP16_TOL, rtol=1e-3)
    np.testing.assert_allclose(batch["cond_pooled"], pooled, atol=FP16_TOL, rtol=1e-3)
    if pairing == "reconstruction":
        np.testing.assert_array_equal(batch["cond_index"], batch["target_index"])
    else:
        assert np.all(batch["cond_index"] != batch["target_index"])


def test_rerun_skips_complete_files(cache):
    again = embed_cache.build_cache(cache["config"].encoder, cache["config"].data.train_files,
                                    cache["out"], batch_size=8)
    assert again["written"] == [] and sorted(again["skipped"]) == sorted(os.listdir(cache["src"]))
    assert again["seconds"] == 0.0


def test_another_encoder_is_refused(cache):
    other = _config(cache["config"].data.train_files, init_seed=99)
    with pytest.raises(ValueError, match=r"records another encoder \(fields \['init_seed'\]"):
        embed_cache.build_cache(other.encoder, other.data.train_files, cache["out"])
    other.data.train_files = os.path.join(cache["out"], "*.tfrecord")
    with pytest.raises(ValueError, match=r"another encoder than config.encoder \(init_seed: cache 1234 vs config 99\)"):
        input_pipeline.create_train_dataset(other, process_index=0, process_count=1, batch_size=6)


def test_uncached_shards_raise_naming_the_file(cache):
    files = input_pipeline.list_shard_files(os.path.join(cache["src"], "*.tfrecord"))
    with pytest.raises(ValueError, match=rf"{files[0]} has no cached encoder tokens"):
        input_pipeline.make_pair_dataset(files, input_pipeline.data_section(image_size=8),
                                         cond_image_size=ENC_SIZE, batch_size=2, cached_tokens=True)
    with pytest.raises(ValueError, match=r"is a source directory"):
        embed_cache.build_cache(cache["config"].encoder, cache["config"].data.train_files,
                                cache["src"])
