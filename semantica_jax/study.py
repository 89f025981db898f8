r"""The paper-claims study: train every arm of a study file, evaluate it, write REPORT.md.

  bash launch/study.sh                                   # set-up + data + the tiny study
  python -m semantica_jax.study --study=experiments/study_tiny.py --out=studies/tiny
  python -m semantica_jax.study --study=... --only=pairs,reconstruction --seeds=0
  python -m semantica_jax.study --study=... --smoke      # 6 steps, a 2-step eval: wiring only
  python -m semantica_jax.study --study=... --report_only
  python -m semantica_jax.study --study=... --dry_run    # print the commands, run nothing

A study file (experiments/study_*.py) defines `get_study(arg=None) -> dict` (docs/STUDY.md):
arms (name, experiment config spec, seeds, overrides, the claims they serve), the claims (tables
and the checks that turn numbers into verdicts), the guidance scales the tables show, the limits.

For every arm x seed, in `<out>/<arm>/seed<k>/` (sequentially, each phase in a subprocess with a
fresh JAX and `--cpu_devices` fake CPU devices unless XLA_FLAGS already sets a count):
  train    `python -m semantica_jax.main --config=<spec> --workdir=<dir> --config.seed=<k> ...`
           (log: train.log); resumes from the workdir's checkpoints; skipped when metrics.json
           records the requested final step
  eval     `python -m semantica_jax.study _eval <request.json>` (log: eval.log): export of the final
           checkpoint to <dir>/export, then the few-shot eval job on it (`run_eval_job(config,
           dir, export_dir=...)`, the arm's config with the study's `eval.*` overrides);
           skipped when <dir>/eval/export_step_<S>.json exists for the same eval settings
  status   study_status.json: what ran, exit codes, wall seconds per phase (accumulated)
Then `<out>/REPORT.md` + `<out>/report.json` + `<out>/grids/*.png` from whatever results exist
(missing arms are listed as not run). Verdicts are computed from the numbers with the thresholds
printed next to them; nothing in the report is written by hand.

Overrides (`key=value`, dotted config keys): `eval.*` keys go to the eval job only (they never
reach training, so changing them never blocks a resume), all others to training as
`--config.<key>=<value>` flags. Precedence: study < arm < `--set` < `--steps`.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any

import numpy as np

from semantica_jax import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS_FILE = "study_status.json"
REPORT_MD = "REPORT.md"
REPORT_JSON = "report.json"
DEFAULT_METRICS = ("class_consistency", "consistency", "diversity", "pixel_diversity",
                   "pixel_distance_to_condition", "fewshot_recall", "fd")
# Eval fields that do not change the numbers (left out of the eval fingerprint).
_EVAL_FREE = ("batch_size", "cache_dir", "poll_seconds", "idle_timeout_seconds")
_CLAIM_KINDS = ("compare", "heldout", "guidance")
_CHECK_KINDS = ("greater", "less", "above", "below", "trend")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SMOKE_OVERRIDES = {
    "train.num_steps": 6, "train.log_every": 2, "train.checkpoint_every": 6, "train.eval_every": 0,
    "train.sample_every": 0, "eval.shots": 1, "eval.samples_per_condition": 2, "eval.num_steps": 2,
    "eval.memorization_images": 0, "eval.max_real_per_group": 50, "eval.extractor_resolution": 64,
}


class StudyError(ValueError):
    """A study file or option problem, found before anything runs."""


# ============================================================================ study files
def _import_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_study(spec: str) -> dict:
    """`path.py[:arg]` -> the normalised study dict (defaults filled, references checked)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise StudyError(f"study file {path} does not exist")
    module = _import_file(path, "_semantica_study")
    if not hasattr(module, "get_study"):
        raise StudyError(f"{path} defines no get_study(arg=None)")
    study = module.get_study(arg or None)
    return normalize_study(study, where=spec)


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(x)
    return (x,)


def normalize_study(study: dict, where: str = "study") -> dict:
    s = dict(study)
    s.setdefault("name", "study")
    s.setdefault("title", f"Study {s['name']}")
    s.setdefault("description", "")
    s["overrides"] = dict(s.get("overrides") or {})
    s["table_guidance"] = tuple(float(g) for g in _as_tuple(s.get("table_guidance", (1.0,))))
    s["metrics"] = tuple(s.get("metrics") or DEFAULT_METRICS)
    s.setdefault("num_classes", 0)
    s["class_names"] = {int(k): str(v) for k, v in (s.get("class_names") or {}).items()}
    s["limits"] = list(s.get("limits") or [])
    s.setdefault("budget_minutes", 0)
    s.setdefault("min_rel_gap", 0.05)
    arms, names = [], set()
    for a in s.get("arms") or []:
        a = dict(a)
        for key in ("name", "config"):
            if not a.get(key):
                raise StudyError(f"{where}: an arm has no {key!r}: {a}")
        if not _NAME_RE.match(a["name"]) or a["name"] in names:
            raise StudyError(f"{where}: arm name {a['name']!r} is not a unique file-name-safe name")
        names.add(a["name"])
        a["seeds"] = tuple(int(x) for x in _as_tuple(a.get("seeds", (0,))))
        if not a["seeds"]:
            raise StudyError(f"{where}: arm {a['name']} has no seeds")
        a["overrides"] = dict(a.get("overrides") or {})
        a["claims"] = tuple(a.get("claims") or ())
        a.setdefault("description", "")
        arms.append(a)
    if not arms:
        raise StudyError(f"{where}: the study has no arms")
    s["arms"] = arms
    claims = []
    for c in s.get("claims") or []:
        c = dict(c)
        c.setdefault("kind", "compare")
        if c["kind"] not in _CLAIM_KINDS:
            raise StudyError(f"{where}: claim {c.get('id')}: kind {c['kind']!r} not in {_CLAIM_KINDS}")
        if not c.get("id"):
            raise StudyError(f"{where}: a claim has no 'id'")
        c.setdefault("title", c["id"])
        c.setdefault("question", "")
        c["arms"] = tuple(c.get("arms") or ([c["arm"]] if c.get("arm") else []))
        if c["kind"] == "heldout":
            c["arms"] = tuple(dict.fromkeys((c["arm"], *([c["reference"]] if c.get("reference") else []))))
            c["labels"] = tuple(int(x) for x in c["labels"])
            c.setdefault("margin", 0.1)
        if c["kind"] == "guidance" and len(c["arms"]) != 1:
            raise StudyError(f"{where}: guidance claim {c['id']} needs exactly one 'arm'")
        c["checks"] = [dict(k) for k in c.get("checks") or []]
        refs = list(c["arms"])
        for k in c["checks"]:
            k.setdefault("kind", "greater")
            if k["kind"] not in _CHECK_KINDS:
                raise StudyError(f"{where}: claim {c['id']}: check kind {k['kind']!r} not in {_CHECK_KINDS}")
            refs += [k[x] for x in ("a", "b", "arm") if x in k]
        for r in refs:
            if r not in names:
                raise StudyError(f"{where}: claim {c['id']} refers to unknown arm {r!r} (arms: {sorted(names)})")
        claims.append(c)
    s["claims"] = claims
    grids = dict(s.get("grids") or {})
    grids["arms"] = tuple(grids.get("arms") or [a["name"] for a in arms])
    grids["guidance"] = tuple(float(g) for g in _as_tuple(grids.get("guidance", s["table_guidance"])))
    for r in grids["arms"]:
        if r not in names:
            raise StudyError(f"{where}: grids refer to unknown arm {r!r}")
    s["grids"] = grids
    return s


