"""Export, samplers, the eval job and `vary` on a tiny trained model (8 fake devices).

One short training run (checkpoints at steps 5 and 10) is shared by the module; everything else
restores from it: exports, restores on fewer devices, the eval job (killed and resumed), vary.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from semantica_jax import config_lib, export, images, sampling, train, vary
from semantica_jax.evaluation import fewshot, job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_config(data_dir, cache_dir):
    c = helpers.tiny_config(data_dir, 10)
    c.train.checkpoint_every = 5
    c.train.eval_every = 0
    c.train.async_checkpointing = False
    c.eval.group_by = "page"
    c.eval.shots = 1
    c.eval.samples_per_condition = 2
    c.eval.num_steps = 3
    c.eval.batch_size = 16
    c.eval.extractor_resolution = 32
    c.eval.memorization_images = 16
    c.eval.grid_groups = 4
    c.eval.cache_dir = cache_dir
    c.eval.poll_seconds = 0.5
    c.eval.idle_timeout_seconds = 0.0
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = helpers.write_pages(str(tmp_path_factory.mktemp("pages")))
    workdir = str(tmp_path_factory.mktemp("workdir"))
    cache_dir = str(tmp_path_factory.mktemp("feature_cache"))
    config = eval_config(data_dir, cache_dir)
    outcome = train.train_and_evaluate(config, workdir)
    assert outcome.summary["step"] == 10
    return config, workdir, outcome


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, workdir, _ = trained
    out = str(tmp_path_factory.mktemp("exports") / "step10")
    return export.export_checkpoint(workdir, out, raw=True)


def _settings(**kw):
    return sampling.SamplerSettings(**{"sampler": "ddim", "num_steps": 3, **kw})


def _conds(n, size=14, seed=0):
    return np.random.RandomState(seed).rand(n, size, size, 3).astype(np.float32)


# ------------------------------------------------------------------------------------ export
def test_export_is_self_describing_and_holds_the_ema_params(trained, exported):
    _, _, outcome = trained
    info = json.load(open(os.path.join(exported, "export.json")))
    assert info["format"] == export.FORMAT and info["step"] == 10
    assert info["items"] == ["ema", "raw"]
    assert info["encoder"]["weights"] == "" and info["encoder"]["init_seed"] == 1234
    assert info["num_params"] == sum(x.size for x in jax.tree.leaves(outcome.state.ema_params))
    assert not os.path.exists(os.path.join(exported, "params", "opt_state"))
    model = export.load_export(exported, items=("ema", "raw"))
    for got, want in zip(jax.tree.leaves(model.ema_params), jax.tree.leaves(outcome.state.ema_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(model.params["raw"]), jax.tree.leaves(outcome.state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert model.mesh.shape["data"] == 8  # restored data-parallel over every device here


def test_export_on_fewer_devices_gives_the_same_samples(exported):
    cond, keys = _conds(6), sampling.sample_keys(3, np.arange(6))
    m8 = export.load_export(exported)
    a = m8.sampler(batch_size=8).generate(m8.ema_params, m8.encoder_params(), cond, keys, _settings())
    m2 = export.load_export(exported, devices=jax.devices()[:2])
    assert m2.mesh.shape["data"] == 2
    order = np.array([4, 2, 0, 5, 1, 3])  # other chunks, other batch neighbours, other devices
    b = m2.sampler(batch_size=4).generate(m2.ema_params, m2.encoder_params(), cond[order], keys[order], _settings())
    assert a.shape == (6, 16, 16, 3) and np.all(np.abs(a) <= 1.0)
    np.testing.assert_allclose(b, a[order], atol=1e-5)


def test_sampler_is_seeded_and_settings_matter(exported):
    m = export.load_export(exported)
    s, enc = m.sampler(batch_size=8), m.encoder_params()
    cond = _conds(4)
    k0, k1 = sampling.sample_keys(0, np.arange(4)), sampling.sample_keys(1, np.arange(4))
    ddpm = _settings(sampler="ddpm")
    a = s.generate(m.ema_params, enc, cond, k0, ddpm)
    np.testing.assert_array_equal(a, s.generate(m.ema_params, enc, cond, k0, ddpm))
    assert np.abs(a - s.generate(m.ema_params, enc, cond, k1, ddpm)).max() > 1e-3
    assert np.abs(a - s.generate(m.ema_params, enc, cond, k0, _settings())).max() > 1e-3
    guided = s.generate(m.ema_params, enc, cond, k0, _settings(sampler="ddpm", guidance_scale=3.0))
    assert np.abs(a - guided).max() > 1e-3
    # Guidance restricted to an interval no step falls in = no guidance.
    off = s.generate(m.ema_params, enc, cond, k0, _settings(sampler="ddpm", guidance_scale=3.0,
                                                            guidance_interval=(0.0, 0.01)))
    np.testing.assert_allclose(off, a, atol=1e-5)
    with pytest.raises(ValueError, match="sampler"):
        _settings(sampler="euler")


def test_export_errors_name_the_problem(trained, exported, tmp_path):
    with pytest.raises(export.ExportError, match="does not exist"):
        export.load_export(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "export.json").write_text("{}")
    with pytest.raises(export.ExportError, match="config.json is missing"):
        export.load_export(str(broken))
    # A config that does not match the params (another model size) fails the restore, by name.
    import shutil

    other = tmp_path / "other"
    shutil.copytree(exported, other)
    cfg = json.load(open(other / "config.json"))
    cfg["model"]["channels"] = [8, 16]
    json.dump(cfg, open(other / "config.json", "w"))
    with pytest.raises(export.ExportError, match="could not restore .*other/params"):
        export.load_export(str(other))
    cfg["model"]["chanels"] = 3
    json.dump(cfg, open(other / "config.json", "w"))
    with pytest.raises(export.ExportError, match=r"unknown config key\(s\) \['model.chanels'\]"):
        export.load_export(str(other))
    _, workdir, _ = trained
    with pytest.raises(export.ExportError, match="no checkpoint for step 7"):
        export.export_checkpoint(workdir, str(tmp_path / "x"), step=7)
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_checkpoint(workdir, exported)


# ------------------------------------------------------------------------------------ vary
def test_vary_writes_a_grid_and_rejects_bad_inputs(exported, tmp_path, capsys):
    import tensorflow as tf

    rng = np.random.RandomState(0)
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    png.write_bytes(tf.io.encode_png(rng.randint(0, 255, (40, 30, 4), np.uint8)).numpy())  # RGBA, not square
    jpg.write_bytes(tf.io.encode_jpeg(rng.randint(0, 255, (20, 20, 1), np.uint8)).numpy())  # grey
    out = tmp_path / "grid.png"
    rc = vary.main(["--export", exported, "--image", str(png), str(jpg), "--num", "3", "--steps", "2",
                    "--seed", "0", "--out", str(out)])
    assert rc == 0
    grid = tf.io.decode_png(out.read_bytes()).numpy()
    want = images.variation_grid(np.zeros((2, 16, 16, 3)), np.zeros((6, 16, 16, 3)), 3, 16,
                                 row_labels=["a.png", "b.jpg"])
    assert grid.shape == want.shape  # two rows of 16 px images, upscaled, labelled by file name
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    capsys.readouterr()
    assert vary.main(["--export", exported, "--image", str(not_image), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("semantica-vary: error:") and "notes.txt" in err and "\n" not in err
    assert vary.main(["--export", str(tmp_path / "missing"), "--image", str(png), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert vary.main(["--export", exported, "--image", str(png), "--num", "0", "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------ protocol
def test_copies_score_as_copies():
    """A 'model' returning its condition: zero pixel distance, consistency 1, zero diversity."""
    rng = np.random.RandomState(0)
    n = 12
    es = fewshot.EvalSet(images=rng.rand(n, 4, 4, 3).astype(np.float32) * 2 - 1,
                         cond_images=np.zeros((n, 2, 2, 3), np.float32), groups=np.repeat(np.arange(3), 4),
                         group_names=["a", "b", "c"], labels=np.repeat(np.arange(3), 4).astype(np.int32),
                         files=[], skipped_images=0)
    plan = fewshot.make_plan(es, shots=1, samples_per_condition=2, seed=0)
    assert len(plan.cond_rows) == 3 and all(len(r) == 3 for r in plan.real_rows)
    feats = rng.randn(n, 8) + 3 * es.labels[:, None]
    samples = np.repeat(es.images[plan.cond_rows], 2, axis=0)
    gen_feats = np.repeat(feats[plan.cond_rows], 2, axis=0)
    probe, acc = fewshot.fit_probe(feats, es.labels, 0)
    pixel_probe, _ = fewshot.fit_probe(fewshot.pixel_features(es.images), es.labels, 0)
    assert fewshot.pixel_features(es.images).shape == (n, 16)  # grey 4x4
    assert fewshot.pixel_features(np.zeros((2, 64, 64, 3))).shape == (2, 32 * 32)  # area-resized to 32
    out = fewshot.compute_metrics(eval_set=es, plan=plan, real_feats=feats, gen_feats=gen_feats, samples=samples,
                                  prdc_k=2, seed=0, probe=probe, pixel_probe=pixel_probe, train_feats=feats,
                                  real_nn=1.0)
    assert out["pixel_distance_to_condition"] == pytest.approx(0.0, abs=1e-6)
    assert out["consistency"] == pytest.approx(1.0)
    assert out["diversity"] == pytest.approx(0.0, abs=1e-9)
    assert out["pixel_diversity"] == pytest.approx(0.0, abs=1e-9)
    assert out["class_consistency"] == 1.0
    assert out["class_consistency_pixels"] == 1.0  # copies of (separable) real images
    assert all(e["class_consistency_pixels"] == 1.0 for e in out["per_group"])
    assert out["nearest_train_distance"] == pytest.approx(0.0, abs=1e-6)  # they ARE training images
    assert out["fewshot_groups_scored"] == 3 and len(out["per_group"]) == 3


def test_probe_cache_round_trips(tmp_path):
    """A cached probe predicts exactly as the fitted one; another key (labels, settings) refits."""
    rng = np.random.RandomState(1)
    labels = np.repeat(np.arange(3), 10).astype(np.int32)
    feats = rng.randn(30, 5) + 2 * labels[:, None]
    cache = fewshot.FeatureCache(str(tmp_path))
    calls = []

    def feats_fn():
        calls.append(1)
        return feats

    p1, a1 = cache.get_or_fit_probe({"k": 1}, feats_fn, labels, 0)
    p2, a2 = cache.get_or_fit_probe({"k": 1}, feats_fn, labels, 0)
    assert len(calls) == 1 and a1 == a2 and 0.5 < a1 <= 1.0
    np.testing.assert_array_equal(p1.logits(feats), p2.logits(feats))
    assert p2.converged == p1.converged and list(p2.classes) == [0, 1, 2]
    cache.get_or_fit_probe({"k": 1}, feats_fn, labels[::-1].copy(), 0)  # other labels: refit
    assert len(calls) == 2


# ------------------------------------------------------------------------------------ the eval job
def _write_config_file(tmp_path, config) -> str:
    path = tmp_path / "eval_config.py"
    path.write_text(
        "import ml_collections\n"
        f"def get_config():\n    return ml_collections.ConfigDict({config.to_dict()!r})\n")
    return str(path)


def test_eval_job_resumes_after_kill_without_redoing_checkpoints(trained, tmp_path):
    config, workdir, _ = trained
    cfg_file = _write_config_file(tmp_path, config)
    eval_dir = os.path.join(workdir, "eval")
    # The job starts while only checkpoint 5 exists: it evaluates it, then waits for step 10 (the
    # last train step), and is killed while waiting -- deterministically before step 10.
    later = os.path.join(workdir, "checkpoints", "10")
    hidden = str(tmp_path / "ckpt_10")
    shutil.move(later, hidden)
    cmd = [sys.executable, "-m", "semantica_jax.main", "--mode=eval", f"--config={cfg_file}",
           f"--workdir={workdir}", "--config.eval.idle_timeout_seconds=600"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests"))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = os.path.join(eval_dir, "step_5.json")
    progress_file = os.path.join(eval_dir, "progress.json")

    def step_5_recorded():
        try:
            return "step_5" in json.load(open(progress_file))["done"]
        except (OSError, ValueError):
            return False

    try:
        deadline = time.time() + 300
        while not step_5_recorded() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert step_5_recorded(), proc.communicate()[0].decode()[-3000:]
        assert proc.poll() is None  # still waiting for checkpoint 10
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        shutil.move(hidden, later)
    progress = json.load(open(progress_file))["done"]
    assert "step_5" in progress and "step_10" not in progress and os.path.exists(first)
    stamp = os.stat(first).st_mtime_ns

    results = job.run_eval_job(config, workdir, once=True)  # the restarted job
    assert [r["tag"] for r in results] == ["step_10"]  # step 5 is not redone
    assert os.stat(first).st_mtime_ns == stamp
    r = json.load(open(os.path.join(eval_dir, "step_10.json")))
    numbers = r["by_guidance"]["1"]
    for key in ("fd", "precision", "recall", "density", "coverage", "consistency", "diversity",
                "pixel_diversity", "pixel_diversity_real", "memorization_ratio", "per_group",
                "class_consistency_judge"):
        assert key in numbers, key
    assert 0.0 <= r["judge_accuracy_real"] <= 1.0  # the judge, trained on the train split's pages
    assert "class-consistency (class judge" in job.headline(r)
    assert numbers["num_generated"] == 16 * 1 * 2  # 16 eval pages x 1 shot x 2 samples
    assert os.path.exists(numbers["grid"])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(eval_dir))
    # Nothing left to do: a third run evaluates nothing; the reference features came from the cache.
    assert job.run_eval_job(config, workdir, once=True) == []
    # eval-set and training-image features + the two linear probes (features, pixels) + the judge
    assert len(os.listdir(config.eval.cache_dir)) == 5


def test_eval_job_on_an_export_and_bad_config(trained, exported, tmp_path):
    config, _, _ = trained
    wd = str(tmp_path / "export_eval")
    config = config_lib.config_from_dict(config.to_dict(), where="test")
    config.eval.guidance_scales = (1.0, 2.0)
    results = job.run_eval_job(config, wd, export_dir=exported)
    assert results[0]["tag"] == "export_step_10" and set(results[0]["by_guidance"]) == {"1", "2"}
    assert "guidance 2" in job.summary_table(results[0])
    config.eval.group_by = "site"
    with pytest.raises(ValueError, match="group_by='site'"):
        job.run_eval_job(config, str(tmp_path / "x"), export_dir=exported)
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        job.run_eval_job(config, str(tmp_path / "y"), export_dir=str(tmp_path / "nope"))
    config.eval.group_by = "page"
    config.eval.judge_files = config.data.eval_files  # the judge must never see the eval split
    with pytest.raises(config_lib.ConfigError, match="overlap the eval files"):
        job.run_eval_job(config, str(tmp_path / "z"), export_dir=exported)
