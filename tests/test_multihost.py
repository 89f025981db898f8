"""The pod code path, executed: 2 real JAX processes x 2 fake CPU devices on this machine
(coordinator on 127.0.0.1, gloo collectives), started the way launch/local_multihost.sh starts
them, train, checkpoint, preempt, die, resume, export and evaluate like a 2-host job.

One uninterrupted 2-process run (launch/local_multihost.sh) is the module's reference; the fault
run, the 1-process restore and the 1-process export/eval are compared with it.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from semantica_jax import checkpointing, export, input_pipeline, train
from semantica_jax.evaluation import job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = 12
NPROC, NDEV = 2, 2
LOCAL_BATCH = 8  # global batch 16 over 2 processes
HEARTBEAT_S = 10  # SEMANTICA_HEARTBEAT_TIMEOUT_SECONDS: how soon survivors learn of a death
FAIL_FAST_S = 120  # a survivor must have exited by then


def mh_config(data_dir, cache_dir, num_steps=STEPS, devices=NPROC * NDEV):
    """The test config on `devices` devices: 4 train shards and 2 eval shards (2 and 1 per process)."""
    c = helpers.tiny_config(data_dir, num_steps, channels=(8, 16))
    c.mesh.data, c.mesh.fsdp = devices // 2, 2
    c.train.checkpoint_every = 2
    c.train.log_every = 2
    c.train.eval_every = 6
    c.train.eval_batches = 0  # the whole eval split: its loop must end on both processes together
    c.train.sample_every = STEPS  # a grid at the end: batch-sharded samples gathered on every process
    c.train.record_data_ids = True
    c.train.async_checkpointing = True
    c.train.max_to_keep = 10
    c.eval.group_by = "page"
    c.eval.shots = 1
    c.eval.samples_per_condition = 2
    c.eval.num_steps = 3
    c.eval.batch_size = 8
    c.eval.extractor_resolution = 32
    c.eval.memorization_images = 16
    c.eval.grid_groups = 2
    c.eval.cache_dir = cache_dir
    return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data_dir = helpers.write_pages(str(tmp_path_factory.mktemp("pages")))
    cache_dir = str(tmp_path_factory.mktemp("feature_cache"))
    _JAX_CACHE["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    config_file = tmp_path_factory.mktemp("config") / "mh_config.py"
    config_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "import test_multihost\n"
        f"def get_config(arg=None):\n    return test_multihost.mh_config({data_dir!r}, {cache_dir!r})\n"
    )
    return data_dir, cache_dir, str(config_file)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_JAX_CACHE = {}  # the runs share compiled programs (a persistent compilation cache per module)


def _env(**extra) -> dict:
    env = dict(os.environ, SEMANTICA_VENV=sys.prefix, SEMANTICA_HEARTBEAT_TIMEOUT_SECONDS=str(HEARTBEAT_S),
               TF_CPP_MIN_LOG_LEVEL="2", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **_JAX_CACHE)
    env.pop("XLA_FLAGS", None)  # the launcher (or _start) sets 2 devices per process
    env.update(extra)
    return env


def _launcher(config_file, workdir, *flags, timeout=600):
    """launch/local_multihost.sh: 2 processes x 2 devices; returns its output, asserting success."""
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "local_multihost.sh"), config_file, *flags],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=_env(NUM_PROCESSES=str(NPROC), DEVICES_PER_PROCESS=str(NDEV), WORKDIR=workdir,
                 PORT=str(_free_port())),
    )
    logs = "".join(open(os.path.join(workdir, "logs", f"process_{i}.log")).read()[-3000:]
                   for i in range(NPROC) if os.path.exists(os.path.join(workdir, "logs", f"process_{i}.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    return proc.stdout


def _start(config_file, workdir, tag):
    """The 2 processes started directly (as the launcher does), so a test can signal one of them."""
    port = _free_port()
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    procs = []
    for i in range(NPROC):
        log = open(os.path.join(workdir, "logs", f"{tag}_process_{i}.log"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "semantica_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=_env(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES=str(NPROC), JAX_PROCESS_ID=str(i),
                     XLA_FLAGS=f"--xla_force_host_platform_device_count={NDEV}"),
        ))
    return procs


def _log(workdir, tag, i) -> str:
    return open(os.path.join(workdir, "logs", f"{tag}_process_{i}.log")).read()


def _committed(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for(predicate, procs, timeout=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited first (return codes {[p.poll() for p in procs]})")
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _ids(workdir, pid):
    with open(os.path.join(workdir, "data_ids", f"process_{pid}.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def _restore(workdir, step, config):
    """The TrainState of `<workdir>/checkpoints/<step>`, restored here (1 process, 8 devices)."""
    trainer = train.build_trainer(config)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return ckpt.restore(step, trainer.abstract_state), ckpt.restore_data(step)
    finally:
        ckpt.close()


def _assert_same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted 2-process run, through launch/local_multihost.sh."""
    _, _, config_file = setup
    workdir = str(tmp_path_factory.mktemp("reference"))
    out = _launcher(config_file, workdir)
    assert f"{NPROC} processes x {NDEV} devices done" in out
    return workdir


