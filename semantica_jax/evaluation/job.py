r"""The eval job: a separate process that evaluates every checkpoint of a workdir (or an export).

  python -m semantica_jax.main --mode=eval --config=experiments/semantica_tiny.py --workdir=W
  semantica-eval --config=experiments/semantica_tiny.py --workdir=W [--once] [--export=DIR]

It watches `W/checkpoints/`, and for each checkpoint it has not finished yet runs the few-shot
protocol (semantica_jax/evaluation/fewshot.py) for every `eval.guidance_scales` entry, then:
  W/eval/step_<S>.json     all numbers (+ per-group tables, settings, timings, extractor)
  W/eval/grids/step_<S>_g<scale>.png   one conditioning image per group | its variations
  W/eval/plots/step_<S>_per_class.png  class-consistency per class and guidance (the judge's
                           ceiling marked); _tradeoff.png: consistency vs diversity over guidance
  W/eval/                  TensorBoard events (scalars `fewshot/g<scale>/<metric>`, grids, plots)
  W/eval/progress.json     the steps finished (written after each): a restarted job skips them
With --export the results are tagged `export_step_<S>`, and the export's MODEL_CARD.md is
rewritten with the headline numbers, the best grid and the plots (copied to DIR/card/).
It stops when the checkpoint of the config's last train step is done, with --once after one
pass, or after `eval.idle_timeout_seconds` without a new checkpoint. Checkpoints deleted by the
trainer's `max_to_keep` before the job reached them are logged and skipped; a checkpoint that
exists but fails to restore raises.

The model config comes from each checkpoint (or export); the `eval` section (and nothing else)
from `--config`. Real reference features are computed once per (eval files, extractor,
resolution, selection) and cached on disk (`eval.cache_dir`). Sampling is sharded
data-parallel over every device of the job. Launched on several processes (a multi-host job,
launch/local_multihost.sh), each samples its share of every batch and all compute the same
numbers from the gathered samples; process 0 fills the caches first, writes every file and
decides which checkpoint comes next.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from semantica_jax import checkpointing, config_lib, export as export_lib, fileio, images as images_lib, sampling
from semantica_jax.evaluation import fewshot

RESULT_KEYS = ("fd", "precision", "recall", "density", "coverage", "fewshot_fd", "fewshot_precision",
               "fewshot_recall", "fewshot_density", "fewshot_coverage", "consistency", "diversity",
               "pixel_diversity", "pixel_diversity_real", "pixel_distance_to_condition", "class_consistency_judge",
               "class_consistency", "class_consistency_pixels",
               "memorization_ratio", "nearest_train_distance")


class Progress:
    """`<out_dir>/progress.json`: which steps are finished (atomic rewrites)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "progress.json")
        self.done: dict[str, str] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.done = json.load(f)["done"]

    def is_done(self, tag: str) -> bool:
        return tag in self.done

    def mark(self, tag: str, result_path: str) -> None:
        self.done[tag] = result_path
        if jax.process_index() == 0:
            fileio.write_json(self.path, {"done": self.done})


def _with_eval_section(model_config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict | None):
    config = ml_collections.ConfigDict(model_config.to_dict())
    if eval_config is not None:
        config.eval = ml_collections.ConfigDict(eval_config.eval.to_dict())
    return config


