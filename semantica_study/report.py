"""The report of a study: REPORT.md, report.json and the grids and plots it links."""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import numpy as np

from semantica_study.spec import REPO, REPORT_JSON, REPORT_MD, read_json, scale_key, write_json
from semantica_study.stats import (
    collect, evaluate_check, fmt_num, fmt_stat, group_count, group_stats, judged_as, per_label, seed_note,
    seed_results, tolerance
)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def _n_seeds(arm: dict) -> int:
    return len(seed_results(arm["seeds"]))


def _metric_rows(study, arms, names, scales, extra=None) -> tuple[list[str], list[list[str]], list[dict]]:
    ceilings = [("probe ceiling", "probe_accuracy_real")]
    if "class_consistency_pixels" in study["metrics"]:
        ceilings.append(("pixel probe ceiling", "pixel_probe_accuracy_real"))
    header = ["arm", "seeds", "guidance", *study["metrics"], *[h for h, _ in ceilings]] + [h for h, _ in (extra or [])]
    rows, data = [], []
    for n in names:
        agg = arms[n]["aggregate"]
        for g in scales:
            sc = scale_key(g)
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
        sc = scale_key(g)
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


def _guidance_plot(study, arms, claim, out) -> str:
    import matplotlib

    matplotlib.use("Agg")  # matplotlib is a declared dependency (requirements.txt)
    import matplotlib.pyplot as plt

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
    md += [f"Generated {now} by `semantica_study` from the files in `{out}`"
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
        sc = scale_key(g)
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
                    tol, tol_text = tolerance(metric, held, n)
                    v = "yes" if held["mean"] - tol > value else ("no" if held["mean"] + tol <= value else "no clear difference")
                    detail = (f"{metric} on held-out classes at guidance {sc}: {fmt_stat(held)} over {n:.0f} "
                              f"samples vs chance {fmt_num(chance)}; 'yes' needs mean − {tol_text} > chance + "
                              f"{c['margin']:g} = {value:.3f}" + seed_note(held))
                    if ref:
                        rst = group_stats(arms[ref]["seeds"], sc, labels, metric)
                        if rst["mean"] is not None:
                            detail += (f"; for reference, {ref} (trained on these classes) scores {fmt_stat(rst)} "
                                       f"on the same groups (gap {held['mean'] - rst['mean']:+.3f})")
                verdicts.append({"statement": f"samples conditioned on held-out classes follow the class "
                                              f"({metric}, guidance {sc})", "kind": "heldout", "metric": metric,
                                 "guidance": sc, "verdict": v, "detail": detail})
    md += _md_table(header, rows) + [""]
    # The confusion: which (seen) class the judge sees in the held-out classes' variations.
    confusion, conf_rows = [], []
    for g in c.get("guidance", study["table_guidance"]):
        sc = scale_key(g)
        for l in sorted(labels):
            counts = judged_as(arms[arm]["seeds"], sc, l)
            if not counts:
                continue
            total = sum(counts.values())
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            conf_rows.append([names[l], sc, str(total), ", ".join(
                f"{study['class_names'].get(k, f'label {k}')} {v / total:.2f}" for k, v in top)])
            confusion.append({"label": l, "guidance": sc, "variations": total,
                              "judged_as": {str(k): v for k, v in sorted(counts.items())}})
    if conf_rows:
        md += [f"What the class judge sees in the variations of the held-out classes (arm {arm}, all "
               f"seeds; the three most frequent classes and their fractions):", ""]
        md += _md_table(["held-out class", "guidance", "variations", "judged as"], conf_rows) + [""]
    entry["table"] = table
    entry["confusion"] = confusion
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
    return md