# ------------------------------------------------------------------------------------ 1. data
def test_each_process_reads_its_own_files_and_the_global_batch_joins_them(setup, reference):
    data_dir, cache_dir, _ = setup
    config = mh_config(data_dir, cache_dir)
    files = input_pipeline.list_shard_files(config.data.train_files)
    logs = [open(os.path.join(reference, "logs", f"process_{i}.log")).read() for i in range(NPROC)]
    for i, log in enumerate(logs):
        assert f"process {i} of {NPROC}" in log
        assert "global batch 16, per process 8; 2 train files here" in log
    seen = []
    for pid in range(NPROC):
        # What process `pid` consumed is exactly the stream of its own files (files[pid::2]).
        ds = input_pipeline.create_train_dataset(config, process_index=pid, process_count=NPROC,
                                                 batch_size=LOCAL_BATCH)
        want = [{"step": s, **{k: b[k].tolist() for k in ("page_hash", "cond_index", "target_index")}}
                for s, b in zip(range(1, STEPS + 1), ds.as_numpy_iterator())]
        got = _ids(reference, pid)
        assert got == want
        seen.append({h for row in got for h in row["page_hash"]})
    own = [{int(h) for f in files[pid::NPROC] for h in _page_hashes(f)} for pid in range(NPROC)]
    for pid in range(NPROC):
        assert seen[pid] <= own[pid] and not seen[pid] & own[1 - pid]

    # The global batch is [process 0's local batch; process 1's local batch] along the batch axis.
    probe = (
        "import jax, numpy as np\n"
        "from jax.experimental import multihost_utils\n"
        "from semantica_jax import distributed, sharding\n"
        "distributed.maybe_initialize()\n"
        "import test_multihost\n"
        f"c = test_multihost.mh_config({data_dir!r}, {cache_dir!r})\n"
        "mesh = sharding.create_mesh(c.mesh)\n"
        f"local = np.full(({LOCAL_BATCH},), jax.process_index(), np.int32)\n"
        "g = sharding.make_global_batch({'x': local}, mesh)['x']\n"
        "print('GLOBAL', multihost_utils.process_allgather(g, tiled=True).tolist())\n"
    )
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", probe], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(NPROC),
                 JAX_PROCESS_ID=str(i), XLA_FLAGS=f"--xla_force_host_platform_device_count={NDEV}",
                 PYTHONPATH=TESTS + os.pathsep + REPO))
        for i in range(NPROC)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    want = [0] * LOCAL_BATCH + [1] * LOCAL_BATCH
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert f"GLOBAL {want}" in out, out[-3000:]


def _page_hashes(path):
    from data_pipeline import shards

    return [int(input_pipeline.hash_page_id(p["page_id"]).numpy()) for p in shards.read_pages(path)]


