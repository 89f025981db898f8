r"""How much of the class the conditioning carries: a linear probe on cached encoder tokens.

  python benchmarks/condition_probe.py                       # the tiny config's 56-px cache
  python benchmarks/condition_probe.py --caches=data/fashion_mnist_pages_img_focus28,data/fashion_mnist_pages_img_focus56

For each embed_cache directory (shards augmented by `semantica_jax.embed_cache`), fits the
project's linear probe (`evaluation.metrics.fit_classifier`, L-BFGS logistic regression) on the
labelled training images' conditioning -- the pooled vector, and the pooled vector with every
token (what the denoiser sees) -- and scores the held-out eval images: accuracy, the mean
probability of the true class, per-class accuracy. A denoiser that sampled the variation's class
from this posterior would keep the condition's class with probability `mean p(true)`; guidance
moves it towards the probe's accuracy. Times the judge's own accuracy, these bound what the
class-consistency of variations can reach with these features (docs/RECIPE.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from data_pipeline import fashion_mnist, shards  # noqa: E402
from semantica_jax import cached_tokens, input_pipeline  # noqa: E402
from semantica_jax.evaluation import metrics  # noqa: E402

_FEATURES = {**shards.FEATURES, **cached_tokens.CACHED_TOKEN_FEATURES}


def load(pattern: str, max_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pooled [N, D'], tokens [N, T, D], labels [N]) of the first `max_images` images."""
    files = input_pipeline.list_shard_files(pattern)
    token_shape, pooled_shape = cached_tokens.check_cached_token_files(files)
    pooled, tokens, labels = [], [], []
    for record in tf.data.TFRecordDataset(files):
        page = tf.io.parse_single_example(record, _FEATURES)
        label = int(page["label"])
        if label == shards.NO_LABEL:
            raise SystemExit(f"condition_probe: {pattern}: page {page['page_id'].numpy()!r} has no label")
        for p, t in zip(page["pooled"].numpy(), page["tokens"].numpy()):
            pooled.append(np.frombuffer(p, "<f2").reshape(pooled_shape))
            tokens.append(np.frombuffer(t, "<f2").reshape(token_shape))
            labels.append(label)
        if len(labels) >= max_images:
            break
    n = min(len(labels), max_images)
    return (np.asarray(pooled[:n], np.float32), np.asarray(tokens[:n], np.float32), np.asarray(labels[:n]))


def probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], steps: int) -> dict:
    clf = metrics.fit_classifier(train[0], train[1], steps=steps)
    proba = clf.predict_proba(test[0])
    index = np.searchsorted(clf.classes, test[1])
    pred = clf.classes[proba.argmax(axis=1)]
    return {"accuracy": float((pred == test[1]).mean()),
            "mean_p_true": float(proba[np.arange(len(index)), index].mean()),
            "per_class": {int(c): float((pred[test[1] == c] == c).mean()) for c in np.unique(test[1])},
            "converged": clf.converged}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--caches", default=os.path.join(REPO, "data", "fashion_mnist_pages_img_focus56"),
                        help="comma-separated embed_cache directories")
    parser.add_argument("--train_files", default="train-00000-of-00008.tfrecord")
    parser.add_argument("--eval_files", default="eval-00000-of-00002.tfrecord")
    parser.add_argument("--train_images", type=int, default=7_500)
    parser.add_argument("--eval_images", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=300, help="L-BFGS iterations")
    args = parser.parse_args(argv)
    names = fashion_mnist.CLASS_NAMES
    for cache in [c for c in args.caches.split(",") if c]:
        tr_pooled, tr_tokens, tr_y = load(os.path.join(cache, args.train_files), args.train_images)
        ev_pooled, ev_tokens, ev_y = load(os.path.join(cache, args.eval_files), args.eval_images)
        print(f"{os.path.basename(cache.rstrip('/'))}: tokens {list(tr_tokens.shape[1:])}, "
              f"{len(tr_y)} training / {len(ev_y)} eval images", flush=True)
        views = {"pooled": (tr_pooled, ev_pooled),
                 "pooled + tokens": (np.concatenate([tr_pooled, tr_tokens.reshape(len(tr_y), -1)], 1),
                                     np.concatenate([ev_pooled, ev_tokens.reshape(len(ev_y), -1)], 1))}
        for view, (a, b) in views.items():
            r = probe((a, tr_y), (b, ev_y), args.steps)
            worst = sorted(r["per_class"].items(), key=lambda kv: kv[1])[:3]
            print(f"  {view:16s} accuracy {r['accuracy']:.3f}  mean p(true) {r['mean_p_true']:.3f}  lowest: "
                  + ", ".join(f"{names[c]} {v:.2f}" for c, v in worst)
                  + ("" if r["converged"] else "  (L-BFGS stopped at --steps)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
