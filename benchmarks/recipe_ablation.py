r"""The recipe ablation of the tiny experiment: train, export and judge one row per recipe change.

  python benchmarks/recipe_ablation.py --rows=base,tie_channels --seeds=0,1
  python benchmarks/recipe_ablation.py --table            # the table of every finished row

Each row is `experiments/semantica_tiny.py[:variant]` plus `--config.*` overrides, trained in
its own workdir under --root (default workdirs/recipe/<row>_s<seed>; finished rows are skipped,
so the command resumes), exported, and scored by the eval job with the ablation's eval settings
(10 classes x 5 held-out conditioning images x 4 variations, DDIM-50, guidance 1 and 2, plus
--guidance extra scales): class-consistency by the class judge (evaluation/judge.py; its
ceiling is its accuracy on the real eval images), its worst class, pixel diversity among one
condition's variations (and of real same-class images), pixel distance to the condition, the
memorisation ratio and the train wall time (the whole training process: start-up, compile, steps).
Sampler rows (`sampler_*`) re-score the `base` row's export with other sampler settings.
Results: <root>/results.json (one entry per row and seed) and a markdown table on stdout
(docs/RECIPE.md holds the measured table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data_pipeline import fashion_mnist  # noqa: E402
from semantica_jax import images  # noqa: E402
CONFIG = os.path.join(REPO, "experiments", "semantica_tiny.py")

# The base recipe the rows change one thing against: the default config at 1,300 steps, without
# tie_channels and with the 16/32/64 ladder at 32/16/8 px (no patchified stem), evaluated and
# sampled on the same schedule as when the table was measured (so it reproduces after the
# default moved on).
BASE = ("diffusion.tie_channels=False", "train.num_steps=1300", "model.patch_size=1",
        "model.channels=(16,32,64)", "train.eval_every=250", "train.sample_every=800")


class OnDefault(tuple):
    """A row's overrides applied to the default config itself (not on top of BASE)."""


# name: (variant, config overrides on top of BASE (or OnDefault: on top of the default), what
# the row changes)
ROWS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "default": ("", None, "the default of experiments/semantica_tiny.py (base + tie_channels + patch2, "
                          "3,600 steps)"),
    "base": ("", (), "the base recipe (padded targets, no shift, attention at 8 px, 56-px tokens, 1,300 steps)"),
    "previous_default": ("enc_res=28", ("data.target_fit=resize", "diffusion.base_resolution=64",
                                        "model.attn_resolution=16"),
                         "the recipe this one replaced: resized targets, shift +2 log 2, attention at 16 and 8 px, "
                         "28-px tokens"),
    "tie_channels": ("", ("diffusion.tie_channels=True",), "grey diffusion: one noise draw for the 3 channels"),
    "steps2x": ("", ("train.num_steps=2600",), "twice the steps (2,600)"),
    "batch64": ("", ("batch_size=64",), "batch 64 (same steps: twice the examples)"),
    "resize": ("", ("data.target_fit=resize",), "28 -> 32 px by antialiased resize instead of padding"),
    "shift": ("", ("diffusion.base_resolution=64",), "schedule shifted +2 log 2 (base 64 at 32 px)"),
    "tokens28": ("enc_res=28", (), "encoder at 28 px: 4 patch tokens + CLS"),
    "tokens112": ("enc_res=112", (), "encoder at 112 px: 64 patch tokens + CLS"),
    "attn16": ("", ("model.attn_resolution=16",), "transformer blocks at 16 and 8 px"),
    "pooled_only": ("", ("model.token_cond=False",), "conditioning through the pooled vector only"),
    "tokens_only": ("", ("model.pooled_cond=False",), "conditioning through cross-attention only"),
    "cond_dim32": ("", ("model.cond_dim=32",), "tokens projected to 32 instead of 64"),
    "wide": ("", ("model.channels=(32,64,128)", "train.num_steps=520"),
             "2x channels at the same train wall time (2.2 vs 5.5 steps/s: 520 steps)"),
    "patch2": ("", ("model.patch_size=2", "model.channels=(32,64)"),
               "patchified stem: 2x2 pixel blocks folded into channels, levels at 16 and 8 px "
               "with 32 / 64 channels (no 32-px feature maps)"),
    "lr3e-4": ("", ("optimizer.learning_rate=3e-4",), "learning rate 3e-4"),
    "ema0.999": ("", ("optimizer.ema_decay=0.999",), "EMA decay 0.999"),
    "cosine": ("", ("optimizer.decay=cosine",), "learning rate decayed to 0 by a cosine"),
    "drop0.2": ("", ("diffusion.cond_drop_prob=0.2",), "condition dropped with p 0.2"),
    "eps_loss": ("", ("diffusion.loss_weighting=eps",), "eps-MSE loss weighting"),
    "sigmoid_loss": ("", ("diffusion.loss_weighting=sigmoid",), "sigmoid loss weighting (bias -3)"),
    "x_loss": ("", ("diffusion.loss_weighting=x",), "x-space L2 (the paper's loss)"),
    # Rows on the default recipe (3,600 steps, tie_channels, patch2).
    "default_steps2x": ("", OnDefault(("train.num_steps=7200",)), "the default at twice the steps (7,200)"),
    "default_lr2e-3": ("", OnDefault(("optimizer.learning_rate=2e-3",)), "the default at learning rate 2e-3"),
    "default_ema0.999": ("", OnDefault(("optimizer.ema_decay=0.999",)), "the default with EMA decay 0.999"),
    "default_data4": ("", OnDefault(("data.train_files=" + os.path.join(
        REPO, "data", "fashion_mnist_pages_img_focus56", "train-0000[0-3]-of-00008.tfrecord"),)),
                      "the default on 4 of the 8 training shards (30,000 images instead of 15,000; "
                      "cache: `python -m semantica_jax.embed_cache --src=...train-0000[23]...`)"),
    "default_tokens112": ("enc_res=112", OnDefault(()), "the default with the encoder at 112 px: 64 patch tokens + "
                          "CLS (cache: `launch/prepare_data.sh experiments/semantica_tiny.py:enc_res=112`)"),
    "default_drop0.2": ("", OnDefault(("diffusion.cond_drop_prob=0.2",)),
                        "the default with the condition dropped with p 0.2"),
}