class Evaluator:
    """The protocol's fixed parts (eval set, plan, extractor, reference features, probe), built
    once from the first model's config and reused for every checkpoint."""

    def __init__(self, config: ml_collections.ConfigDict):
        from semantica_jax import input_pipeline
        from semantica_jax.evaluation import features as features_lib

        ec = config.eval
        self.config = config
        files_glob = ec.files or config.data.eval_files
        if not files_glob:
            raise config_lib.ConfigError("no eval data: set config.eval.files or config.data.eval_files")
        try:
            files = input_pipeline.list_shard_files(files_glob)
        except (ValueError, FileNotFoundError) as e:
            raise config_lib.ConfigError(str(e)) from e
        size, cond = int(config.data.image_size), int(config.encoder.image_size)
        with fewshot.timed("Loading the eval set"):
            self.eval_set = fewshot.load_eval_set(
                files, image_size=size, cond_size=cond, group_by=ec.group_by, max_groups=int(ec.max_groups),
                max_per_group=int(ec.max_real_per_group), seed=int(ec.seed),
                include_labels=tuple(config.data.eval_include_labels),
                exclude_labels=tuple(config.data.eval_exclude_labels),
                target_fit=str(config.data.target_fit))
        self.plan = fewshot.make_plan(self.eval_set, int(ec.shots), int(ec.samples_per_condition), int(ec.seed))
        logging.info("Eval set: %d images in %d groups from %d files (%d skipped); %d conditions x %d samples",
                     len(self.eval_set.images), self.eval_set.num_groups, len(files),
                     self.eval_set.skipped_images, len(self.plan.cond_rows), self.plan.samples_per_condition)
        try:
            self.extractor = features_lib.get_extractor(
                ec.extractor, resolution=int(ec.extractor_resolution) or None,
                weights_path=ec.extractor_weights or None, encoder_config=config.encoder)
        except (ValueError, FileNotFoundError) as e:
            raise config_lib.ConfigError(f"config.eval.extractor={ec.extractor!r}: {e}") from e
        cache = fewshot.FeatureCache(ec.cache_dir)
        base_key = {"extractor": self.extractor.cache_key, "image_size": size,
                    "target_fit": str(config.data.target_fit)}
        key = {**base_key, "files": fewshot.files_fingerprint(files), "group_by": ec.group_by,
               "max_groups": int(ec.max_groups), "max_real_per_group": int(ec.max_real_per_group),
               "include_labels": [int(v) for v in config.data.eval_include_labels],
               "exclude_labels": [int(v) for v in config.data.eval_exclude_labels],
               "seed": int(ec.seed), "n": len(self.eval_set.images)}
        with fewshot.timed(f"Reference features ({self.extractor.description})"):
            self.real_feats = cache.get_or_compute(key, lambda: self.extractor(self.eval_set.images))
        self.probe, self.probe_accuracy = None, float("nan")
        self.pixel_probe, self.pixel_probe_accuracy = None, float("nan")
        labels = self.eval_set.labels
        if np.all(labels >= 0) and len(np.unique(labels)) >= 2:
            with fewshot.timed("Linear probes (features, pixels)"):
                self.probe, self.probe_accuracy = cache.get_or_fit_probe(
                    {**key, "probe": "features"}, lambda: self.real_feats, labels, int(ec.seed))
                self.pixel_probe, self.pixel_probe_accuracy = cache.get_or_fit_probe(
                    {**key, "extractor": "grey pixels", "probe": "pixels", "pixel_size": fewshot._PIXEL_PROBE_SIZE},
                    lambda: fewshot.pixel_features(self.eval_set.images), labels, int(ec.seed))
            logging.info("Linear probe on real %s features: 2-fold accuracy %.3f; on grey pixels: %.3f",
                         self.extractor.name, self.probe_accuracy, self.pixel_probe_accuracy)
        self.judge, self.judge_accuracy, self.judge_accuracy_per_group = None, float("nan"), []
        if ec.judge not in ("cnn", "none"):
            raise config_lib.ConfigError(f"config.eval.judge={ec.judge!r}; expected 'cnn' or 'none'")
        if ec.judge == "cnn" and np.all(labels >= 0) and len(np.unique(labels)) >= 2:
            with fewshot.timed("Class judge"):
                self.judge = self._judge(config, cache, size)
            hits = self.judge.predict(self.eval_set.images) == labels
            self.judge_accuracy = float(hits.mean())
            self.judge_accuracy_per_group = [float(hits[self.eval_set.groups == g].mean())
                                             for g in range(self.eval_set.num_groups)]
            logging.info("Class judge: accuracy %.3f on the %d real eval images (held out from its training)",
                         self.judge_accuracy, len(labels))
        elif ec.judge == "cnn":
            logging.info("Class judge: not applicable (the eval set has no class labels)")
        self.train_feats, self.real_nn = None, None
        n_train = int(ec.memorization_images)
        if n_train > 0 and config.data.train_files:
            try:
                train_files = input_pipeline.list_shard_files(config.data.train_files)
            except (ValueError, FileNotFoundError) as e:
                logging.warning("Memorisation check off: %s", e)
                train_files = []
            if train_files:
                tkey = {**base_key, "files": fewshot.files_fingerprint(train_files), "train_images": n_train}
                self.train_feats = cache.get_or_compute(tkey, lambda: self.extractor(
                    fewshot.load_images(train_files, image_size=size, max_images=n_train,
                                        target_fit=str(config.data.target_fit))[0]))
                from semantica_jax.evaluation import metrics as metrics_lib

                self.real_nn = float(np.mean(metrics_lib.nearest_neighbor_distance(self.real_feats, self.train_feats)))

    def _judge(self, config: ml_collections.ConfigDict, cache: fewshot.FeatureCache, size: int):
        from semantica_jax import input_pipeline
        from semantica_jax.evaluation import judge as judge_lib

        ec = config.eval
        pattern = ec.judge_files or config.data.train_files
        if not pattern:
            raise config_lib.ConfigError("the class judge needs labelled training shards: set "
                                         "config.eval.judge_files (or eval.judge='none')")
        try:
            files = input_pipeline.list_shard_files(pattern)
        except (ValueError, FileNotFoundError) as e:
            raise config_lib.ConfigError(f"config.eval.judge_files: {e}") from e
        eval_files = {os.path.abspath(f) for f in self.eval_set.files}
        if eval_files & {os.path.abspath(f) for f in files}:
            raise config_lib.ConfigError("config.eval.judge_files overlap the eval files: the judge "
                                         "must be trained on the training split only")
        fit = str(config.data.target_fit)
        settings = judge_lib.JudgeSettings(epochs=int(ec.judge_epochs), seed=int(ec.seed))
        key = {"judge": settings.key(), "files": fewshot.files_fingerprint(files), "image_size": size,
               "target_fit": fit}

        def fit_judge():
            images, labels = fewshot.load_images(files, image_size=size, target_fit=fit)
            if len(labels) == 0 or np.any(labels < 0):
                raise config_lib.ConfigError(f"the class judge needs labelled pages; {pattern} has "
                                             f"{int(np.sum(labels < 0))} unlabelled images")
            return judge_lib.train_judge(images, labels, settings).to_arrays()

        return judge_lib.Judge.from_arrays(cache.get_or_compute_arrays(key, fit_judge, what="class judge"))

    def check_compatible(self, config: ml_collections.ConfigDict) -> None:
        """Later checkpoints must share the eval set's resolutions (the cached features)."""
        for sect, name in (("data", "image_size"), ("encoder", "image_size")):
            if self.config[sect][name] != config[sect][name]:
                raise config_lib.ConfigError(
                    f"checkpoints of one workdir disagree on {sect}.{name}: "
                    f"{self.config[sect][name]} vs {config[sect][name]}")

    def evaluate(self, model: export_lib.ExportedModel, *, out_dir: str, tag: str, step: int,
                 writer=None) -> dict[str, Any]:
        ec = self.config.eval
        es, plan = self.eval_set, self.plan
        m = plan.samples_per_condition
        cond = np.repeat(es.cond_images[plan.cond_rows], m, axis=0)
        keys = sampling.sample_keys(int(ec.seed), plan.sample_ids)
        sampler = model.sampler(batch_size=int(ec.batch_size))
        enc_params = model.encoder_params()
        result: dict[str, Any] = {
            "step": step, "tag": tag, "source": model.info.get("source", {}).get("checkpoint", model.path),
            "extractor": self.extractor.description, "feature_dim": int(self.real_feats.shape[1]),
            "groups": es.num_groups, "shots": int(ec.shots), "samples_per_condition": m,
            "group_by": ec.group_by, "probe_accuracy_real": self.probe_accuracy,
            "pixel_probe_accuracy_real": self.pixel_probe_accuracy,
            "judge_accuracy_real": self.judge_accuracy,
            "judge_accuracy_real_per_group": dict(zip(es.group_names, self.judge_accuracy_per_group)),
            "eval_config": ec.to_dict(), "eval_files": self.eval_set.files, "by_guidance": {},
        }
        for scale in ec.guidance_scales:
            settings = sampling.SamplerSettings(ec.sampler, int(ec.num_steps), float(scale),
                                                tuple(float(v) for v in ec.guidance_interval))
            t0 = time.perf_counter()
            samples = sampler.generate(model.ema_params, enc_params, cond, keys, settings,
                                       progress=sampling.log_progress(f"[{tag}] {settings.describe()}"))
            gen_s = time.perf_counter() - t0
            gen_feats = self.extractor(samples)
            numbers = fewshot.compute_metrics(
                eval_set=es, plan=plan, real_feats=self.real_feats, gen_feats=gen_feats, samples=samples,
                prdc_k=int(ec.prdc_k), seed=int(ec.seed), probe=self.probe, pixel_probe=self.pixel_probe, judge=self.judge, train_feats=self.train_feats,
                real_nn=self.real_nn)
            numbers.update(sampler=settings.describe(), generate_seconds=gen_s,
                           images_per_second=sampler.images_per_second)
            result["by_guidance"][f"{float(scale):g}"] = numbers
            grid = self._grid(samples, m)
            grid_path = os.path.join(out_dir, "grids", f"{tag}_g{float(scale):g}.png")
            if jax.process_index() == 0:
                images_lib.save_png(grid, grid_path)
            numbers["grid"] = grid_path
            logging.info("[%s] %s: %s", tag, settings.describe(),
                         ", ".join(f"{k} {numbers[k]:.4g}" for k in RESULT_KEYS if k in numbers))
            if writer is not None:
                writer.write_scalars(step, {f"fewshot/g{float(scale):g}/{k}": numbers[k]
                                            for k in RESULT_KEYS if k in numbers and np.isfinite(numbers[k])})
                writer.write_images(step, {f"fewshot/g{float(scale):g}/grid": grid[None]})
        result["plots"] = self._plots(result, out_dir, tag, step, writer)
        return result

    def _plots(self, result: dict, out_dir: str, tag: str, step: int, writer) -> dict[str, str]:
        """Per-class bars and (with several guidance scales) the consistency-vs-diversity
        curve: PNGs in `out_dir/plots/` and TensorBoard images `fewshot/plots/*`."""
        from semantica_jax.evaluation import plots

        images = {"per_class": plots.per_class_bars(result, tuple(self.config.data.class_names))}
        if len(result["by_guidance"]) > 1:
            images["tradeoff"] = plots.tradeoff_plot({tag: result}, title=f"{tag}: class-consistency vs "
                                                     "diversity over guidance")
        paths = {}
        for name, image in images.items():
            paths[name] = os.path.join(out_dir, "plots", f"{tag}_{name}.png")
            if jax.process_index() == 0:
                images_lib.save_png(image, paths[name])
            if writer is not None:
                writer.write_images(step, {f"fewshot/plots/{name}": image[None]})
        return paths

    def _grid(self, samples: np.ndarray, m: int) -> np.ndarray:
        """First conditioning image of the first `eval.grid_groups` groups | its variations."""
        plan, es = self.plan, self.eval_set
        rows, conds, labels = [], [], []
        for g in range(min(int(self.config.eval.grid_groups), es.num_groups)):
            first = int(np.flatnonzero(plan.cond_groups == g)[0])
            rows.append(samples[first * m:(first + 1) * m])
            conds.append((es.images[plan.cond_rows[first]] + 1.0) / 2.0)
            labels.append(es.group_names[g])
        labels = images_lib.class_names_for(labels, tuple(self.config.data.class_names))
        return images_lib.variation_grid(np.stack(conds), np.concatenate(rows), m, int(self.config.data.image_size),
                                         row_labels=labels)


