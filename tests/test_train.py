"""End to end: synthetic page shards -> tf.data pairs -> frozen ViT -> UNet, on a (4, 2) mesh.

One short overfit run (sharded params, TensorBoard events, checkpoint, grid, eval) is shared by the
tests below through a module fixture; a second run in the same workdir must resume from it.
"""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

import helpers
from semantica_jax import checkpointing, config_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, num_steps: int):
    c = helpers.tiny_config(data_dir, num_steps)
    # x-prediction with the x-space loss (the paper's objective): an overfit shows within a few
    # dozen steps, where v-loss at high SNR first needs the identity-like denoising map.
    c.diffusion.prediction = "x"
    c.diffusion.loss_weighting = "x"
    c.optimizer.learning_rate = 3e-3
    c.train.sample_every = 1000  # a grid at the last step only
    c.train.async_checkpointing = True
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return helpers.write_pages(str(tmp_path_factory.mktemp("pages")))


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("workdir"))
    config = tiny_config(data_dir, num_steps=40)
    outcome = train.train_and_evaluate(config, workdir)
    return config, workdir, outcome


def _scalars(workdir, tag):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def test_params_are_sharded_over_the_mesh(first_run):
    _, _, outcome = first_run
    leaves = jax.tree.leaves(outcome.state.params)
    assert all(len(x.sharding.device_set) == 8 for x in leaves)
    specs = [x.sharding.spec for x in leaves]
    assert any("fsdp" in jax.tree.leaves(tuple(s)) for s in specs), specs
    # A sharded parameter really is split: its shards are smaller than the array.
    split = [x for x in leaves if x.addressable_shards[0].data.size < x.size]
    assert split, "no parameter is split across devices"


def test_loss_finite_and_decreasing(first_run):
    _, workdir, outcome = first_run
    losses = _scalars(workdir, "train/loss")
    assert [s for s, _ in losses] == list(range(5, 41, 5))
    values = np.array([v for _, v in losses])
    assert np.all(np.isfinite(values))
    assert values[-2:].mean() < 0.7 * values[:2].mean(), values
    for tag in ("train/grad_norm", "train/learning_rate", "train/examples_per_sec", "eval/loss"):
        assert _scalars(workdir, tag), f"missing TensorBoard scalar {tag}"
    assert np.isfinite(outcome.summary["eval_loss"])


def test_run_leaves_checkpoint_grid_and_metrics(first_run):
    config, workdir, outcome = first_run
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [20, 40]
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["channels"] == [16, 32]
    grids = glob.glob(os.path.join(workdir, "samples", "*.png"))
    assert [os.path.basename(g) for g in grids] == ["step_0000040.png"]
    img = tf.io.decode_png(tf.io.read_file(grids[0])).numpy()
    # 2 rows of (condition + 2 samples) at 16 px, with padding.
    assert img.shape[0] > 2 * 16 and img.shape[1] > 3 * 16 and img.shape[2] == 3
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["step"] == 40 and metrics["start_step"] == 0


def test_restore_gives_identical_state_and_resume_continues(first_run, data_dir):
    config, workdir, outcome = first_run
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 40
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), outcome.state)
    restored = ckpt.restore(40, target)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(outcome.state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    resumed = train.train_and_evaluate(tiny_config(data_dir, num_steps=42), workdir)
    assert resumed.start_step == 40
    assert int(resumed.state.step) == 42
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))[-1] == 42
    # Nothing left to train: metrics.json stays strict JSON (no NaN loss).
    again = train.train_and_evaluate(tiny_config(data_dir, num_steps=42), workdir)
    assert again.start_step == 42 and again.summary["train_loss"] is None
    json.loads(open(os.path.join(workdir, "metrics.json")).read(),
               parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))


def test_failed_restore_raises_naming_the_path(first_run, tmp_path):
    _, _, outcome = first_run
    bad = tmp_path / "ckpts"
    ckpt = checkpointing.Checkpointer(str(bad))
    ckpt.save(3, {"w": np.zeros(3, np.float32)}, config_lib.default_config(), force=True)
    ckpt.close()
    ckpt = checkpointing.Checkpointer(str(bad))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), outcome.state)
    with pytest.raises(checkpointing.RestoreError, match=str(bad / "3")):
        ckpt.restore(3, target)


def test_main_rejects_unknown_config_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "semantica_jax.main",
         f"--config={REPO}/experiments/semantica_tiny.py:runlocal", f"--workdir={tmp_path}",
         "--config.model.chanels=3"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode != 0
    assert "chanels" in proc.stderr


def test_experiment_configs_build_and_reject_unknown_variants():
    import importlib.util

    for name in ("semantica_tiny", "semantica_base"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config("runlocal")
        assert c.train.num_steps <= 6
        # config_lib.smoke_overrides: a resume point before the end, the cheapest eval
        assert c.train.checkpoint_every < c.train.num_steps and c.eval.shots == 1
        with pytest.raises(ValueError, match="unknown variant"):
            mod.get_config("runlocal,bogus=1")