def row_overrides(name: str) -> tuple[str, ...]:
    """BASE merged with the row's overrides (the row's value wins); `default` has none, and
    OnDefault rows only their own."""
    extra = ROWS[name][1]
    if extra is None:
        return ()
    if isinstance(extra, OnDefault):
        return tuple(extra)
    merged = dict(o.split("=", 1) for o in BASE)
    merged.update(o.split("=", 1) for o in extra)
    return tuple(f"{k}={v}" for k, v in merged.items())


# Eval-only rows on the `base` export: name -> (eval overrides, what they change).
SAMPLER_ROWS: dict[str, tuple[tuple[str, ...], str]] = {
    "sampler_ddpm100": (("eval.sampler=ddpm", "eval.num_steps=100"), "DDPM ancestral, 100 steps"),
    "sampler_ddim20": (("eval.num_steps=20",), "DDIM, 20 steps"),
    "sampler_ddim200": (("eval.num_steps=200",), "DDIM, 200 steps"),
}
EVAL_SETTINGS = ("eval.shots=5", "eval.samples_per_condition=4", "eval.sampler=ddim", "eval.num_steps=50")


def _flags(overrides) -> list[str]:
    return [f"--config.{o}" for o in overrides]


def _run(cmd: list[str], log_path: str, env: dict) -> float:
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"recipe_ablation: {' '.join(cmd[:4])}... failed (exit {proc.returncode}); see {log_path}")
    return time.perf_counter() - t0


def _latest_eval(workdir: str) -> dict | None:
    out = os.path.join(workdir, "eval")
    if not os.path.isdir(out):
        return None
    names = sorted(n for n in os.listdir(out) if n.startswith("export_step_") and n.endswith(".json"))
    if not names:
        return None
    with open(os.path.join(out, names[-1])) as f:
        return json.load(f)


def summarise(result: dict, train_seconds: float | None) -> dict:
    row = {"train_seconds": train_seconds, "step": result["step"],
           "judge_ceiling": result.get("judge_accuracy_real"), "by_guidance": {}}
    for g, r in result["by_guidance"].items():
        per_class = {e["group"]: e.get("class_consistency_judge") for e in r["per_group"]}
        row["by_guidance"][g] = {
            "class_consistency_judge": r.get("class_consistency_judge"),
            "worst_class": min(per_class.items(), key=lambda kv: kv[1]) if per_class else None,
            "pixel_diversity": r["pixel_diversity"], "pixel_diversity_real": r.get("pixel_diversity_real"),
            "pixel_distance_to_condition": r["pixel_distance_to_condition"],
            "memorization_ratio": r.get("memorization_ratio"), "fd": r["fd"],
            "class_consistency_lite0": r.get("class_consistency"),
        }
    return row