def run_eval_job(eval_config: ml_collections.ConfigDict | None, workdir: str, *, export_dir: str | None = None,
                 once: bool = False, max_checkpoints: int = 0) -> list[dict]:
    """Evaluates the export, or every new checkpoint of `workdir`; returns the results written."""
    from clu import metric_writers

    # Several processes (a multi-host launch): all of them sample, each its share of every batch
    # on the global mesh, and compute the same numbers; process 0 alone writes files and decides
    # which checkpoint comes next (`_agreed`), so they stay in step.
    primary = jax.process_index() == 0
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    progress = Progress(out_dir)
    writer = metric_writers.create_default_writer(out_dir, asynchronous=False, just_logging=not primary)
    results: list[dict] = []
    evaluator: Evaluator | None = None

    def run_one(model: export_lib.ExportedModel, tag: str, step: int) -> None:
        nonlocal evaluator
        config = _with_eval_section(model.config, eval_config)
        if evaluator is None:
            evaluator = Evaluator(config)
        else:
            evaluator.check_compatible(config)
        result = evaluator.evaluate(model, out_dir=out_dir, tag=tag, step=step, writer=writer)
        path = os.path.join(out_dir, f"{tag}.json")
        if primary:
            fileio.write_json(path, result, default=float)
        progress.mark(tag, path)
        writer.flush()
        results.append(result)
        logging.info("Eval results for %s in %s", tag, path)

    if export_dir is not None:
        try:
            model = export_lib.load_export(export_dir)
        except export_lib.ExportError as e:
            raise config_lib.ConfigError(str(e)) from e
        tag = f"export_step_{model.step}"
        if progress.is_done(tag):
            logging.info("%s already evaluated (%s)", tag, progress.done[tag])
        else:
            run_one(model, tag, model.step)
            if primary:
                logging.info("Model card with the eval numbers: %s", update_model_card(export_dir, results[-1]))
        writer.close()
        return results

    ckpt_dir = os.path.join(workdir, "checkpoints")
    last_new = time.time()
    final_step = None
    while True:
        steps = []
        if os.path.isdir(ckpt_dir):
            ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False)
            steps = sorted(ckpt.all_steps())
            ckpt.close()
        todo = _agreed([s for s in steps if not progress.is_done(f"step_{s}")])
        for step in todo:
            try:
                model = export_lib.model_from_checkpoint(workdir, step)
            except export_lib.ExportError:
                if not os.path.isdir(os.path.join(ckpt_dir, str(step))):  # removed by max_to_keep
                    logging.warning("Checkpoint %d disappeared before evaluation (max_to_keep); skipped", step)
                    continue
                raise
            if final_step is None:
                final_step = int(model.config.train.num_steps)
            run_one(model, f"step_{step}", step)
            last_new = time.time()
            if max_checkpoints and len(results) >= max_checkpoints:
                writer.close()
                return results
        done_steps = {int(t.split("_")[-1]) for t in progress.done if t.startswith("step_")}
        if once:
            break
        if final_step is not None and final_step in done_steps:
            logging.info("Evaluated the final checkpoint (step %d); stopping", final_step)
            break
        idle = float(eval_config.eval.idle_timeout_seconds) if eval_config is not None else 3600.0
        if _agreed([int(time.time() - last_new > idle)])[0]:
            logging.info("No new checkpoint for %.0f s; stopping", idle)
            break
        poll = float(eval_config.eval.poll_seconds) if eval_config is not None else 30.0
        logging.info("Waiting for new checkpoints in %s (every %.0f s)", ckpt_dir, poll)
        time.sleep(poll)
    writer.close()
    return results