# ------------------------------------------------------------------------------------ 2. checkpoints
def test_checkpoints_commit_once_and_restore_on_one_process(setup, reference, tmp_path):
    data_dir, cache_dir, _ = setup
    ckpt_dir = os.path.join(reference, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == sorted(str(s) for s in range(2, STEPS + 1, 2))  # no temporaries
    positions = []
    for step in range(2, STEPS + 1, 2):  # every process's stream position, all-gathered and saved once
        data = _data(reference, step)
        assert data["process_count"] == NPROC and len(data["positions"]) == NPROC
        assert data["local_batch_size"] == LOCAL_BATCH
        positions.append(data["positions"])
    assert all(b[i] > a[i] for a, b in zip(positions, positions[1:]) for i in range(NPROC))

    # 1 process, 8 devices: the model state restores exactly (the exported EMA params, written by
    # 2 processes, equal a 1-process restore); the pair stream cannot continue (files map to
    # processes differently) and is re-seeded from (seed, step), as docs/RELIABILITY.md says.
    config = mh_config(data_dir, cache_dir, devices=8)
    state, data = _restore(reference, STEPS, config)
    seed, start = checkpointing.resume_data_position(data, config, STEPS, 1, 0)
    assert start == 0 and seed != config.seed
    two = export.load_export(_export_two(setup, reference))
    _assert_same_tree(two.ema_params, state.ema_params)
    workdir = str(tmp_path / "one_process")
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("export*", "eval*"))
    outcome = train.train_and_evaluate(mh_config(data_dir, cache_dir, num_steps=STEPS + 2, devices=8), workdir)
    assert outcome.start_step == STEPS and outcome.summary["step"] == STEPS + 2


def _data(workdir, step):
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return ckpt.restore_data(step)
    finally:
        ckpt.close()


_EXPORTS = {}


def _export_two(setup, reference) -> str:
    """The reference's final checkpoint exported by 2 processes (once per module)."""
    if reference not in _EXPORTS:
        _, _, config_file = setup
        out = os.path.join(reference, "export2")
        _launcher(config_file, reference, "--mode=export", f"--export_dir={out}")
        _EXPORTS[reference] = out
    return _EXPORTS[reference]


# ------------------------------------------------------------------------------------ 3.+4. faults
def test_kill9_fails_fast_sigterm_stops_together_and_resume_is_exact(setup, reference, tmp_path):
    """kill -9 of one process at a random moment: the other exits with an error within a bounded
    time. Restart, SIGTERM to one process: both stop at the same step with a committed checkpoint
    and exit 0. Restart to the end: the final state and every process's pairs equal the
    uninterrupted run's, bitwise."""
    data_dir, cache_dir, config_file = setup
    workdir = str(tmp_path / "faulty")
    seed = int(os.environ.get("SEMANTICA_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    victim, delay = rng.randrange(NPROC), rng.uniform(0.0, 2.0)
    where = f"(SEMANTICA_TEST_SEED={seed}: kill -9 process {victim} {delay:.2f} s after checkpoint 2)"

    # 1. kill -9 one process once the first checkpoint is committed, after a random delay.
    procs = _start(config_file, workdir, "run1")
    try:
        _wait_for(lambda: 2 in _committed(workdir), procs)
        time.sleep(delay)
        procs[victim].send_signal(signal.SIGKILL)
        t_kill = time.time()
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=FAIL_FAST_S)
        waited = time.time() - t_kill
    finally:
        _kill_all(procs)
    out = _log(workdir, "run1", 1 - victim)
    if rc == 0:  # the run finished before the kill landed: nothing to fail
        assert _committed(workdir)[-1] == STEPS, where + out[-3000:]
    else:
        assert waited < FAIL_FAST_S, where
        assert any(s in out for s in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "heartbeat", "Connection closed",
                                      "detected fatal errors", "Gloo", "gloo")), where + out[-3000:]
    latest = _committed(workdir)[-1]

    # 2. Restart; once a newer checkpoint exists, SIGTERM to one process only.
    procs = _start(config_file, workdir, "run2")
    try:
        if latest < STEPS:
            _wait_for(lambda: _committed(workdir)[-1] > latest, procs)
            procs[rng.randrange(NPROC)].send_signal(signal.SIGTERM)
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        _kill_all(procs)
    logs = [_log(workdir, "run2", i) for i in range(NPROC)]
    assert rcs == [0, 0], where + logs[0][-2000:] + logs[1][-2000:]
    stops = [_preempted_step(log) for log in logs]
    assert stops[0] == stops[1], (where, stops)  # the sync point: the same step on every process
    if stops[0] is not None:
        assert stops[0] in _committed(workdir)
        assert f"Resumed from checkpoint {os.path.join(workdir, 'checkpoints')} at step {latest}" in logs[0]

    # 3. Restart to the end; compare with the uninterrupted run.
    procs = _start(config_file, workdir, "run3")
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        _kill_all(procs)
    assert rcs == [0, 0], where + _log(workdir, "run3", 0)[-3000:]
    config = mh_config(data_dir, cache_dir, devices=8)
    got, _ = _restore(workdir, STEPS, config)
    want, _ = _restore(reference, STEPS, config)
    _assert_same_tree(want, got)
    for pid in range(NPROC):
        ids = _ids(workdir, pid)
        assert [r["step"] for r in ids] == list(range(1, STEPS + 1))
        assert ids == _ids(reference, pid)  # no pair repeated, none skipped