# ============================================================================ overrides
def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise StudyError(f"override {text!r} is not key=value")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key.strip(), parsed


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """(train overrides, eval overrides): keys starting with 'eval.' go to the eval job only."""
    train = {k: v for k, v in overrides.items() if not k.startswith("eval.")}
    ev = {k: v for k, v in overrides.items() if k.startswith("eval.")}
    return train, ev


def apply_overrides(config, overrides: dict) -> None:
    """Sets dotted keys on an ml_collections ConfigDict (`update_from_flattened_dict`, on the
    config locked so that no key is added; JSON lists become tuples); unknown keys raise."""
    was_locked = config.is_locked
    config.lock()
    try:
        for key, value in overrides.items():
            try:
                config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value})
            except KeyError:
                raise StudyError(f"unknown config key {key!r}") from None
            except (TypeError, ValueError) as e:
                raise StudyError(f"override {key}={value!r}: {e}") from e
    finally:
        if not was_locked:
            config.unlock()


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def config_flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]


def arm_overrides(study: dict, arm: dict, seed: int, cli: dict) -> dict:
    out = {**study["overrides"], **arm["overrides"], **cli}
    out["seed"] = int(seed)
    return out


def arm_dir(out: str, arm: dict | str, seed: int) -> str:
    return os.path.join(out, arm if isinstance(arm, str) else arm["name"], f"seed{seed}")


def load_arm_config(arm: dict, overrides: dict):
    """The arm's experiment config with all overrides (validates keys before anything runs)."""
    from semantica_jax.evaluation import job

    try:
        config = job.load_config_file(arm["config"])
    except Exception as e:  # noqa: BLE001  (a config file's own errors, named)
        raise StudyError(f"arm {arm['name']}: config {arm['config']}: {e}") from e
    apply_overrides(config, overrides)
    return config


def eval_fingerprint(config) -> dict:
    ec = {k: v for k, v in config.eval.to_dict().items() if k not in _EVAL_FREE}
    ec["files"] = config.eval.files or config.data.eval_files
    return json.loads(json.dumps(ec, default=list))


# ============================================================================ files
def read_json(path: str | None) -> Any:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj: Any) -> None:
    fileio.write_json(path, obj, default=_json_default)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def _scale_key(g: float) -> str:
    return f"{float(g):g}"


