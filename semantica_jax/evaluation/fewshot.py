"""Semantica's few-shot evaluation protocol (docs/EVALUATION.md, "The few-shot protocol").

For every group of an eval set (a class when pages carry labels, else a page):
  * k conditioning images (`eval.shots`) are drawn with a fixed seed; the group's other images
    are its real reference set (at most `eval.max_real_per_group`);
  * M variations per conditioning image (`eval.samples_per_condition`), each with its own noise
    key (the same keys for every checkpoint and guidance scale: paired comparisons);
  * all images go through one feature extractor (`eval.extractor`, EfficientNet-Lite0 by
    default, independent of the conditioning encoder).
Reported per guidance scale:
  fd, precision, recall, density, coverage   generated set vs the whole real set (PRDC on a
                                             seeded real subset of the generated set's size)
  fewshot_{fd,precision,recall,density,coverage}
                                             per group (group's samples vs group's real images),
                                             averaged over groups with enough real images
  consistency          mean cosine(condition, variation) in feature space
  diversity            mean pairwise L2 distance among one condition's variations (features)
  pixel_diversity      the same in pixel space (RMS per pixel, images in [-1, 1])
  pixel_diversity_real the same for M real images of the condition's group (the no-collapse
                       reference: real same-class diversity)
  pixel_distance_to_condition   RMS pixel distance between a variation and its condition
                                (near 0 = copies: the reconstruction baseline's signature)
  class_consistency    (labels only) fraction of variations a linear probe, fitted on the eval
                       set's real features and labels, assigns to the condition's class;
                       `probe_accuracy_real` is that probe's 2-fold accuracy on real images
  class_consistency_judge
                       (labels only) fraction of variations that the judge (evaluation/judge.py,
                       a CNN trained on the labelled training split) assigns to the condition's
                       class; `judge_accuracy_real` is its accuracy on the real eval images (the
                       ceiling), per group too; each group also records `judge_predicted`
                       (label -> number of its variations the judge assigns to that label)
  class_consistency_pixels
                       (labels only) the same with a linear probe on grey pixels (the images
                       area-resized to at most 32 px), fitted on the eval images; its ceiling is
                       `pixel_probe_accuracy_real`
  memorization_ratio   mean nearest-training-image feature distance of the samples divided by
                       that of real eval images (<< 1 = samples sit on training images)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from semantica_jax.evaluation import metrics as metrics_lib

_PROBE_STEPS = 300  # L-BFGS iterations of the probe (near-separable features: a full fit takes
# minutes on 1280-d features and gains nothing measurable in accuracy)
_PIXEL_PROBE_SIZE = 32  # the pixel probe sees grey images of at most this side
_MIN_GROUP_REAL = 3  # per-group FD/PRDC need a few real images (and more than prdc_k)


# ============================================================================ the eval set
@dataclasses.dataclass
class EvalSet:
    """Decoded images of an eval split, grouped; row i of every array is image i."""

    images: np.ndarray  # float32 [N, S, S, 3] in [-1, 1] at data.image_size
    cond_images: np.ndarray  # float32 [N, c, c, 3] in [0, 1] at encoder.image_size
    groups: np.ndarray  # int32 [N] group index into group_names
    group_names: list[str]
    labels: np.ndarray  # int32 [N], -1 without labels
    files: list[str]
    skipped_images: int  # undecodable images (skipped and counted)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)


def load_eval_set(files: Sequence[str], *, image_size: int, cond_size: int, group_by: str,
                  max_groups: int = 0, max_per_group: int = 0, seed: int = 0,
                  include_labels: Sequence[int] = (), exclude_labels: Sequence[int] = (),
                  target_fit: str = "resize") -> EvalSet:
    """Reads page shards (in file order, deterministic) into an `EvalSet`.

    Images are decoded and prepared exactly as the training pipeline does (`target_fit`, i.e.
    config.data.target_fit, for the real images; the encoder's resize for the conditions). Groups are sorted (labels numerically, pages by id); `max_groups` keeps the
    first ones, `max_per_group` keeps a seeded random subset of each group's images.
    `include_labels` / `exclude_labels` (config.data.eval_include_labels / eval_exclude_labels)
    keep only / drop images of pages with these labels (e.g. evaluate held-out classes only).
    """
    import tensorflow as tf

    from data_pipeline import shards
    from semantica_jax import image_ops

    if group_by not in ("label", "page"):
        raise ValueError(f"config.eval.group_by={group_by!r}; expected 'label' or 'page'")
    if not files:
        raise ValueError("no eval files: set config.eval.files or config.data.eval_files")

    def explode(record):
        page = shards.parse_page(record)
        n = tf.shape(page["images"])[0]
        return tf.data.Dataset.from_tensor_slices({
            "encoded": page["images"], "page_id": tf.fill([n], page["page_id"]),
            "label": tf.fill([n], tf.cast(page["label"], tf.int32)),
        })

    def decode(e):
        image = image_ops.decode(e["encoded"])
        return {"target": image_ops.resize(image, image_size, target_fit) * 2.0 - 1.0, "cond": image_ops.resize(image, cond_size),
                "page_id": e["page_id"], "label": e["label"]}

    ds = tf.data.TFRecordDataset(list(files)).flat_map(explode)
    total = ds.reduce(0, lambda n, _: n + 1)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors(log_warning=True)
    rows: dict[str, list] = {"target": [], "cond": [], "page_id": [], "label": []}
    for batch in ds.batch(512).as_numpy_iterator():
        for k in rows:
            rows[k].append(batch[k])
    if not rows["target"]:
        raise ValueError(f"the eval files {list(files)[:3]}... hold no decodable image")
    arrays = {k: np.concatenate(v) for k, v in rows.items()}
    skipped = int(total) - len(arrays["label"])
    if skipped:
        logging.warning("Eval set: skipped %d undecodable images", skipped)
    labels = arrays["label"].astype(np.int32)
    if len(include_labels) or len(exclude_labels):
        keep_rows = np.ones(len(labels), bool)
        if len(include_labels):
            keep_rows &= np.isin(labels, np.asarray(include_labels))
        if len(exclude_labels):
            keep_rows &= ~np.isin(labels, np.asarray(exclude_labels))
        if not keep_rows.any():
            raise ValueError(f"the eval label filter (include {tuple(include_labels)}, exclude "
                             f"{tuple(exclude_labels)}) leaves no image")
        arrays = {k: v[keep_rows] for k, v in arrays.items()}
        labels = labels[keep_rows]
    if group_by == "label":
        if np.any(labels < 0):
            raise ValueError(f"config.eval.group_by='label' but {int(np.sum(labels < 0))} images of "
                             f"{list(files)[:3]}... have no label; use group_by='page'")
        keys = labels.astype(np.int64)
        names_of = lambda k: f"label {k}"
    else:
        page_ids = [p.decode("utf-8") for p in arrays["page_id"]]
        uniq = sorted(set(page_ids))
        index = {p: i for i, p in enumerate(uniq)}
        keys = np.array([index[p] for p in page_ids], np.int64)
        names_of = lambda k: uniq[k]
    uniq_keys = np.unique(keys)
    if max_groups > 0:
        uniq_keys = uniq_keys[:max_groups]
    rng = np.random.RandomState(seed)
    keep: list[np.ndarray] = []
    group_of = np.full(len(keys), -1, np.int32)
    for g, k in enumerate(uniq_keys):
        idx = np.flatnonzero(keys == k)
        if max_per_group > 0 and len(idx) > max_per_group:
            idx = np.sort(rng.choice(idx, max_per_group, replace=False))
        group_of[idx] = g
        keep.append(idx)
    sel = np.sort(np.concatenate(keep))
    return EvalSet(images=arrays["target"][sel], cond_images=arrays["cond"][sel], groups=group_of[sel],
                   group_names=[names_of(int(k)) for k in uniq_keys], labels=labels[sel],
                   files=list(files), skipped_images=skipped)


def load_images(files: Sequence[str], *, image_size: int, max_images: int = 0,
                target_fit: str = "resize") -> tuple[np.ndarray, np.ndarray]:
    """The first `max_images` images of page shards (file order; 0 = all) prepared like training
    targets, in [-1, 1], and their pages' labels (-1 without): the memorisation reference and
    the judge's training set."""
    import tensorflow as tf

    from data_pipeline import shards
    from semantica_jax import image_ops

    def explode(record):
        page = shards.parse_page(record)
        n = tf.shape(page["images"])[0]
        return tf.data.Dataset.from_tensor_slices(
            (page["images"], tf.fill([n], tf.cast(page["label"], tf.int32))))

    ds = tf.data.TFRecordDataset(list(files)).flat_map(explode)
    if max_images > 0:
        ds = ds.take(max_images)
    ds = ds.map(lambda e, label: (image_ops.target_image(e, image_size, target_fit), label),
                num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    out = list(ds.batch(512).as_numpy_iterator())
    if not out:
        return np.zeros((0, image_size, image_size, 3), np.float32), np.zeros((0,), np.int32)
    return np.concatenate([b[0] for b in out]), np.concatenate([b[1] for b in out])


# ============================================================================ reference features (cached)
def files_fingerprint(files: Sequence[str]) -> list:
    return [[os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files]


class FeatureCache:
    """Reference features on disk, keyed by dataset files + extractor + resolution + selection."""

    def __init__(self, directory: str):
        self.directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "semantica_jax", "eval_refs")

    def path(self, key: dict) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return os.path.join(self.directory, f"{digest}.npz")

    def get_or_compute_arrays(self, key: dict, compute, what: str = "reference features") -> dict[str, np.ndarray]:
        """The arrays cached under `key`, else `compute()` (a dict of arrays) stored atomically.

        Several processes (a multi-host eval job): process 0 computes and stores first while the
        others wait, then they read its file (and compute for themselves only where the cache
        directory is not shared)."""
        path = self.path(key)
        multihost = jax.process_count() > 1
        if multihost and jax.process_index() != 0:
            multihost_utils.sync_global_devices(f"feature cache {os.path.basename(path)}")
            return self._load(path, key, what) or self._compute_and_store(path, key, compute, what)
        arrays = self._load(path, key, what) or self._compute_and_store(path, key, compute, what)
        if multihost:
            multihost_utils.sync_global_devices(f"feature cache {os.path.basename(path)}")
        return arrays

    def _load(self, path: str, key: dict, what: str) -> dict[str, np.ndarray] | None:
        if not os.path.exists(path):
            return None
        try:
            with np.load(path) as f:
                if json.loads(str(f["key"])) == json.loads(json.dumps(key, sort_keys=True)):
                    logging.info("%s from cache %s", what[:1].upper() + what[1:], path)
                    return {k: f[k] for k in f.files if k != "key"}
        except Exception as e:  # a damaged cache file is recomputed, never trusted
            logging.warning("Ignoring unreadable feature cache %s: %s", path, e)
        return None

    def _compute_and_store(self, path: str, key: dict, compute, what: str) -> dict[str, np.ndarray]:
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        os.makedirs(self.directory, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, key=json.dumps(key, sort_keys=True), **arrays)
        os.replace(tmp, path)
        logging.info("Cached %s (%s) in %s", what, ", ".join(f"{k} {v.shape}" for k, v in arrays.items()), path)
        return arrays

    def get_or_compute(self, key: dict, compute) -> np.ndarray:
        return self.get_or_compute_arrays(
            key, lambda: {"features": np.asarray(compute(), np.float32)})["features"]

    def get_or_fit_probe(self, key: dict, feats_fn, labels: np.ndarray, seed: int):
        """`fit_probe` of `feats_fn()` and `labels`, cached under `key` (+ the probe's settings):
        the probe depends only on the reference images, so later checkpoints and runs reuse it."""
        key = {**key, "probe_steps": _PROBE_STEPS, "probe_seed": int(seed),
               "labels": hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()[:16]}

        def fit():
            probe, acc = fit_probe(feats_fn(), labels, seed)
            return {"mean": probe.mean, "scale": probe.scale, "weights": probe.weights, "bias": probe.bias,
                    "classes": probe.classes, "converged": np.asarray(probe.converged),
                    "accuracy": np.asarray(acc, np.float64)}

        a = self.get_or_compute_arrays(key, fit, what="linear probe")
        probe = metrics_lib.LinearProbe(mean=a["mean"], scale=a["scale"], weights=a["weights"], bias=a["bias"],
                                        classes=a["classes"], converged=bool(a["converged"]))
        return probe, float(a["accuracy"])


# ============================================================================ the protocol
@dataclasses.dataclass
class Plan:
    """Which eval images condition which samples (fixed by eval.seed; the same for every checkpoint)."""

    cond_rows: np.ndarray  # int [G*k] rows of the EvalSet used as conditions (group-major)
    cond_groups: np.ndarray  # int [G*k]
    real_rows: list  # per group: int rows of its real reference images (conditions excluded)
    samples_per_condition: int

    @property
    def sample_ids(self) -> np.ndarray:
        """Stable integer id of every sample: condition position * M + j."""
        return np.arange(len(self.cond_rows) * self.samples_per_condition)


def make_plan(eval_set: EvalSet, shots: int, samples_per_condition: int, seed: int) -> Plan:
    rng = np.random.RandomState(seed)
    cond_rows, cond_groups, real_rows = [], [], []
    for g in range(eval_set.num_groups):
        idx = np.flatnonzero(eval_set.groups == g)
        perm = idx[rng.permutation(len(idx))]
        k = min(shots, max(len(idx) - 1, 1))  # leave at least one real image when possible
        cond_rows.extend(perm[:k])
        cond_groups.extend([g] * k)
        real_rows.append(np.sort(perm[k:]) if len(idx) > k else np.sort(perm))
    return Plan(np.asarray(cond_rows), np.asarray(cond_groups), real_rows, int(samples_per_condition))


def _pairwise_mean_distance(x: np.ndarray) -> float:
    """x [N, M, D] -> mean over N of the mean L2 distance between the M rows (i != j)."""
    n, m, _ = x.shape
    if m < 2:
        return float("nan")
    d = np.sqrt(np.maximum(((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1), 0.0))
    return float(d.sum(axis=(1, 2)).mean() / (m * (m - 1)))


def _nan_mean(values: list[float]) -> float:
    vals = [v for v in values if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def compute_metrics(*, eval_set: EvalSet, plan: Plan, real_feats: np.ndarray, gen_feats: np.ndarray,
                    samples: np.ndarray, prdc_k: int, seed: int, probe=None, pixel_probe=None,
                    judge=None, train_feats: np.ndarray | None = None,
                    real_nn: float | None = None) -> dict[str, Any]:
    """All protocol numbers for one set of generated samples (grouped as `plan`)."""
    m = plan.samples_per_condition
    n_cond = len(plan.cond_rows)
    var_feats = gen_feats.reshape(n_cond, m, -1)
    cond_feats = real_feats[plan.cond_rows]
    out: dict[str, Any] = {"num_generated": int(len(gen_feats)), "num_real": int(len(real_feats))}

    # Whole set: FD on all real images; PRDC on a seeded real subset of the generated set's size.
    out["fd"] = float(metrics_lib.fid_from_features(real_feats, gen_feats))
    rng = np.random.RandomState(seed)
    sub = rng.choice(len(real_feats), min(len(real_feats), len(gen_feats)), replace=False)
    k = min(prdc_k, len(sub) - 1, len(gen_feats) - 1)
    if k >= 1:
        out.update({key: float(v) for key, v in metrics_lib.prdc(real_feats[sub], gen_feats, k=k).items()})

    # Per group (few-shot): the group's samples against the group's real images.
    per_group = []
    for g in range(eval_set.num_groups):
        rows = plan.real_rows[g]
        sel = plan.cond_groups == g
        g_feats = var_feats[sel].reshape(-1, var_feats.shape[-1])
        entry: dict[str, Any] = {"group": eval_set.group_names[g], "num_real": int(len(rows)),
                                 "num_generated": int(len(g_feats))}
        kg = min(prdc_k, len(rows) - 1, len(g_feats) - 1)
        if len(rows) >= _MIN_GROUP_REAL and len(g_feats) >= 2 and kg >= 1:
            entry["fd"] = float(metrics_lib.fid_from_features(real_feats[rows], g_feats))
            entry.update({key: float(v) for key, v in metrics_lib.prdc(real_feats[rows], g_feats, k=kg).items()})
        entry["consistency"] = float(metrics_lib.consistency(cond_feats[sel], var_feats[sel]))
        entry["diversity"] = float(metrics_lib.diversity(var_feats[sel])) if m > 1 else float("nan")
        per_group.append(entry)
    for key in ("fd", "precision", "recall", "density", "coverage"):
        out[f"fewshot_{key}"] = _nan_mean([e.get(key, float("nan")) for e in per_group])
    out["fewshot_groups_scored"] = int(sum("fd" in e for e in per_group))

    out["consistency"] = float(metrics_lib.consistency(cond_feats, var_feats))
    out["diversity"] = float(metrics_lib.diversity(var_feats)) if m > 1 else float("nan")
    flat = samples.reshape(n_cond, m, -1).astype(np.float64) / np.sqrt(samples[0].size)
    out["pixel_diversity"] = _pairwise_mean_distance(flat)
    conds = eval_set.images[plan.cond_rows].reshape(n_cond, 1, -1).astype(np.float64) / np.sqrt(samples[0].size)
    out["pixel_distance_to_condition"] = float(np.sqrt(((flat - conds) ** 2).sum(-1)).mean())
    out["pixel_diversity_real"] = real_pixel_diversity(eval_set, plan, seed)

    if probe is not None:
        cond_labels = eval_set.labels[plan.cond_rows]
        out["class_consistency"] = float(metrics_lib.class_consistency(probe, var_feats, cond_labels))
        for e, g in zip(per_group, range(eval_set.num_groups)):
            sel = plan.cond_groups == g
            e["class_consistency"] = float(metrics_lib.class_consistency(probe, var_feats[sel], cond_labels[sel]))
    if pixel_probe is not None:
        cond_labels = eval_set.labels[plan.cond_rows]
        var_pix = pixel_features(samples).reshape(n_cond, m, -1)
        out["class_consistency_pixels"] = float(metrics_lib.class_consistency(pixel_probe, var_pix, cond_labels))
        for e, g in zip(per_group, range(eval_set.num_groups)):
            sel = plan.cond_groups == g
            e["class_consistency_pixels"] = float(
                metrics_lib.class_consistency(pixel_probe, var_pix[sel], cond_labels[sel]))
    if judge is not None:
        cond_labels = np.repeat(eval_set.labels[plan.cond_rows], m)
        predicted = judge.predict(samples)
        hits = (predicted == cond_labels).reshape(n_cond, m)
        predicted = predicted.reshape(n_cond, m)
        out["class_consistency_judge"] = float(hits.mean())
        for e, g in zip(per_group, range(eval_set.num_groups)):
            e["class_consistency_judge"] = float(hits[plan.cond_groups == g].mean())
            # What the judge sees in the group's variations: label -> count, most frequent first
            # (the confusion a held-out class turns into).
            values, counts = np.unique(predicted[plan.cond_groups == g], return_counts=True)
            e["judge_predicted"] = {str(int(values[i])): int(counts[i]) for i in np.argsort(-counts, kind="stable")}
    if train_feats is not None and len(train_feats):
        gen_nn = float(np.mean(metrics_lib.nearest_neighbor_distance(gen_feats, train_feats)))
        out["nearest_train_distance"] = gen_nn
        if real_nn:
            out["nearest_train_distance_real"] = real_nn
            out["memorization_ratio"] = gen_nn / real_nn
    out["per_group"] = per_group
    return out


def real_pixel_diversity(eval_set: EvalSet, plan: Plan, seed: int) -> float:
    """`pixel_diversity` of real images: for every condition, M other real images of its group
    (seeded) in place of its M variations; the reference for "no collapse"."""
    m = plan.samples_per_condition
    if m < 2:
        return float("nan")
    rng = np.random.RandomState(seed + 1)
    sets = []
    for g in plan.cond_groups:
        rows = plan.real_rows[g]
        if len(rows) >= m:
            sets.append(eval_set.images[rng.choice(rows, m, replace=False)])
    if not sets:
        return float("nan")
    x = np.stack(sets).astype(np.float64)
    return _pairwise_mean_distance(x.reshape(len(sets), m, -1) / np.sqrt(x[0, 0].size))


def pixel_features(images: np.ndarray, size: int = _PIXEL_PROBE_SIZE) -> np.ndarray:
    """images [N, S, S, C] in [-1, 1] -> [N, s*s] grey pixels (channel mean; area-resized to
    s = min(S, size)): the pixel probe's features."""
    x = np.asarray(images, np.float32).mean(axis=-1, keepdims=True)
    if x.shape[1] > size or x.shape[2] > size:
        import tensorflow as tf

        x = tf.image.resize(x, (min(x.shape[1], size), min(x.shape[2], size)), method="area").numpy()
    return x.reshape(len(x), -1).astype(np.float64)


def fit_probe(real_feats: np.ndarray, labels: np.ndarray, seed: int):
    """A linear probe on all real features + its 2-fold accuracy on real images (a ceiling for
    class_consistency)."""
    rng = np.random.RandomState(seed)
    perm = rng.permutation(len(labels))
    half = len(perm) // 2
    a, b = perm[:half], perm[half:]
    acc = []
    for fit_rows, test_rows in ((a, b), (b, a)):
        if len(np.unique(labels[fit_rows])) < 2:
            continue
        clf = metrics_lib.fit_classifier(real_feats[fit_rows], labels[fit_rows], steps=_PROBE_STEPS)
        acc.append(float(clf.accuracy(real_feats[test_rows], labels[test_rows])))
    probe = metrics_lib.fit_classifier(real_feats, labels, steps=_PROBE_STEPS)
    return probe, (float(np.mean(acc)) if acc else float("nan"))


def timed(label: str):
    """Context manager logging how long a phase took."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        t0 = time.perf_counter()
        yield
        logging.info("%s took %.1f s", label, time.perf_counter() - t0)

    return cm()
