"""Faults and what survives them: preemption, kill -9 (also mid-save), exact resume, topology
change, config drift, bad configs, divergence. Subprocesses where a real signal is needed."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from semantica_jax import checkpointing, config_lib, sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = 12


def rel_config(data_dir, num_steps=STEPS, **train_overrides):
    c = helpers.tiny_config(data_dir, num_steps, eval_split=False, channels=(8, 16))
    c.train.checkpoint_every = 2
    c.train.log_every = 2
    c.train.record_data_ids = True
    c.train.async_checkpointing = True
    c.train.max_to_keep = 10
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return helpers.write_pages(str(tmp_path_factory.mktemp("pages")), eval_split=False)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, train.train_and_evaluate(rel_config(data_dir), workdir)


def _config_file(tmp_path, data_dir) -> str:
    path = tmp_path / "rel_config.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "import test_reliability\n"
        f"def get_config(arg=None):\n    return test_reliability.rel_config({data_dir!r}, int(arg or {STEPS}))\n"
    )
    return str(path)


def _start(config_file, workdir, log):
    return subprocess.Popen(
        [sys.executable, "-m", "semantica_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )


def _wait_for(predicate, proc, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError("condition not reached")


def _ids(workdir):
    with open(os.path.join(workdir, "data_ids", "process_0.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def _assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kill9_mid_save_then_sigterm_then_resume_is_exact(uninterrupted, data_dir, tmp_path):
    """kill -9 while an async save is being written, restart, SIGTERM, restart: the final state and
    the sequence of pairs seen equal an uninterrupted run's, bitwise."""
    ref_dir, ref = uninterrupted
    workdir = str(tmp_path / "faulty")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    config_file = _config_file(tmp_path, data_dir)

    # 1. kill -9 the moment the second save's temporary directory appears.
    def second_save_in_flight():
        if not os.path.isdir(ckpt_dir):
            return False
        names = os.listdir(ckpt_dir)
        return "2" in names and any(not n.isdigit() for n in names)

    with open(tmp_path / "run1.log", "w") as log:
        proc = _start(config_file, workdir, log)
        hit = _wait_for(second_save_in_flight, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert hit, open(tmp_path / "run1.log").read()[-3000:]
    leftovers = [n for n in os.listdir(ckpt_dir) if not n.isdigit()]
    committed = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    assert 2 in committed
    ckpt = checkpointing.Checkpointer(ckpt_dir)
    latest = ckpt.latest_step()
    ckpt.close()
    assert latest == max(committed), "latest_step must be a committed checkpoint"
    # The partial save is invisible (it was caught mid-write unless the rename won the race).
    assert leftovers or latest >= 4

    # 2. Restart; SIGTERM after the next checkpoint: it saves the current step and exits 0.
    with open(tmp_path / "run2.log", "w") as log:
        proc = _start(config_file, workdir, log)
        _wait_for(lambda: any(int(n) > latest for n in os.listdir(ckpt_dir) if n.isdigit()), proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=240)
    out = open(tmp_path / "run2.log").read()
    assert rc == 0, out[-3000:]
    assert f"Resumed from checkpoint {ckpt_dir} at step {latest}" in out
    assert "Preempted: checkpoint for step" in out, out[-3000:]
    # Quiet by default: the project's lines show, Orbax's save internals (INFO) do not; its
    # warnings (e.g. "Waiting for previous save to complete took ...") still reach the user.
    orbax_info = [ln for ln in out.splitlines() if ln.startswith("I")
                  and ("checkpoint_manager.py" in ln or "async_checkpointer.py" in ln)]
    assert not orbax_info, orbax_info

    # 3. Resume in-process to the end and compare with the uninterrupted run.
    resumed = train.train_and_evaluate(rel_config(data_dir), workdir)
    assert 0 < resumed.start_step < STEPS
    assert int(resumed.state.step) == STEPS
    _assert_same_state(ref.state, resumed.state)
    ref_ids, got_ids = _ids(ref_dir), _ids(workdir)
    assert [r["step"] for r in got_ids] == list(range(1, STEPS + 1))
    assert got_ids == ref_ids  # no pair repeated, none skipped


def test_topology_change_restore(uninterrupted, data_dir):
    """A checkpoint written on a (4, 2) mesh of 8 devices restores onto 4 and 2 devices and other
    mesh shapes with equal values."""
    ref_dir, ref = uninterrupted
    ckpt = checkpointing.Checkpointer(os.path.join(ref_dir, "checkpoints"))
    for n, mesh_shape in ((4, (2, 2, 1)), (4, (1, 4, 1)), (2, (2, 1, 1)), (2, (1, 1, 2))):
        c = rel_config(data_dir)
        c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh_shape
        mesh = sharding.create_mesh(c.mesh, jax.devices()[:n])
        trainer = train.build_trainer(c, mesh)
        restored = ckpt.restore(STEPS, trainer.abstract_state)
        leaves = jax.tree.leaves(restored.params)
        assert all(len(x.sharding.device_set) == n for x in leaves)
        _assert_same_state(ref.state, restored)
    ckpt.close()


def test_config_drift_is_refused_naming_keys(uninterrupted, data_dir):
    ref_dir, _ = uninterrupted
    saved = json.load(open(os.path.join(ref_dir, "config.json")))
    where = "ckpt/12"
    c = rel_config(data_dir)
    c.model.channels = (8, 32)
    with pytest.raises(ValueError, match=r"model\.channels: \[8, 16\] -> \[8, 32\].*new workdir"):
        checkpointing.check_config_compatible(saved, c, where=where, allow_change=True)
    c = rel_config(data_dir)
    c.optimizer.learning_rate = 5e-4
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate.*allow_config_change"):
        checkpointing.check_config_compatible(saved, c, where=where, allow_change=False)
    assert checkpointing.check_config_compatible(saved, c, where=where, allow_change=True) == [
        "optimizer.learning_rate"]
    c = rel_config(data_dir, num_steps=99)  # bookkeeping fields may change freely
    c.mesh.data, c.mesh.fsdp = 8, 1
    assert checkpointing.check_config_compatible(saved, c, where=where, allow_change=False) == []
    # Through the trainer: refused before anything is restored or compiled.
    c = rel_config(data_dir)
    c.model.channels = (8, 32)
    with pytest.raises(config_lib.ConfigError, match="model.channels"):
        train.train_and_evaluate(c, ref_dir)


@pytest.mark.parametrize("change, culprit", [
    (lambda c: setattr(c, "batch_size", 12), "config.batch_size=12"),
    (lambda c: setattr(c.data, "image_size", 20), "20"),
    (lambda c: setattr(c.data, "train_files", "/nonexistent/train-*.tfrecord"), "/nonexistent/train-*.tfrecord"),
    (lambda c: setattr(c.encoder, "image_size", 20), "config.encoder.image_size=20"),
    (lambda c: setattr(c.mesh, "data", 3), "config.mesh"),
    (lambda c: setattr(c.data, "pairing", "triplets"), "triplets"),
])
def test_bad_configs_fail_in_one_line_before_compiling(data_dir, tmp_path, change, culprit):
    c = rel_config(data_dir)
    change(c)
    with pytest.raises(config_lib.ConfigError) as e:
        train.train_and_evaluate(c, str(tmp_path / "w"))
    assert culprit in str(e.value)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_main_reports_config_errors_in_one_line(data_dir, tmp_path):
    config_file = _config_file(tmp_path, data_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "semantica_jax.main", f"--config={config_file}",
         f"--workdir={tmp_path / 'w'}", "--config.batch_size=12"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("semantica: error:")]
    assert len(errors) == 1 and "config.batch_size=12" in errors[0]
    proc = subprocess.run(
        [sys.executable, "-m", "semantica_jax.main", f"--config={config_file}",
         f"--workdir={tmp_path / 'w'}", "--config.batch_size=many"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "batch_size" in proc.stderr


def test_failed_restore_raises_and_never_starts_fresh(uninterrupted, data_dir, tmp_path):
    ref_dir, _ = uninterrupted
    workdir = tmp_path / "corrupt"
    import shutil

    shutil.copytree(ref_dir, workdir)
    state_dir = workdir / "checkpoints" / str(STEPS) / "state"
    for root, _, files in os.walk(state_dir):  # corrupt every array file of the latest step
        for f in files:
            if not f.startswith("_"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(8)
    with pytest.raises(checkpointing.RestoreError, match=str(workdir / "checkpoints" / str(STEPS))):
        train.train_and_evaluate(rel_config(data_dir), str(workdir))


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_divergence(data_dir, tmp_path, mode):
    c = rel_config(data_dir, num_steps=4, nonfinite=mode, checkpoint_every=1, log_every=4)
    c.optimizer.learning_rate = 1e30  # params blow up after the first update
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0
    workdir = str(tmp_path / mode)
    if mode == "raise":
        with pytest.raises(train.NonFiniteLossError, match=r"at step 2 .*last good checkpoint: 1"):
            train.train_and_evaluate(c, workdir)
    else:
        out = train.train_and_evaluate(c, workdir)
        assert out.summary["skipped_steps"] == 3
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out.state.params))


def test_write_json_replaces_whole_files_locally_and_on_tf_filesystems(tmp_path):
    """Atomic JSON writes: the target holds the old or the new content, no temporary file is left,
    and paths with a scheme go through tf.io.gfile (TensorFlow's in-memory ram:// filesystem here)."""
    import tensorflow as tf

    from semantica_jax import fileio

    path = str(tmp_path / "sub" / "status.json")
    fileio.write_json(path, {"step": 1})
    fileio.write_json(path, {"step": 2, "loss": float("nan")})
    assert json.load(open(path))["step"] == 2 and os.listdir(tmp_path / "sub") == ["status.json"]
    remote = f"ram://{tmp_path.name}/eval/result.json"
    fileio.write_json(remote, {"x": np.float32(0.5)}, default=float)
    with tf.io.gfile.GFile(remote) as f:
        assert json.load(f) == {"x": 0.5}
    assert tf.io.gfile.listdir(os.path.dirname(remote)) == ["result.json"]


def test_data_ids_log_keeps_covered_steps_and_drops_a_cut_line(tmp_path):
    """On resume the pair-id log keeps the lines the restored step covers (rewritten atomically),
    drops the later ones and a last line cut by a kill mid-write, then appends."""
    path = tmp_path / "data_ids" / "process_0.jsonl"
    path.parent.mkdir()
    rows = [json.dumps({"step": s, "page_hash": [s]}) + "\n" for s in range(1, 6)]
    path.write_text("".join(rows) + '{"step": 6, "page_h')
    log = checkpointing.DataIdsLog(str(tmp_path), 0, start_step=3)
    log.write(4, {k: np.array([40]) for k in ("page_hash", "cond_index", "target_index")})
    log.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert os.listdir(path.parent) == ["process_0.jsonl"]