# ============================================================================ running
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
        log.write(f"\n===== {stamp} $ {' '.join(_quote(c) for c in cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT; let it checkpoint and exit
            proc.wait()
            raise
    return rc, time.time() - t0


def _quote(s: str) -> str:
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
    want = {_scale_key(g) for g in fingerprint.get("guidance_scales", ())}
    return want <= set(result.get("by_guidance", {}))


def _log(msg: str) -> None:
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
    eval_cmd = [python, "-m", "semantica_jax.study", "_eval", request_path]
    if dry_run:
        print(f"# {tag}\n{' '.join(_quote(c) for c in train_cmd)}\n"
              f"{' '.join(_quote(c) for c in eval_cmd)}   # eval overrides: {eval_ov}")
        return status
    os.makedirs(workdir, exist_ok=True)

    def save():
        write_json(status_path, status)

    # ---------------------------------------------------------------- train
    if train_done(workdir, num_steps):
        _log(f"{tag}: train done ({num_steps} steps), skipped")
        status["train"]["skipped"] = True
    else:
        _log(f"{tag}: training {num_steps} steps (log: {os.path.join(workdir, 'train.log')})")
        rc, secs = _run_logged(train_cmd, os.path.join(workdir, "train.log"), env)
        status["train"].update(rc=rc, skipped=False, command=train_cmd,
                               seconds=status["train"].get("seconds", 0.0) + secs,
                               last_seconds=secs)
        if rc != 0 or not train_done(workdir, num_steps):
            status["train"]["failed"] = True
            status["state"] = "train failed"
            save()
            _log(f"{tag}: training FAILED (exit {rc}); last lines of train.log:\n"
                 + _tail(os.path.join(workdir, "train.log")))
            return status
        status["train"]["failed"] = False
        _log(f"{tag}: trained in {secs:.0f} s")
    metrics = read_json(os.path.join(workdir, "metrics.json")) or {}
    step = int(metrics.get("step", num_steps))
    status["train"]["step"] = step
    save()

    # ---------------------------------------------------------------- export + eval
    if eval_done(workdir, step, fingerprint):
        _log(f"{tag}: eval done, skipped")
        status["eval"]["skipped"] = True
    else:
        eval_dir = os.path.join(workdir, "eval")
        if os.path.isdir(eval_dir) and os.path.exists(eval_result_path(workdir, step)):
            stale = f"{eval_dir}.stale-{int(time.time())}"
            os.replace(eval_dir, stale)  # other eval settings: keep the old numbers aside
            _log(f"{tag}: eval settings changed; previous results moved to {stale}")
        write_json(request_path, {"config": arm["config"], "overrides": overrides, "workdir": workdir,
                                  "step": step})
        _log(f"{tag}: export + eval at guidance {fingerprint.get('guidance_scales')} "
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
            _log(f"{tag}: eval FAILED (exit {rc}); last lines of eval.log:\n"
                 + _tail(os.path.join(workdir, "eval.log")))
            return status
        status["eval"]["failed"] = False
        _log(f"{tag}: evaluated in {secs:.0f} s")
    status["eval"]["result"] = os.path.relpath(eval_result_path(workdir, step), workdir)
    status["state"] = "done"
    save()
    return status


def _eval_worker(request_path: str) -> int:
    """`python -m semantica_jax.study _eval REQUEST.json`: export the final checkpoint, evaluate it."""
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
        config = job.load_config_file(req["config"])
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


# ============================================================================ numbers
def stats(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    return {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "n": len(vals), "min": float(min(vals)), "max": float(max(vals)), "values": vals}


def fmt_num(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def fmt_stat(st: dict | None) -> str:
    if not st or st.get("mean") is None:
        return "–"
    if st["n"] > 1:
        return f"{fmt_num(st['mean'])} ± {fmt_num(st['sd'])}"
    return fmt_num(st["mean"])


def _label_of(group: str) -> int | None:
    m = re.fullmatch(r"label (-?\d+)", str(group))
    return int(m.group(1)) if m else None


def config_summary(config: dict | None) -> dict:
    if not config:
        return {}
    d, e = config.get("data", {}), config.get("encoder", {})
    if e.get("weights"):
        enc = f"{e.get('family')}-{e.get('size')}/{e.get('patch_size')} weights {os.path.basename(str(e['weights']))}"
    else:
        enc = f"{e.get('family')}-{e.get('size')}/{e.get('patch_size')} RANDOM init (seed {e.get('init_seed')})"
    flt = d.get("pair_filter", "none")
    if flt == "similarity":
        flt = f"similarity [{d.get('sim_low'):g}, {d.get('sim_high'):g}]"
    return {
        "pairing": d.get("pairing"), "encoder": enc, "encoder_image_size": e.get("image_size"),
        "filter": flt, "pair_filter": d.get("pair_filter", "none"), "sim_low": d.get("sim_low"),
        "sim_high": d.get("sim_high"), "include_labels": list(d.get("include_labels") or []),
        "exclude_labels": list(d.get("exclude_labels") or []), "train_files": d.get("train_files"),
        "image_size": d.get("image_size"), "batch_size": config.get("batch_size"),
        "num_steps": config.get("train", {}).get("num_steps"), "seed": config.get("seed"),
        "model_size": config.get("model", {}).get("size"),
    }


def collect(study: dict, out: str) -> dict:
    """Everything the report needs, from the files the runs left (nothing is recomputed)."""
    arms = {}
    for a in study["arms"]:
        seeds = {}
        for s in a["seeds"]:
            wd = arm_dir(out, a, s)
            st = read_json(os.path.join(wd, STATUS_FILE)) or {}
            rel = (st.get("eval") or {}).get("result")
            result = read_json(os.path.join(wd, rel)) if rel else None
            cfg = read_json(os.path.join(wd, "export", "config.json")) or read_json(os.path.join(wd, "config.json"))
            metrics = read_json(os.path.join(wd, "metrics.json")) or {}
            info = read_json(os.path.join(wd, "export", "export.json")) or {}
            train_s = (st.get("train") or {}).get("seconds")
            eval_s = (st.get("eval") or {}).get("seconds")
            seeds[s] = {
                "dir": wd, "state": st.get("state", "not run"), "result": result,
                "config": config_summary(cfg), "train_step": metrics.get("step"),
                "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
                "denoiser_params": metrics.get("denoiser_params") or info.get("num_params"),
                "train_seconds": train_s, "eval_seconds": eval_s,
                "export_seconds": (st.get("eval") or {}).get("export_seconds"),
                "eval_fingerprint": (st.get("eval") or {}).get("fingerprint"),
                "total_seconds": (train_s or 0.0) + (eval_s or 0.0) if (train_s or eval_s) else None,
            }
        arms[a["name"]] = {"seeds": seeds, "aggregate": aggregate(seeds)}
    return arms


def _results(seeds: dict) -> list[dict]:
    return [v["result"] for v in seeds.values() if v.get("result")]


def aggregate(seeds: dict) -> dict:
    """{scale: {metric: stats over seeds}} for every scale all evaluated seeds share."""
    results = _results(seeds)
    if not results:
        return {}
    scales = set(results[0]["by_guidance"])
    for r in results[1:]:
        scales &= set(r["by_guidance"])
    out = {}
    for sc in sorted(scales, key=float):
        keys = set()
        for r in results:
            keys |= {k for k, v in r["by_guidance"][sc].items() if isinstance(v, (int, float))}
        out[sc] = {k: stats([r["by_guidance"][sc].get(k) for r in results]) for k in sorted(keys)}
        out[sc]["probe_accuracy_real"] = stats([r.get("probe_accuracy_real") for r in results])
        out[sc]["pixel_probe_accuracy_real"] = stats([r.get("pixel_probe_accuracy_real") for r in results])
    return out


def group_stats(seeds: dict, scale: str, labels: set[int] | None, metric: str, *, exclude: bool = False) -> dict:
    """Per seed: mean of per-group `metric` over groups whose label is (not) in `labels`; stats over seeds."""
    vals = []
    for r in _results(seeds):
        groups = (r["by_guidance"].get(scale) or {}).get("per_group") or []
        sel = [g.get(metric) for g in groups
               if _label_of(g["group"]) is not None and ((_label_of(g["group"]) in labels) != exclude)]
        sel = [v for v in sel if v is not None and np.isfinite(v)]
        if sel:
            vals.append(float(np.mean(sel)))
    return stats(vals)


def group_count(seeds: dict, scale: str, labels: set[int]) -> float:
    """Generated samples in the groups of `labels`, summed over seeds."""
    total = 0
    for r in _results(seeds):
        for g in (r["by_guidance"].get(scale) or {}).get("per_group") or []:
            if _label_of(g["group"]) in labels:
                total += int(g.get("num_generated", 0))
    return float(total)


def per_label(seeds: dict, scale: str, label: int, metric: str) -> dict:
    return group_stats(seeds, scale, {label}, metric)


# ---------------------------------------------------------------------------- verdicts
# Metrics that are a fraction of the generated samples: their sampling error (binomial, over all
# samples behind the number) joins the seed spread in the thresholds.
PROPORTION_METRICS = ("class_consistency", "class_consistency_pixels")


def _sampling_error(metric: str, *sts_and_counts: tuple[dict, float]) -> float:
    """2 x the binomial standard error of a proportion (of a difference, for two numbers); 0 for
    other metrics."""
    if metric not in PROPORTION_METRICS:
        return 0.0
    var = 0.0
    for st, n in sts_and_counts:
        if not n or st is None or st.get("mean") is None:
            return 0.0
        p = min(max(float(st["mean"]), 0.0), 1.0)
        var += p * (1.0 - p) / float(n)
    return 2.0 * math.sqrt(var)


def _num_samples(arms: dict, arm: str, scale: str) -> float:
    """Samples behind an arm's aggregated number: num_generated per seed x seeds."""
    st = ((arms.get(arm) or {}).get("aggregate", {}).get(scale) or {}).get("num_generated") or {}
    return float(st["mean"]) * st["n"] if st.get("mean") else 0.0


def _threshold(study: dict, check: dict, sd: float, ref: float, sampling: float = 0.0) -> tuple[float, str]:
    min_gap = float(check.get("min_gap", 0.0))
    rel = float(check.get("min_rel_gap", study["min_rel_gap"]))
    t = max(sd, sampling, min_gap, rel * abs(ref))
    samp = f", 2 x binomial s.e. {fmt_num(sampling)}" if sampling else ""
    return t, (f"max(seed spread {fmt_num(sd)}{samp}, min_gap {fmt_num(min_gap)}, "
               f"{rel:g} x |{fmt_num(ref)}|) = {fmt_num(t)}")


def _seed_note(*sts: dict) -> str:
    n = min((st or {}).get("n", 0) for st in sts)
    return " (single seed: no spread measured, tentative)" if n == 1 else ""


def evaluate_check(study: dict, arms: dict, check: dict) -> dict:
    """One check -> {statement, verdict, detail}; verdicts: yes / no / no clear difference /
    not measured. The rule and its threshold are in the detail."""
    kind, metric = check["kind"], check["metric"]
    scale = _scale_key(check.get("guidance", study["table_guidance"][0]))
    statement = check.get("statement") or _default_statement(check)
    res = {"statement": statement, "kind": kind, "metric": metric, "guidance": scale, "check": check}

    def st_of(arm):
        return ((arms.get(arm) or {}).get("aggregate", {}).get(scale) or {}).get(metric)

    if kind in ("greater", "less"):
        a, b = st_of(check["a"]), st_of(check["b"])
        if not a or not b or a["mean"] is None or b["mean"] is None:
            return {**res, "verdict": "not measured", "detail": f"{metric} at guidance {scale} missing for "
                    f"{check['a'] if not a or a['mean'] is None else check['b']}"}
        sign = 1.0 if kind == "greater" else -1.0
        d = a["mean"] - b["mean"]
        samp = _sampling_error(metric, (a, _num_samples(arms, check["a"], scale)),
                               (b, _num_samples(arms, check["b"], scale)))
        t, rule = _threshold(study, check, (a["sd"] or 0.0) + (b["sd"] or 0.0), max(abs(a["mean"]), abs(b["mean"])),
                             samp)
        verdict = "yes" if sign * d > t else ("no" if sign * d < -t else "no clear difference")
        rel = ">" if kind == "greater" else "<"
        detail = (f"{metric} at guidance {scale}: {check['a']} {fmt_stat(a)} vs {check['b']} {fmt_stat(b)}; "
                  f"difference {d:+.3g}; 'yes' needs {check['a']} {rel} {check['b']} by more than {rule}"
                  + _seed_note(a, b))
        return {**res, "verdict": verdict, "difference": d, "threshold": t, "detail": detail}
    if kind in ("above", "below"):
        a = st_of(check["arm"])
        value = float(check["value"])
        if not a or a["mean"] is None:
            return {**res, "verdict": "not measured", "detail": f"{metric} at guidance {scale} missing for {check['arm']}"}
        tol, tol_text = _tolerance(metric, a, _num_samples(arms, check["arm"], scale))
        if kind == "above":
            verdict = "yes" if a["mean"] - tol > value else ("no" if a["mean"] + tol <= value else "no clear difference")
            rule = f"'yes' needs mean − {tol_text} > {value:g}"
        else:
            verdict = "yes" if a["mean"] + tol < value else ("no" if a["mean"] - tol >= value else "no clear difference")
            rule = f"'yes' needs mean + {tol_text} < {value:g}"
        detail = f"{metric} at guidance {scale}: {check['arm']} {fmt_stat(a)}; {rule}" + _seed_note(a)
        return {**res, "verdict": verdict, "detail": detail}
    if kind == "trend":  # same arm, first vs last guidance scale, paired over seeds
        arm = check["arm"]
        seeds = (arms.get(arm) or {}).get("seeds", {})
        results = _results(seeds)
        lo, hi = _scale_key(check["from"]), _scale_key(check["to"])
        diffs = [r["by_guidance"][hi][metric] - r["by_guidance"][lo][metric] for r in results
                 if lo in r["by_guidance"] and hi in r["by_guidance"]
                 and metric in r["by_guidance"][lo] and metric in r["by_guidance"][hi]]
        dst = stats(diffs)
        res["guidance"] = f"{lo}→{hi}"
        if dst["mean"] is None:
            return {**res, "verdict": "not measured", "detail": f"{metric} at guidance {lo} and {hi} missing for {arm}"}
        ref = stats([r["by_guidance"][lo][metric] for r in results if lo in r["by_guidance"]])["mean"] or 0.0
        first = stats([r["by_guidance"][lo][metric] for r in results if lo in r["by_guidance"]])
        n = _num_samples(arms, arm, lo)
        samp = _sampling_error(metric, (first, n), (first, n))
        t, rule = _threshold(study, check, dst["sd"] or 0.0, ref, samp)
        sign = 1.0 if check.get("direction", "up") == "up" else -1.0
        d = dst["mean"]
        verdict = "yes" if sign * d > t else ("no" if sign * d < -t else "no clear difference")
        word = "rise" if sign > 0 else "fall"
        detail = (f"{metric} of {arm} from guidance {lo} to {hi}: change {fmt_stat(dst)} (paired over seeds); "
                  f"'yes' needs a {word} by more than {rule}" + _seed_note(dst))
        return {**res, "verdict": verdict, "difference": d, "threshold": t, "detail": detail}
    raise StudyError(f"unknown check kind {kind!r}")


def _tolerance(metric: str, st: dict, n: float) -> tuple[float, str]:
    """Margin of an above/below check: max(seed spread, 2 x binomial s.e.) with its description."""
    sd = st.get("sd") or 0.0
    samp = _sampling_error(metric, (st, n))
    tol = max(sd, samp)
    text = f"max(seed spread {fmt_num(sd)}, 2 x binomial s.e. {fmt_num(samp)})" if samp else "seed spread"
    return tol, f"{text} [{fmt_num(tol)}]"


def _default_statement(check: dict) -> str:
    k, m = check["kind"], check["metric"]
    if k == "greater":
        return f"{check['a']} has higher {m} than {check['b']}"
    if k == "less":
        return f"{check['a']} has lower {m} than {check['b']}"
    if k == "above":
        return f"{check['arm']}: {m} above {check['value']}"
    if k == "below":
        return f"{check['arm']}: {m} below {check['value']}"
    return f"{check['arm']}: {m} {'rises' if check.get('direction', 'up') == 'up' else 'falls'} with guidance"


# ============================================================================ the report
def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def _n_seeds(arm: dict) -> int:
    return len(_results(arm["seeds"]))


def _metric_rows(study, arms, names, scales, extra=None) -> tuple[list[str], list[list[str]], list[dict]]:
    ceilings = [("probe ceiling", "probe_accuracy_real")]
    if "class_consistency_pixels" in study["metrics"]:
        ceilings.append(("pixel probe ceiling", "pixel_probe_accuracy_real"))
    header = ["arm", "seeds", "guidance", *study["metrics"], *[h for h, _ in ceilings]] + [h for h, _ in (extra or [])]
    rows, data = [], []
    for n in names:
        agg = arms[n]["aggregate"]
        for g in scales:
            sc = _scale_key(g)
            if sc not in agg:
                rows.append([n, str(_n_seeds(arms[n])), sc, *["–"] * (len(study["metrics"]) + len(ceilings))]
                            + [f(n) for _, f in (extra or [])])
                continue
            rows.append([n, str(_n_seeds(arms[n])), sc, *[fmt_stat(agg[sc].get(m)) for m in study["metrics"]],
                         *[fmt_stat(agg[sc].get(k)) for _, k in ceilings]] + [f(n) for _, f in (extra or [])])
            data.append({"arm": n, "guidance": sc, **{m: agg[sc].get(m) for m in study["metrics"]}})
    return header, rows, data


def similarity_kept(summary: dict) -> dict | None:
    """What the similarity filter keeps for an arm, from the similarity tool's report next to its
    training shards (semantica_jax/similarity.py: similarity.json, row of the sweep)."""
    if not summary:
        return None
    if summary.get("pair_filter", "none") != "similarity":
        return {"pairs": 1.0, "pages": 1.0, "note": "no filter"}
    files = summary.get("train_files") or ""
    path = os.path.join(os.path.dirname(files), "similarity.json")
    rep = read_json(path)
    if not rep:
        return {"pairs": None, "pages": None, "note": f"no similarity report at {path}"}
    lo, hi = float(summary["sim_low"]), float(summary["sim_high"])
    for row in [rep.get("kept") or {}] + list(rep.get("sweep") or []):
        if row and abs(float(row["low"]) - lo) < 1e-6 and abs(float(row["high"]) - hi) < 1e-6:
            return {"pairs": row.get("kept_pair_fraction"), "pages": row.get("kept_page_fraction"),
                    "report": path, "shards": rep.get("shards"), "mean_similarity": rep.get("mean_similarity"),
                    "percentiles": rep.get("percentiles")}
    return {"pairs": None, "pages": None, "note": f"[{lo:g}, {hi:g}] not in the sweep of {path}"}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}"


def _stack_grids(tiles: list[tuple[str, str]], path: str, row_labels: list[str] | None = None,
                 scale: int = 1) -> str | None:
    """Side by side: each (label, png) tile under its label, optional row labels on the left (the
    eval grids are already upscaled and carry their own class labels)."""
    from PIL import Image, ImageDraw

    ims = [(lab, Image.open(p).convert("RGB")) for lab, p in tiles if p and os.path.exists(p)]
    if not ims:
        return None
    ims = [(lab, im.resize((im.width * scale, im.height * scale), Image.NEAREST)) for lab, im in ims]
    head, gap = 18, 10
    left = 8 + 7 * max((len(r) for r in row_labels), default=0) if row_labels else 0
    width = left + sum(im.width for _, im in ims) + gap * (len(ims) + 1)
    height = head + max(im.height for _, im in ims) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = left + gap
    for lab, im in ims:
        canvas.paste(im, (x, head))
        draw.text((x, 3), lab, fill=(0, 0, 0))
        x += im.width + gap
    if row_labels:
        h0 = ims[0][1].height
        rows = len(row_labels)
        for i, r in enumerate(row_labels):
            draw.text((4, head + int((i + 0.5) * h0 / rows) - 5), r, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    canvas.save(path)
    return path


def _grid_png(seed_entry: dict, scale: str) -> str | None:
    r = seed_entry.get("result")
    if not r:
        return None
    return os.path.join(seed_entry["dir"], "eval", "grids", f"{r['tag']}_g{scale}.png")


def _first_seed(arm: dict) -> tuple[int, dict] | None:
    for s, v in arm["seeds"].items():
        if v.get("result"):
            return s, v
    return None


def make_grids(study: dict, arms: dict, out: str) -> dict:
    grids = {}
    for g in study["grids"]["guidance"]:
        sc = _scale_key(g)
        tiles = []
        for n in study["grids"]["arms"]:
            first = _first_seed(arms[n])
            if first:
                tiles.append((f"{n} (seed {first[0]})", _grid_png(first[1], sc)))
        p = _stack_grids(tiles, os.path.join(out, "grids", f"side_by_side_g{sc}.png"))
        if p:
            grids[f"side_by_side_g{sc}"] = p
    for c in study["claims"]:
        if c["kind"] != "guidance":
            continue
        first = _first_seed(arms[c["arms"][0]])
        if not first:
            continue
        scales = sorted(first[1]["result"]["by_guidance"], key=float)
        tiles = [(f"guidance {sc}", _grid_png(first[1], sc)) for sc in scales]
        p = _stack_grids(tiles, os.path.join(out, "grids", f"guidance_{c['arms'][0]}.png"))
        if p:
            grids[f"guidance_{c['arms'][0]}"] = p
    return grids


def _guidance_plot(study, arms, claim, out) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arm = claim["arms"][0]
    agg = arms[arm]["aggregate"]
    scales = sorted(agg, key=float)
    metrics = claim.get("metrics") or ("class_consistency", "consistency", "diversity")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.6))
    for ax, m in zip(np.atleast_1d(axes), metrics):
        mean = [(agg[s].get(m) or {}).get("mean") for s in scales]
        sd = [(agg[s].get(m) or {}).get("sd") or 0.0 for s in scales]
        xs = [float(s) for s, v in zip(scales, mean) if v is not None]
        ys = [v for v in mean if v is not None]
        es = [e for e, v in zip(sd, mean) if v is not None]
        ax.errorbar(xs, ys, yerr=es, marker="o")
        ax.set_xlabel("guidance scale")
        ax.set_title(m, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "grids", f"guidance_curve_{arm}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(study: dict, out: str, *, command: str = "") -> dict:
    """REPORT.md + report.json (+ grids) in `out` from the results present; returns report.json's dict."""
    arms = collect(study, out)
    grids = make_grids(study, arms, out)
    chance = 1.0 / study["num_classes"] if study["num_classes"] else None
    md: list[str] = [f"# {study['title']}", ""]
    now = datetime.datetime.now().isoformat(timespec="seconds")
    md += [f"Generated {now} by `semantica_jax.study` from the files in `{out}`"
           + (f" (last command: `{command}`)." if command else "."),
           "Every number and verdict below is computed from those files; nothing is written by hand.", ""]
    if study["description"]:
        md += [study["description"].strip(), ""]

    # ---------------------------------------------------------------- arms
    md += ["## Arms", ""]
    rows = []
    for a in study["arms"]:
        arm = arms[a["name"]]
        done = [s for s, v in arm["seeds"].items() if v.get("result")]
        cs = next((v["config"] for v in arm["seeds"].values() if v["config"]), {})
        labels = ("without " + "+".join(map(str, cs.get("exclude_labels", []))) if cs.get("exclude_labels") else "") + \
                 ("only " + "+".join(map(str, cs.get("include_labels", []))) if cs.get("include_labels") else "")
        params = next((v["denoiser_params"] for v in arm["seeds"].values() if v.get("denoiser_params")), None)
        rows.append([a["name"], ", ".join(a["claims"]) or "–", f"`{_display_spec(a['config'])}`",
                     f"{len(done)} of {len(a['seeds'])} (seeds {', '.join(map(str, a['seeds']))})",
                     cs.get("pairing", "–"), cs.get("encoder", "–"), cs.get("filter", "–"), labels or "all",
                     str(cs.get("num_steps", "–")), str(cs.get("batch_size", "–")),
                     f"{params / 1e6:.2f} M" if params else "–", a["description"] or ""])
    md += _md_table(["arm", "claims", "config", "seeds evaluated", "pairing", "encoder", "filter", "train classes",
                     "steps", "batch", "denoiser", "what it is"], rows) + [""]
    fps = {json.dumps({k: v for k, v in (s["eval_fingerprint"] or {}).items() if k != "guidance_scales"},
                      sort_keys=True)
           for arm in arms.values() for s in arm["seeds"].values() if s.get("eval_fingerprint")}
    first_result = next((s["result"] for arm in arms.values() for s in arm["seeds"].values() if s.get("result")), None)
    if first_result:
        md += [f"Eval protocol (docs/EVALUATION.md): {first_result['groups']} groups by {first_result['group_by']}, "
               f"{first_result['shots']} conditioning images per group x {first_result['samples_per_condition']} "
               f"samples each, sampler {next(iter(first_result['by_guidance'].values())).get('sampler', '?')}, "
               f"eval seed {_eval_seed(arms)}, "
               f"features: {first_result['extractor']}; class_consistency is judged by a linear probe on those "
               f"features fitted on the real eval images (its 2-fold accuracy on real images, the 'probe ceiling', "
               f"bounds it)" + ("; class_consistency_pixels is the same with a linear probe on grey pixels "
                                "(ceiling: 'pixel probe ceiling')" if "class_consistency_pixels" in study["metrics"]
                                else "") + (f"; chance = 1/{study['num_classes']} = {chance:.3f}." if chance else "."),
               "All arms were evaluated with the same eval settings (same conditions and noise)."
               if len(fps) == 1 else
               "WARNING: the arms' eval settings differ (conditions/noise are not shared across all arms): "
               "compare only rows with the same settings.", ""]

    # ---------------------------------------------------------------- claims
    claims_out, summary = [], []
    for c in study["claims"]:
        md += [f"## {c['title']}", ""]
        if c["question"]:
            md += [c["question"].strip(), ""]
        entry: dict[str, Any] = {"id": c["id"], "title": c["title"], "kind": c["kind"]}
        missing = [n for n in c["arms"] if not _n_seeds(arms[n])]
        if missing:
            md += [f"Not evaluated yet: {', '.join(missing)}.", ""]
        if c["kind"] == "compare":
            extra = None
            if c.get("similarity"):
                kept = {n: similarity_kept(next((v["config"] for v in arms[n]["seeds"].values() if v["config"]), {}))
                        for n in c["arms"]}
                extra = [("pairs kept %", lambda n, k=kept: _pct((k[n] or {}).get("pairs"))),
                         ("pages kept %", lambda n, k=kept: _pct((k[n] or {}).get("pages")))]
                entry["similarity"] = kept
            header, rows, data = _metric_rows(study, arms, c["arms"], c.get("guidance", study["table_guidance"]), extra)
            md += _md_table(header, rows) + [""]
            entry["table"] = data
            if c.get("similarity"):
                notes = {(v or {}).get("note") for v in entry["similarity"].values() if (v or {}).get("note")}
                srcs = {(v or {}).get("report") for v in entry["similarity"].values() if (v or {}).get("report")}
                for src in sorted(srcs):
                    rep = next(v for v in entry["similarity"].values() if (v or {}).get("report") == src)
                    md += [f"Kept fractions from `{src}` (pairs within the pages of {rep.get('shards')}; mean "
                           f"within-page similarity {rep.get('mean_similarity')}, percentiles "
                           f"{rep.get('percentiles')})."]
                md += [f"Note: {n}." for n in sorted(notes - {'no filter'})] + [""]
        elif c["kind"] == "heldout":
            md += _heldout_section(study, arms, c, chance, entry)
        elif c["kind"] == "guidance":
            md += _guidance_section(study, arms, c, entry, out)
        verdicts = [evaluate_check(study, arms, k) for k in c["checks"]]
        if c["kind"] == "heldout":
            verdicts = entry.pop("verdicts") + verdicts
        for v in verdicts:
            md.append(f"- **{v['statement']}: {v['verdict']}** — {v['detail']}")
            summary.append((c["title"], v))
        md.append("")
        entry["verdicts"] = [{k: v for k, v in x.items() if k != "check"} for x in verdicts]
        claims_out.append(entry)

    # ---------------------------------------------------------------- grids
    md += ["## Samples side by side", ""]
    if grids:
        md += ["Each panel: one row per eval group (its first conditioning image, left, then its variations); "
               "the eval plan is the same for every arm, so rows share their conditioning image across panels.", ""]
        for k, p in grids.items():
            md += [f"**{k}**", "", f"![{k}]({os.path.relpath(p, out)})", ""]
    else:
        md += ["No eval grids yet.", ""]

    # ---------------------------------------------------------------- wall times
    md += ["## Wall time", ""]
    rows, budget = [], float(study["budget_minutes"] or 0)
    worst = 0.0
    for a in study["arms"]:
        for s, v in arms[a["name"]]["seeds"].items():
            tot = v.get("total_seconds")
            worst = max(worst, tot or 0.0)
            rows.append([a["name"], str(s), v["state"], _mins(v.get("train_seconds")),
                         _mins(v.get("export_seconds")), _mins(v.get("eval_seconds")), _mins(tot),
                         str(v.get("train_step") or "–"),
                         fmt_num(v.get("train_loss")) if v.get("train_loss") is not None else "–"])
    md += _md_table(["arm", "seed", "state", "train min", "export min", "eval job min", "total min (train + eval subprocesses)",
                     "steps", "final train loss"], rows) + [""]
    md += [f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, XLA_FLAGS="
           f"`{os.environ.get('XLA_FLAGS', '')}` for this report's process (runs: see train.log)."]
    if budget:
        md += [f"Budget per arm and seed: {budget:g} min; longest measured: {worst / 60:.1f} min — "
               f"{'within' if worst <= budget * 60 else 'OVER'} budget." if worst else
               f"Budget per arm and seed: {budget:g} min; nothing measured yet."]
    md += [""]

    # ---------------------------------------------------------------- verdict summary + limits
    md += ["## Verdicts at a glance", ""]
    md += [f"- {t}: {v['statement']} → **{v['verdict']}**" for t, v in summary] or ["- nothing evaluated yet"]
    md += ["", "Rule: 'yes' only when the measured difference exceeds the stated threshold (seed spread, "
           "for class-consistency twice the binomial standard error over the samples behind the number, "
           "a minimum gap, or a relative margin, whichever is largest); 'no' when it exceeds it in the "
           "other direction; otherwise 'no clear difference'. Spread is the standard deviation over seeds "
           "(n − 1); single-seed verdicts are marked tentative.", ""]
    md += ["## Limits", ""]
    auto = []
    sums = [v["config"] for arm in arms.values() for v in arm["seeds"].values() if v["config"]]
    if sums:
        auto.append(f"Resolution {sorted({s.get('image_size') for s in sums})} px; training steps "
                    f"{sorted({s.get('num_steps') for s in sums})} at batch {sorted({s.get('batch_size') for s in sums})}.")
    nseeds = sorted({_n_seeds(arm) for arm in arms.values() if _n_seeds(arm)})
    auto.append(f"Seeds evaluated per arm: {nseeds}; differences smaller than the printed thresholds are not claimed.")
    if first_result:
        auto.append(f"Each number comes from {first_result['groups']} x {first_result['shots']} conditions x "
                    f"{first_result['samples_per_condition']} samples; FD and PRDC at this sample count are biased "
                    f"and only comparable between rows of this report.")
    md += [f"- {x}" for x in study["limits"] + auto] + [""]

    report = {
        "study": study["name"], "title": study["title"], "generated": now, "out": out, "command": command,
        "chance": chance, "metrics": list(study["metrics"]), "table_guidance": list(study["table_guidance"]),
        "arms": {n: {"seeds": {str(s): {k: v for k, v in e.items() if k != "result"}
                               | {"result_tag": (e.get("result") or {}).get("tag")}
                               for s, e in arm["seeds"].items()},
                     "aggregate": arm["aggregate"]} for n, arm in arms.items()},
        "claims": claims_out, "grids": {k: os.path.relpath(p, out) for k, p in grids.items()},
        "limits": study["limits"] + auto,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, REPORT_MD), "w") as f:
        f.write("\n".join(md) + "\n")
    write_json(os.path.join(out, REPORT_JSON), report)
    return report


def _eval_seed(arms: dict):
    seeds = {(s.get("eval_fingerprint") or {}).get("seed") for arm in arms.values() for s in arm["seeds"].values()
             if s.get("eval_fingerprint")}
    return ", ".join(str(x) for x in sorted(seeds, key=str)) or "?"


def _display_spec(spec: str) -> str:
    path, sep, arg = spec.partition(":")
    try:
        rel = os.path.relpath(path, REPO)
        path = rel if not rel.startswith("..") else path
    except ValueError:
        pass
    return path + sep + arg


def _mins(s) -> str:
    return "–" if s is None else f"{s / 60:.1f}"


def _heldout_section(study, arms, c, chance, entry) -> list[str]:
    arm, ref = c["arm"], c.get("reference")
    labels = set(c["labels"])
    names = {l: study["class_names"].get(l, f"label {l}") for l in sorted(labels)}
    md = [f"Held-out classes: {', '.join(f'{l} ({n})' for l, n in names.items())}. "
          f"Class-consistency is averaged over the eval groups of those classes only (per seed), "
          f"from the eval JSON's per-group results; chance = {fmt_num(chance)}.", ""]
    cs = next((v["config"] for v in arms[arm]["seeds"].values() if v["config"]), {})
    if cs:
        trained = set(cs.get("include_labels") or range(study["num_classes"] or 0)) - set(cs.get("exclude_labels") or [])
        if labels & trained:
            md += [f"WARNING: arm {arm} was trained on pages of {sorted(labels & trained)}: "
                   f"they are not held out.", ""]
    cc_metrics = list(c.get("metrics") or ("class_consistency",))
    header = ["arm", "groups", "guidance", *cc_metrics, "consistency", "diversity",
              *[f"{cc_metrics[0]} {names[l]}" for l in sorted(labels)]]
    rows, table, verdicts = [], [], []
    for g in c.get("guidance", study["table_guidance"]):
        sc = _scale_key(g)
        for n in [arm] + ([ref] if ref else []):
            for which, exclude in (("held-out classes", False), ("other classes", True)):
                st = {m: group_stats(arms[n]["seeds"], sc, labels, m, exclude=exclude)
                      for m in (*cc_metrics, "consistency", "diversity")}
                per = [per_label(arms[n]["seeds"], sc, l, cc_metrics[0]) if not exclude else None
                       for l in sorted(labels)]
                rows.append([n, which, sc, *[fmt_stat(st[m]) for m in st],
                             *[fmt_stat(p) if p else "" for p in per]])
                table.append({"arm": n, "groups": which, "guidance": sc, **st})
        for metric in cc_metrics:
            held = group_stats(arms[arm]["seeds"], sc, labels, metric)
            if chance is not None:
                value = chance + float(c["margin"])
                if held["mean"] is None:
                    v, detail = "not measured", f"no per-group results for {arm} at guidance {sc}"
                else:
                    n = group_count(arms[arm]["seeds"], sc, labels)
                    tol, tol_text = _tolerance(metric, held, n)
                    v = "yes" if held["mean"] - tol > value else ("no" if held["mean"] + tol <= value else "no clear difference")
                    detail = (f"{metric} on held-out classes at guidance {sc}: {fmt_stat(held)} over {n:.0f} "
                              f"samples vs chance {fmt_num(chance)}; 'yes' needs mean − {tol_text} > chance + "
                              f"{c['margin']:g} = {value:.3f}" + _seed_note(held))
                    if ref:
                        rst = group_stats(arms[ref]["seeds"], sc, labels, metric)
                        if rst["mean"] is not None:
                            detail += (f"; for reference, {ref} (trained on these classes) scores {fmt_stat(rst)} "
                                       f"on the same groups (gap {held['mean'] - rst['mean']:+.3f})")
                verdicts.append({"statement": f"samples conditioned on held-out classes follow the class "
                                              f"({metric}, guidance {sc})", "kind": "heldout", "metric": metric,
                                 "guidance": sc, "verdict": v, "detail": detail})
    md += _md_table(header, rows) + [""]
    entry["table"] = table
    entry["verdicts"] = verdicts
    return md


def _guidance_section(study, arms, c, entry, out) -> list[str]:
    arm = c["arms"][0]
    agg = arms[arm]["aggregate"]
    metrics = list(c.get("metrics") or study["metrics"])
    md = [f"Arm {arm}, the same checkpoints and noise at every scale (no extra training).", ""]
    rows, data = [], []
    for sc in sorted(agg, key=float):
        rows.append([sc, *[fmt_stat(agg[sc].get(m)) for m in metrics]])
        data.append({"guidance": sc, **{m: agg[sc].get(m) for m in metrics}})
    md += _md_table(["guidance", *metrics], rows) + [""]
    entry["table"] = data
    plot = _guidance_plot(study, arms, c, out) if agg else None
    if plot:
        md += [f"![guidance curve]({os.path.relpath(plot, out)})", ""]
        entry["plot"] = os.path.relpath(plot, out)
    elif agg:
        md += ["(matplotlib is not installed: table only.)", ""]
    return md


# ============================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_eval"]:
        return _eval_worker(argv[1])
    parser = argparse.ArgumentParser(prog="semantica-study", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=os.path.join(REPO, "experiments", "study_tiny.py"),
                        help="study file[:arg] (default experiments/study_tiny.py)")
    parser.add_argument("--out", default=None, help="study directory (default studies/<name>, +_smoke with --smoke)")
    parser.add_argument("--only", default="", help="comma-separated arms to run (the report covers all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds to run (default: each arm's own)")
    parser.add_argument("--steps", type=int, default=0, help="override train.num_steps of every arm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every arm (eval.* -> eval job only); repeatable")
    parser.add_argument("--smoke", action="store_true",
                        help="6 train steps and a tiny eval per arm (checks the wiring, not the claims)")
    parser.add_argument("--report_only", action="store_true", help="write the report from existing results")
    parser.add_argument("--dry_run", action="store_true", help="print each arm's commands, run nothing")
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="fake CPU devices for the runs (default: 2 unless XLA_FLAGS sets a count; "
                             "0 = leave XLA_FLAGS as it is)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the subprocesses")
    parser.add_argument("--compile_cache", default=None,
                        help="JAX compilation cache shared by the runs (default <out>/jax_cache; '' = none)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        out = args.out or os.path.join("studies", study["name"] + ("_smoke" if args.smoke else ""))
        out = os.path.abspath(out)
        cli: dict[str, Any] = dict(SMOKE_OVERRIDES) if args.smoke else {}
        cli.update(dict(parse_override(s) for s in args.set))
        if args.steps:
            cli["train.num_steps"] = int(args.steps)
        only = [x for x in args.only.split(",") if x.strip()]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or None
        command = "python -m semantica_jax.study " + " ".join(_quote(a) for a in argv)
        failed = []
        if not args.report_only:
            statuses = run_study(study, out, only=only, seeds=seeds, cli_overrides=cli, python=args.python,
                                 cpu_devices=args.cpu_devices, dry_run=args.dry_run,
                                 compile_cache=args.compile_cache)
            failed = [k for k, v in statuses.items() if v.get("state") not in ("done", None)]
            if args.dry_run:
                return 0
        write_report(study, out, command=command)
    except StudyError as e:
        print(f"semantica-study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semantica-study: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    _log(f"report: {os.path.join(out, REPORT_MD)}")
    if failed:
        _log(f"FAILED: {', '.join(failed)} (see their train.log / eval.log)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
