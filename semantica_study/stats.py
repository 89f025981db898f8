"""The numbers of a study: results collected per arm and seed, statistics, and the checks that turn
them into verdicts."""
from __future__ import annotations

import math
import os
import re

import numpy as np

from semantica_study.spec import STATUS_FILE, StudyError, arm_dir, read_json, scale_key


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


def seed_results(seeds: dict) -> list[dict]:
    return [v["result"] for v in seeds.values() if v.get("result")]


def aggregate(seeds: dict) -> dict:
    """{scale: {metric: stats over seeds}} for every scale all evaluated seeds share."""
    results = seed_results(seeds)
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
    for r in seed_results(seeds):
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
    for r in seed_results(seeds):
        for g in (r["by_guidance"].get(scale) or {}).get("per_group") or []:
            if _label_of(g["group"]) in labels:
                total += int(g.get("num_generated", 0))
    return float(total)


def per_label(seeds: dict, scale: str, label: int, metric: str) -> dict:
    return group_stats(seeds, scale, {label}, metric)


def judged_as(seeds: dict, scale: str, label: int) -> dict[int, int]:
    """label -> how many variations of the `label` group the class judge assigned to it, summed
    over seeds (the eval results' per-group `judge_predicted`); {} when none recorded it."""
    total: dict[int, int] = {}
    for r in seed_results(seeds):
        for g in (r["by_guidance"].get(scale) or {}).get("per_group") or []:
            if _label_of(g["group"]) == label:
                for k, v in (g.get("judge_predicted") or {}).items():
                    total[int(k)] = total.get(int(k), 0) + int(v)
    return total


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


def seed_note(*sts: dict) -> str:
    n = min((st or {}).get("n", 0) for st in sts)
    return " (single seed: no spread measured, tentative)" if n == 1 else ""


def evaluate_check(study: dict, arms: dict, check: dict) -> dict:
    """One check -> {statement, verdict, detail}; verdicts: yes / no / no clear difference /
    not measured. The rule and its threshold are in the detail."""
    kind, metric = check["kind"], check["metric"]
    scale = scale_key(check.get("guidance", study["table_guidance"][0]))
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
                  + seed_note(a, b))
        return {**res, "verdict": verdict, "difference": d, "threshold": t, "detail": detail}
    if kind in ("above", "below"):
        a = st_of(check["arm"])
        value = float(check["value"])
        if not a or a["mean"] is None:
            return {**res, "verdict": "not measured", "detail": f"{metric} at guidance {scale} missing for {check['arm']}"}
        tol, tol_text = tolerance(metric, a, _num_samples(arms, check["arm"], scale))
        if kind == "above":
            verdict = "yes" if a["mean"] - tol > value else ("no" if a["mean"] + tol <= value else "no clear difference")
            rule = f"'yes' needs mean − {tol_text} > {value:g}"
        else:
            verdict = "yes" if a["mean"] + tol < value else ("no" if a["mean"] - tol >= value else "no clear difference")
            rule = f"'yes' needs mean + {tol_text} < {value:g}"
        detail = f"{metric} at guidance {scale}: {check['arm']} {fmt_stat(a)}; {rule}" + seed_note(a)
        return {**res, "verdict": verdict, "detail": detail}
    if kind == "trend":  # same arm, first vs last guidance scale, paired over seeds
        arm = check["arm"]
        seeds = (arms.get(arm) or {}).get("seeds", {})
        results = seed_results(seeds)
        lo, hi = scale_key(check["from"]), scale_key(check["to"])
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
                  f"'yes' needs a {word} by more than {rule}" + seed_note(dst))
        return {**res, "verdict": verdict, "difference": d, "threshold": t, "detail": detail}
    raise StudyError(f"unknown check kind {kind!r}")


def tolerance(metric: str, st: dict, n: float) -> tuple[float, str]:
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
