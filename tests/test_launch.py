"""Launchers: launch/tpu_pod.sh and launch/gpu_slurm.sbatch, checked through their --dry-run output
and, for the pod launcher, a real run against a fake `gcloud` that records its calls.

No cloud, no cluster: `gcloud`, `srun` and `sbatch` on PATH are fakes in a temporary directory.
"""
import hashlib
import os
import shlex
import stat
import subprocess
import tarfile

import pytest

from semantica_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
GPU_SLURM = os.path.join(REPO, "launch", "gpu_slurm.sbatch")
CONFIG = "experiments/semantica_base.py:size=L,fsdp"

FAKE = """#!/usr/bin/env bash
# Records its arguments (NUL-separated, each call ended by \\001) and answers `describe` with 2 workers.
printf '%s\\0' "$(basename "$0")" "$@" >> "$FAKE_LOG"; printf '\\001' >> "$FAKE_LOG"
case " $* " in *" describe "*) echo 2 ;; esac
"""


@pytest.fixture()
def fake_path(tmp_path):
    """PATH with fake gcloud / srun / sbatch first; returns (env, log file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "sbatch"):
        p = bin_dir / name
        p.write_text(FAKE)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), TMPDIR=str(tmp_path))
    return env, log


def _calls(log):
    if not log.exists():
        return []
    return [call.strip("\0").split("\0") for call in log.read_text().split("\1") if call]


def _run(args, env):
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def _commands(stdout):
    """The printed commands: '+ ' lines, shell-split (a here-document body is attached)."""
    out, lines = [], stdout.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("+ "):
            if line.endswith("<<'REMOTE'"):
                end = lines.index("REMOTE", i)
                out.append((shlex.split(line[2:-len("<<'REMOTE'")]), "\n".join(lines[i + 1:end])))
                i = end
            else:
                out.append((shlex.split(line[2:]), None))
        i += 1
    return out


def _tpu_args(*extra):
    return [TPU_POD, CONFIG, "--tpu", "my-pod", "--zone", "us-west4-a", "--project", "proj",
            "--workdir", "gs://bucket/run", "--run_id", "R1", *extra]


def test_tpu_pod_dry_run_prints_every_step_for_all_workers(fake_path):
    env, log = fake_path
    proc = _run(_tpu_args("--num_workers", "4", "--dry-run", "--", "--config.train.num_steps=10"), env)
    assert proc.returncode == 0, proc.stderr
    assert _calls(log) == []  # a dry run runs nothing
    cmds = _commands(proc.stdout)
    gcloud = [(argv, body) for argv, body in cmds if argv[0] == "gcloud"]
    assert [argv[4] for argv, _ in gcloud] == ["scp", "ssh", "ssh"]
    for argv, _ in gcloud:
        assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert "--worker=all" in argv and "--zone=us-west4-a" in argv and "--project=proj" in argv
    (scp, _), (_, setup), (_, start) = gcloud
    assert scp[5:7] == [f"{env['TMPDIR']}/semantica_code_R1.tgz", "my-pod:/tmp/semantica_code_R1.tgz"]
    # Set-up: same code everywhere (checksum), the pinned venv with the TPU extra, an import check.
    assert "sha256sum -c" in setup and "bash launch/setup_env.sh tpu" in setup
    assert "import jax, semantica_jax" in setup
    # Start: free the TPU from an earlier run, then main.py detached, one log per worker.
    assert setup.index("sha256sum") < setup.index("setup_env.sh")
    assert start.index("fuser -k -TERM") < start.index("semantica_jax.main")
    run_line = next(line for line in start.splitlines() if "semantica_jax.main" in line)
    argv = shlex.split(run_line.split(">")[0])
    assert argv[:4] == ["SEMANTICA_DISTRIBUTED=1", "nohup", "setsid", ".venv/bin/python"]
    assert argv[4:] == ["-m", "semantica_jax.main", f"--config={CONFIG}", "--workdir=gs://bucket/run",
                        "--config.train.num_steps=10"]
    assert 'LOG=logs/R1/$(hostname).log' in start and '> "$LOG" 2>&1 < /dev/null &' in run_line


def test_tpu_pod_single_worker_does_not_initialise_distributed(fake_path):
    env, _ = fake_path
    proc = _run(_tpu_args("--num_workers", "1", "--dry-run"), env)
    assert proc.returncode == 0, proc.stderr
    assert "SEMANTICA_DISTRIBUTED=0 nohup" in proc.stdout
    assert distributed.multihost_reason({"SEMANTICA_DISTRIBUTED": "0"}) is None
    assert distributed.multihost_reason({"SEMANTICA_DISTRIBUTED": "1"}) is not None


def test_tpu_pod_real_run_calls_gcloud_as_printed(fake_path, tmp_path):
    env, log = fake_path
    proc = _run(_tpu_args(), env)  # no --num_workers: the fake `describe` answers 2
    assert proc.returncode == 0, proc.stderr
    calls = _calls(log)
    assert [c[4] for c in calls] == ["describe", "scp", "ssh", "ssh"]
    printed = [(argv, body) for argv, body in _commands(proc.stdout) if argv[0] == "gcloud"]
    assert len(printed) == len(calls)
    for (argv, body), call in zip(printed, calls):  # what ran is exactly what was printed
        if body is None:
            assert call == argv
        else:
            assert call[:-1] == argv[:-1] and call[-1] == f"--command={body}"
    # The shipped tarball: tracked + untracked files, no venv, and its checksum is what workers check.
    tgz = tmp_path / "semantica_code_R1.tgz"
    with tarfile.open(tgz) as tf:
        names = set(tf.getnames())
    assert {"semantica_jax/sharding.py", "launch/tpu_pod.sh", "experiments/semantica_base.py"} <= names
    assert not any(n.startswith((".venv", "workdirs/", ".git/")) for n in names)
    sha = hashlib.sha256(tgz.read_bytes()).hexdigest()
    assert f"echo '{sha}  /tmp/semantica_code_R1.tgz' | sha256sum -c" in calls[2][-1]
    assert "SEMANTICA_DISTRIBUTED=1 nohup setsid" in calls[3][-1]


@pytest.mark.parametrize("args, match", [
    (["--zone", "z", "--workdir", "gs://b/r", "--dry-run", "--num_workers", "2"], "--tpu NAME is required"),
    (["--tpu", "t", "--zone", "z", "--workdir", "/tmp/run", "--dry-run", "--num_workers", "2"],
     "must be a gs:// path"),
    (["--tpu", "t", "--zone", "z", "--workdir", "gs://b/r", "--dry-run"], "needs --num_workers"),
    (["--tpu", "t", "--zone", "z", "--workdir", "gs://b/r", "--bogus"], "unknown argument '--bogus'"),
])
def test_tpu_pod_argument_errors(fake_path, args, match):
    env, log = fake_path
    proc = _run([TPU_POD, CONFIG, *args], env)
    assert proc.returncode == 2 and match in proc.stderr
    assert _calls(log) == []


def test_tpu_pod_missing_config_file(fake_path):
    env, _ = fake_path
    proc = _run([TPU_POD, "experiments/nope.py", "--tpu", "t", "--zone", "z", "--workdir", "gs://b/r",
                 "--num_workers", "2", "--dry-run"], env)
    assert proc.returncode == 2 and "experiments/nope.py not found" in proc.stderr


def test_gpu_slurm_dry_run(fake_path):
    env, log = fake_path
    proc = _run([GPU_SLURM, "--dry-run", CONFIG, "/shared/runs/L", "--config.train.num_steps=5"], env)
    assert proc.returncode == 0, proc.stderr
    assert _calls(log) == []
    cmds = [argv for argv, _ in _commands(proc.stdout)]
    assert cmds[0] == ["bash", f"{REPO}/launch/setup_env.sh", "gpu"]
    exports = dict(argv[1].split("=", 1) for argv in cmds if argv[0] == "export")
    assert exports["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    srun = cmds[-1]
    assert srun[0] == "srun"
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--kill-on-bad-exit=1",
            f"--chdir={REPO}"} <= set(srun)
    i = srun.index(f"{REPO}/.venv/bin/python")
    assert srun[i:] == [f"{REPO}/.venv/bin/python", "-m", "semantica_jax.main", f"--config={CONFIG}",
                        "--workdir=/shared/runs/L", "--config.train.num_steps=5"]
    # Inside the srun step of that job, the entry point initialises jax.distributed.
    assert distributed.multihost_reason(
        {"SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"})


def test_gpu_slurm_follows_the_allocation_and_needs_a_job(fake_path):
    env, log = fake_path
    proc = _run([GPU_SLURM, "--dry-run", CONFIG, "/w"],
                {**env, "SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "77"})
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=4" in proc.stdout and "JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3" in proc.stdout
    assert f"--output={REPO}/logs/77/node%n.log" in proc.stdout
    proc = _run([GPU_SLURM, CONFIG, "/w"], env)
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr
    assert _calls(log) == []
    with open(GPU_SLURM) as f:
        header = [line for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1\n" in header and "#SBATCH --gpus-per-node=8\n" in header
