"""Study files and overrides: loading and checking a study, the per-arm overrides and config,
shared constants and JSON files."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from typing import Any

import numpy as np

from semantica_jax import config_lib, fileio


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
# --smoke: every arm a wiring check (no eval or grid inside the run: the eval job is the eval).
SMOKE_OVERRIDES = config_lib.smoke_overrides(6, in_run=False)


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
    """`config_lib.apply_overrides`, raising StudyError (unknown keys, wrong types)."""
    try:
        config_lib.apply_overrides(config, overrides)
    except config_lib.ConfigError as e:
        raise StudyError(str(e)) from None


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
    try:
        config = config_lib.load_config_file(arm["config"])
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


def scale_key(g: float) -> str:
    return f"{float(g):g}"