def update_model_card(export_dir: str, result: dict) -> str:
    """Copies the eval job's grid (at the guidance with the best class-consistency) and plots of
    `result` into `export_dir/card/` and rewrites the export's MODEL_CARD.md with its numbers."""
    import shutil

    from semantica_jax import model_card
    from semantica_jax.evaluation import plots

    card_dir = os.path.join(export_dir, model_card.CARD_DIR)
    os.makedirs(card_dir, exist_ok=True)
    key = plots.consistency_key(result)
    best = max(result["by_guidance"], key=lambda g: result["by_guidance"][g][key])
    sources = {"grid": result["by_guidance"][best]["grid"], **result.get("plots", {})}
    files = {}
    for name, src in sources.items():
        if src and os.path.exists(src):
            dst = f"{name}.png" if name != "grid" else f"grid_g{best}.png"
            shutil.copyfile(src, os.path.join(card_dir, dst))
            files[name] = f"{model_card.CARD_DIR}/{dst}"
    return model_card.write(export_dir, result, card_files=files)


def _agreed(values: list[int]) -> list[int]:
    """Process 0's list of ints, on every process (itself on a single host)."""
    if jax.process_count() == 1:
        return values
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(values))))
    mine = np.asarray(values if jax.process_index() == 0 else [0] * n, np.int64).reshape(n)
    return [int(v) for v in multihost_utils.broadcast_one_to_all(mine)] if n else []