def run_row(name: str, seed: int, root: str, guidance: str, env: dict) -> dict:
    sampler_row = name in SAMPLER_ROWS
    base = "base" if sampler_row else name
    workdir = os.path.join(root, f"{base}_s{seed}")
    eval_dir = os.path.join(root, f"{name}_s{seed}") if sampler_row else workdir
    variant, overrides = ROWS[base][0], row_overrides(base)
    config = CONFIG + (f":{variant}" if variant else "")
    os.makedirs(eval_dir, exist_ok=True)
    log = os.path.join(eval_dir, "ablation.log")
    timing_path = os.path.join(workdir, "ablation_train_seconds.json")
    py = sys.executable
    train_flags = _flags(overrides) + [f"--config.seed={seed}"]
    if not os.path.exists(os.path.join(workdir, "metrics.json")):
        seconds = _run([py, "-m", "semantica_jax.main", f"--config={config}", f"--workdir={workdir}"] + train_flags,
                       log, env)
        with open(timing_path, "w") as f:
            json.dump({"train_seconds": seconds}, f)
    train_seconds = json.load(open(timing_path))["train_seconds"] if os.path.exists(timing_path) else None
    export = os.path.join(workdir, "export")
    if not os.path.exists(os.path.join(export, "export.json")):
        _run([py, "-m", "semantica_jax.main", "--mode=export", f"--workdir={workdir}", f"--export_dir={export}"],
             log, env)
    result = _latest_eval(eval_dir)
    if result is None:
        eval_overrides = EVAL_SETTINGS + (f"eval.guidance_scales=({guidance})",) + (
            SAMPLER_ROWS[name][0] if sampler_row else ())
        _run([py, "-m", "semantica_jax.main", "--mode=eval", f"--config={config}", f"--workdir={eval_dir}",
              f"--eval_export={export}"] + train_flags + _flags(eval_overrides), log, env)
        result = _latest_eval(eval_dir)
    return summarise(result, train_seconds)


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def table(results: dict) -> str:
    lines = ["| row | change | seeds | judge g1 | judge g2 | judge g3 | worst class g1 | pixel div. g1 (real) | dist. to cond. g1 | memo. ratio | train wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, seeds in results.items():
        what = ROWS[name][2] if name in ROWS else SAMPLER_ROWS[name][1]
        runs = list(seeds.values())

        def mean(key, g="1"):
            vals = [r["by_guidance"][g][key] for r in runs if g in r["by_guidance"] and r["by_guidance"][g][key] is not None]
            if not vals:
                return "–"
            m = sum(vals) / len(vals)
            return f"{m:.2f}" + (f" ± {max(vals) - min(vals):.2f}" if len(vals) > 1 else "")

        worst = runs[0]["by_guidance"].get("1", {}).get("worst_class")
        if worst:
            worst = (images.class_names_for([worst[0]], fashion_mnist.CLASS_NAMES)[0], worst[1])
        secs = [r["train_seconds"] for r in runs if r.get("train_seconds")]
        lines.append(
            f"| {name} | {what} | {len(runs)} | {mean('class_consistency_judge')} | {mean('class_consistency_judge', '2')} | "
            f"{mean('class_consistency_judge', '3')} | "
            f"{(worst[0] + ' ' + _fmt(worst[1])) if worst else '–'} | {mean('pixel_diversity')} "
            f"({_fmt(runs[0]['by_guidance'].get('1', {}).get('pixel_diversity_real'))}) | "
            f"{mean('pixel_distance_to_condition')} | {mean('memorization_ratio')} | "
            + (f"{(sum(secs) / len(secs) / 60):.1f} min |" if secs else "– |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="default", help=f"comma-separated, of {sorted(ROWS) + sorted(SAMPLER_ROWS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--root", default=os.path.join(REPO, "workdirs", "recipe"))
    parser.add_argument("--guidance", default="1.0,2.0,3.0", help="guidance scales the eval job scores")
    parser.add_argument("--table", action="store_true",
                        help="only print the table of finished rows (those of --rows, in its order, when given)")
    args = parser.parse_args(argv)
    results_path = os.path.join(args.root, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    if not args.table:
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), TF_CPP_MIN_LOG_LEVEL="2",
                   XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=2"))
        for name in [r for r in args.rows.split(",") if r]:
            if name not in ROWS and name not in SAMPLER_ROWS:
                raise SystemExit(f"recipe_ablation: unknown row {name!r}; known: {sorted(ROWS) + sorted(SAMPLER_ROWS)}")
            for seed in [int(s) for s in args.seeds.split(",")]:
                print(f"[recipe_ablation] {name} seed {seed} ...", flush=True)
                results.setdefault(name, {})[str(seed)] = run_row(name, seed, args.root, args.guidance, env)
                os.makedirs(args.root, exist_ok=True)
                tmp = results_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(results, f, indent=2)
                os.replace(tmp, results_path)
                print(table({name: results[name]}).splitlines()[-1], flush=True)
    ceiling = next((r.get("judge_ceiling") for s in results.values() for r in s.values()), None)
    print(f"judge ceiling (accuracy on the real eval images): {_fmt(ceiling)}")
    if args.table and args.rows != parser.get_default("rows"):
        results = {n: results[n] for n in args.rows.split(",") if n in results}
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
