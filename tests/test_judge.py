"""The class judge (evaluation/judge.py): a real CNN fitted on small synthetic classes."""
import numpy as np
import pytest

from semantica_jax.evaluation import fewshot, judge


def _classes(n_per_class: int, seed: int):
    """Three classes of 16 px grey images: a horizontal bar, a vertical bar, a centred square,
    each at a random position and brightness, with pixel noise."""
    rng = np.random.RandomState(seed)
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            im = np.full((16, 16), -1.0, np.float32)
            a, b = rng.randint(2, 12, size=2)
            v = rng.uniform(0.3, 1.0)
            if label == 0:
                im[a:a + 2, 2:14] = v
            elif label == 1:
                im[2:14, b:b + 2] = v
            else:
                im[5:11, 5:11] = v
            im += rng.normal(0, 0.2, im.shape)
            images.append(np.repeat(im[..., None], 3, axis=-1))
            labels.append(label * 3)  # non-contiguous label values
    return np.stack(images), np.asarray(labels, np.int32)


@pytest.fixture(scope="module")
def fitted():
    x, y = _classes(60, seed=0)
    xt, yt = _classes(20, seed=1)
    settings = judge.JudgeSettings(epochs=3, batch_size=32, learning_rate=3e-3)
    return judge.train_judge(x, y, settings, test_images=xt, test_labels=yt), xt, yt


def test_judge_learns_held_out_classes(fitted):
    j, xt, yt = fitted
    assert j.test_accuracy >= 0.9
    assert set(np.unique(j.predict(xt))) <= {0, 3, 6}  # predicts the original label values
    assert j.accuracy(xt, yt) == pytest.approx(j.test_accuracy)


def test_judge_round_trips_through_the_cache(fitted, tmp_path):
    j, xt, _ = fitted
    cache = fewshot.FeatureCache(str(tmp_path))
    calls = []

    def fit():
        calls.append(1)
        return j.to_arrays()

    a = cache.get_or_compute_arrays({"judge": 1}, fit, what="class judge")
    b = cache.get_or_compute_arrays({"judge": 1}, fit, what="class judge")
    assert len(calls) == 1
    j2 = judge.Judge.from_arrays(b)
    np.testing.assert_array_equal(j2.predict(xt), j.predict(xt))
    assert j2.test_accuracy == j.test_accuracy and set(a) == set(b)


def test_judge_scores_copies_and_wrong_classes(fitted):
    """compute_metrics: copies of real images score the judge's accuracy on them; variations of
    another class score 0."""
    j, xt, yt = fitted
    n = len(yt)
    es = fewshot.EvalSet(images=xt, cond_images=np.zeros((n, 2, 2, 3), np.float32),
                         groups=np.searchsorted([0, 3, 6], yt).astype(np.int32), group_names=["a", "b", "c"],
                         labels=yt, files=[], skipped_images=0)
    plan = fewshot.make_plan(es, shots=4, samples_per_condition=2, seed=0)
    feats = np.random.RandomState(0).randn(n, 4)
    copies = np.repeat(es.images[plan.cond_rows], 2, axis=0)
    out = fewshot.compute_metrics(eval_set=es, plan=plan, real_feats=feats, gen_feats=feats[:len(copies)],
                                  samples=copies, prdc_k=2, seed=0, judge=j)
    hits = j.predict(es.images[plan.cond_rows]) == es.labels[plan.cond_rows]
    assert out["class_consistency_judge"] == pytest.approx(hits.mean())
    # Per group, what the judge saw: label -> count, most frequent first.
    predicted = j.predict(copies)
    for g, e in enumerate(out["per_group"]):
        labels, counts = np.unique(predicted[np.repeat(plan.cond_groups == g, 2)], return_counts=True)
        assert {int(k): v for k, v in e["judge_predicted"].items()} == dict(zip(labels.tolist(), counts.tolist()))
        assert list(e["judge_predicted"].values()) == sorted(e["judge_predicted"].values(), reverse=True)
    wrong = np.roll(copies, 8, axis=0)  # 4 conditions x 2 samples per group: the next group's images
    out = fewshot.compute_metrics(eval_set=es, plan=plan, real_feats=feats, gen_feats=feats[:len(copies)],
                                  samples=wrong, prdc_k=2, seed=0, judge=j)
    assert out["class_consistency_judge"] <= 1 - hits.mean() + 1e-9
    assert np.isfinite(out["pixel_diversity_real"]) and out["pixel_diversity_real"] > 0


def test_judge_needs_two_classes():
    x, y = _classes(10, seed=0)
    with pytest.raises(ValueError, match=">= 2 classes"):
        judge.train_judge(x[:10], y[:10])