def summary_table(result: dict) -> str:
    """A few lines for logs/README: the main numbers per guidance scale."""
    lines = [f"{result['tag']} ({result['extractor']}, {result['groups']} groups, "
             f"{result['shots']} shots x {result['samples_per_condition']} samples)"]
    for scale, r in result["by_guidance"].items():
        lines.append(f"  guidance {scale}: " + ", ".join(f"{k} {r[k]:.3f}" for k in RESULT_KEYS if k in r))
    return "\n".join(lines)


def headline(result: dict, class_names=()) -> str:
    """The few numbers a reader looks at first: class-consistency by the judge per guidance
    scale against its ceiling, the worst class, diversity against real images, memorisation."""
    from semantica_jax import images as images_lib

    by = result["by_guidance"]
    lines = []
    if "class_consistency_judge" in next(iter(by.values())):
        cc = ", ".join(f"guidance {g}: {r['class_consistency_judge']:.2f}" for g, r in by.items())
        lines.append(f"class-consistency (class judge; it scores real eval images "
                     f"{result['judge_accuracy_real']:.2f}): {cc}")
        for g, r in by.items():
            worst = min(r["per_group"], key=lambda e: e["class_consistency_judge"])
            name = images_lib.class_names_for([worst["group"]], tuple(class_names))[0]
            lines.append(f"  guidance {g}: worst class {name} {worst['class_consistency_judge']:.2f}")
    r1 = next(iter(by.values()))
    g1 = next(iter(by))
    lines.append(f"guidance {g1}: pixel diversity {r1['pixel_diversity']:.3f} (real same-class images "
                 f"{r1.get('pixel_diversity_real', float('nan')):.3f}), pixel distance to the condition "
                 f"{r1['pixel_distance_to_condition']:.3f}, memorisation ratio "
                 f"{r1.get('memorization_ratio', float('nan')):.2f}, FD {r1['fd']:.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`semantica-eval` (argparse; `main.py --mode=eval` is the absl equivalent)."""
    import argparse

    parser = argparse.ArgumentParser(prog="semantica-eval", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment config file[:variant] (its eval section is used)")
    parser.add_argument("--workdir", required=True, help="training workdir (results go to WORKDIR/eval)")
    parser.add_argument("--export", default=None, help="evaluate this export directory instead of checkpoints")
    parser.add_argument("--once", action="store_true", help="one pass over the existing checkpoints, then exit")
    args = parser.parse_args(argv)
    try:
        config = config_lib.load_config_file(args.config)
        results = run_eval_job(config, args.workdir, export_dir=args.export, once=args.once)
    except config_lib.ConfigError as e:
        print(f"semantica-eval: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(summary_table(r))
    return 0


def run() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.INFO)
    sys.exit(main())


if __name__ == "__main__":
    run()
