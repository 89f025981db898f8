"""Running a study: every arm x seed trained and evaluated in subprocesses, resumably, with its
status file."""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import time

from semantica_study.spec import (
    REPO, STATUS_FILE, StudyError, apply_overrides, arm_dir, arm_overrides, config_flags,
    eval_fingerprint, load_arm_config, read_json, scale_key, split_overrides, write_json
)


def _subprocess_env(cpu_devices: int | None, compile_cache: str = "") -> dict:
    """The runs' environment: this one + the repo on PYTHONPATH + a fake CPU device count
    (None: 2 unless XLA_FLAGS already sets one; N > 0: exactly N; 0: XLA_FLAGS as it is) + JAX's
    persistent compilation cache in `compile_cache` (shared by every run: arms whose programs
    are the same, e.g. pairs vs reconstruction, compile them once; '' = none, unless the
    environment already names one)."""
    env = dict(os.environ)
    if compile_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
        os.makedirs(compile_cache, exist_ok=True)
        env["JAX_COMPILATION_CACHE_DIR"] = compile_cache
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    flags = env.get("XLA_FLAGS", "")
    has_count = "xla_force_host_platform_device_count" in flags
    if cpu_devices is None:
        cpu_devices = 0 if has_count else 2
    if cpu_devices > 0:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags)
        env["XLA_FLAGS"] = (flags.strip() + f" --xla_force_host_platform_device_count={cpu_devices}").strip()
    return env