def _preempted_step(log: str):
    marker = "Preempted: checkpoint for step "
    if marker not in log:
        return None
    return int(log.split(marker, 1)[1].split()[0])


# ------------------------------------------------------------------------------------ 5. export, eval
def test_export_and_eval_job_on_two_processes_equal_one(setup, reference, tmp_path):
    data_dir, cache_dir, config_file = setup
    two = _export_two(setup, reference)
    one = export.export_checkpoint(reference, str(tmp_path / "export1"))
    a, b = export.load_export(two), export.load_export(one)
    assert a.info["step"] == b.info["step"] == STEPS
    _assert_same_tree(a.ema_params, b.ema_params)

    eval2 = str(tmp_path / "eval2")
    _launcher(config_file, eval2, "--mode=eval", f"--eval_export={two}")
    eval_config = mh_config(data_dir, cache_dir, devices=8)
    eval1 = str(tmp_path / "eval1")
    job.run_eval_job(eval_config, eval1, export_dir=one)
    r2 = json.load(open(os.path.join(eval2, "eval", f"export_step_{STEPS}.json")))
    r1 = json.load(open(os.path.join(eval1, "eval", f"export_step_{STEPS}.json")))
    timings = {"generate_seconds", "images_per_second", "grid"}
    for g in r1["by_guidance"]:
        n1 = {k: v for k, v in r1["by_guidance"][g].items() if k not in timings}
        n2 = {k: v for k, v in r2["by_guidance"][g].items() if k not in timings}
        # Every number, NaN where a metric does not apply. 2 x 2 devices shard the sampler's batch
        # differently from 1 x 8, so XLA's CPU kernels may round differently in the last bits:
        # the Frechet distances (a matrix square root) agree to ~1e-7 relative, the rest exactly.
        _assert_close(n2, n1, f"guidance {g}")
    assert os.path.exists(os.path.join(eval2, "eval", "progress.json"))
    assert len([f for f in os.listdir(os.path.join(eval2, "eval")) if f.startswith("events.out")]) == 1


def _assert_close(a, b, where):
    """Equal structure and strings; numbers equal to 1e-5 relative (NaN equals NaN)."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), (where, a, b)
        for k in b:
            _assert_close(a[k], b[k], f"{where}: {k}")
    elif isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(b, (int, float)) and not isinstance(b, bool):
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=where)
    else:
        assert a == b, (where, a, b)