def _run_logged(cmd: list[str], log_path: str, env: dict) -> tuple[int, float]:
    """Runs cmd with stdout+stderr appended to log_path; returns (exit code, wall seconds)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"\n===== {stamp} $ {' '.join(shell_quote(c) for c in cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT; let it checkpoint and exit
            proc.wait()
            raise
    return rc, time.time() - t0


def shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def train_done(workdir: str, num_steps: int) -> bool:
    m = read_json(os.path.join(workdir, "metrics.json"))
    return bool(m) and int(m.get("step", -1)) >= num_steps and not m.get("preempted", False)


def eval_result_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"export_step_{step}.json")


EVAL_DONE_FILE = "study_eval_done.json"  # written by the eval worker: step, eval fingerprint, timings


def eval_done(workdir: str, step: int, fingerprint: dict) -> bool:
    """The eval result of `step` exists and was computed with these eval settings."""
    result = read_json(eval_result_path(workdir, step))
    done = read_json(os.path.join(workdir, EVAL_DONE_FILE)) or {}
    if not result or done.get("step") != step or done.get("fingerprint") != fingerprint:
        return False
    want = {scale_key(g) for g in fingerprint.get("guidance_scales", ())}
    return want <= set(result.get("by_guidance", {}))


def log_line(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def run_arm_seed(study: dict, arm: dict, seed: int, out: str, cli: dict, *, python: str, env: dict,
                 dry_run: bool = False) -> dict:
    """Train + export + eval one arm x seed (each skipped when already done); returns its status."""
    workdir = arm_dir(out, arm, seed)
    overrides = arm_overrides(study, arm, seed, cli)
    config = load_arm_config(arm, overrides)
    train_ov, eval_ov = split_overrides(overrides)
    num_steps = int(config.train.num_steps)
    fingerprint = eval_fingerprint(config)
    tag = f"{arm['name']}/seed{seed}"
    status_path = os.path.join(workdir, STATUS_FILE)
    status = read_json(status_path) or {}
    status.update(arm=arm["name"], seed=seed, config=arm["config"], overrides=overrides,
                  claims=list(arm["claims"]))
    status.setdefault("train", {})
    status.setdefault("eval", {})
    train_cmd = [python, "-m", "semantica_jax.main", f"--config={arm['config']}", f"--workdir={workdir}",
                 *config_flags(train_ov)]
    request_path = os.path.join(workdir, "study_eval_request.json")
    eval_cmd = [python, "-m", "semantica_study", "_eval", request_path]
    if dry_run:
        print(f"# {tag}\n{' '.join(shell_quote(c) for c in train_cmd)}\n"
              f"{' '.join(shell_quote(c) for c in eval_cmd)}   # eval overrides: {eval_ov}")
        return status
    os.makedirs(workdir, exist_ok=True)

    def save():
        write_json(status_path, status)

    # ---------------------------------------------------------------- train
    if train_done(workdir, num_steps):
        log_line(f"{tag}: train done ({num_steps} steps), skipped")
        status["train"]["skipped"] = True
    else:
        log_line(f"{tag}: training {num_steps} steps (log: {os.path.join(workdir, 'train.log')})")
        rc, secs = _run_logged(train_cmd, os.path.join(workdir, "train.log"), env)
        status["train"].update(rc=rc, skipped=False, command=train_cmd,
                               seconds=status["train"].get("seconds", 0.0) + secs,
                               last_seconds=secs)
        if rc != 0 or not train_done(workdir, num_steps):
            status["train"]["failed"] = True
            status["state"] = "train failed"
            save()
            log_line(f"{tag}: training FAILED (exit {rc}); last lines of train.log:\n"
                 + _tail(os.path.join(workdir, "train.log")))
            return status
        status["train"]["failed"] = False
        log_line(f"{tag}: trained in {secs:.0f} s")
    metrics = read_json(os.path.join(workdir, "metrics.json")) or {}
    step = int(metrics.get("step", num_steps))
    status["train"]["step"] = step
    save()

    # ---------------------------------------------------------------- export + eval
    if eval_done(workdir, step, fingerprint):
        log_line(f"{tag}: eval done, skipped")
        status["eval"]["skipped"] = True
    else:
        eval_dir = os.path.join(workdir, "eval")
        if os.path.isdir(eval_dir) and os.path.exists(eval_result_path(workdir, step)):
            stale = f"{eval_dir}.stale-{int(time.time())}"
            os.replace(eval_dir, stale)  # other eval settings: keep the old numbers aside
            log_line(f"{tag}: eval settings changed; previous results moved to {stale}")
        write_json(request_path, {"config": arm["config"], "overrides": overrides, "workdir": workdir,
                                  "step": step})
        log_line(f"{tag}: export + eval at guidance {fingerprint.get('guidance_scales')} "
             f"(log: {os.path.join(workdir, 'eval.log')})")
        rc, secs = _run_logged(eval_cmd, os.path.join(workdir, "eval.log"), env)
        timing = read_json(os.path.join(workdir, EVAL_DONE_FILE)) or {}
        status["eval"].update(rc=rc, skipped=False, command=eval_cmd, seconds=secs,
                              export_seconds=timing.get("export_seconds"),
                              eval_seconds=timing.get("eval_seconds"), fingerprint=fingerprint)
        if rc != 0 or not os.path.exists(eval_result_path(workdir, step)):
            status["eval"]["failed"] = True
            status["state"] = "eval failed"
            save()
            log_line(f"{tag}: eval FAILED (exit {rc}); last lines of eval.log:\n"
                 + _tail(os.path.join(workdir, "eval.log")))
            return status
        status["eval"]["failed"] = False
        log_line(f"{tag}: evaluated in {secs:.0f} s")
    status["eval"]["result"] = os.path.relpath(eval_result_path(workdir, step), workdir)
    status["state"] = "done"
    save()
    return status


def eval_worker(request_path: str) -> int:
    """`python -m semantica_study _eval REQUEST.json`: export the final checkpoint, evaluate it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging

    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from semantica_jax import config_lib
    from semantica_jax import export as export_lib
    from semantica_jax.evaluation import job

    req = read_json(request_path)
    workdir, step = req["workdir"], int(req["step"])
    try:
        config = config_lib.load_config_file(req["config"])
        apply_overrides(config, req["overrides"])  # all of them: the fingerprint matches the runner's
        export_dir = os.path.join(workdir, "export")
        t0 = time.time()
        info = read_json(os.path.join(export_dir, "export.json"))
        if not info or int(info.get("step", -1)) != step:
            export_lib.export_checkpoint(workdir, export_dir, step=step, overwrite=True)
        t1 = time.time()
        results = job.run_eval_job(config, workdir, export_dir=export_dir, once=True)
        t2 = time.time()
    except (config_lib.ConfigError, export_lib.ExportError, StudyError) as e:
        print(f"semantica-study: error: {e}", file=sys.stderr)
        return 2
    if not os.path.exists(eval_result_path(workdir, step)):
        print(f"semantica-study: error: no eval result {eval_result_path(workdir, step)}", file=sys.stderr)
        return 1
    write_json(os.path.join(workdir, EVAL_DONE_FILE),
               {"step": step, "fingerprint": eval_fingerprint(config), "export_seconds": t1 - t0,
                "eval_seconds": t2 - t1})
    for r in results:
        print(job.summary_table(r))
    return 0


def run_study(study: dict, out: str, *, only: list[str] | None = None, seeds: list[int] | None = None,
              cli_overrides: dict | None = None, python: str = sys.executable, cpu_devices: int | None = None,
              dry_run: bool = False, compile_cache: str | None = None) -> dict[str, dict]:
    """Runs (or skips) every selected arm x seed; returns {'arm/seedK': status}. `compile_cache`:
    the runs' shared JAX compilation cache (None: `<out>/jax_cache`; '': none)."""
    cli = dict(cli_overrides or {})
    names = [a["name"] for a in study["arms"]]
    for n in only or []:
        if n not in names:
            raise StudyError(f"--only: unknown arm {n!r} (arms: {names})")
    todo = [(a, s) for a in study["arms"] if not only or a["name"] in only
            for s in a["seeds"] if seeds is None or s in seeds]
    # Validate every arm's config and overrides before the first (long) run starts.
    for a, s in todo:
        load_arm_config(a, arm_overrides(study, a, s, cli))
    if compile_cache is None:
        compile_cache = "" if dry_run else os.path.join(out, "jax_cache")
    env = _subprocess_env(cpu_devices, compile_cache)
    statuses = {}
    for a, s in todo:
        statuses[f"{a['name']}/seed{s}"] = run_arm_seed(study, a, s, out, cli, python=python, env=env,
                                                        dry_run=dry_run)
    return statuses
