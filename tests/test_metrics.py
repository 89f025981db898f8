"""Metrics: parity with the reference libraries on the same feature arrays, built offline.

- FID: pytorch-fid 0.3.0's own `calculate_frechet_distance`, taken from the installed
  `pytorch_fid/fid_score.py` with `ast` and exec'd with numpy + scipy.linalg (importing the module
  needs torchvision, which is broken with the CPU torch; see launch/setup_env.sh).
- PRDC: `prdc.compute_prdc` (prdc 0.2) on continuous features (exact equality), and a hand-worked
  tie example where our `<=` rule (official Kynkäänniemi code, torch-fidelity) and prdc's `<` differ.
"""
import ast
import importlib.util
import pathlib

import numpy as np
import pytest
import scipy.linalg

from semantica_jax.evaluation import metrics


@pytest.fixture(scope="module")
def pytorch_fid_frechet():
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None:
        pytest.skip("pytorch-fid is not installed (bash launch/setup_env.sh test installs it)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "fid_score.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    namespace = {"np": np, "linalg": scipy.linalg}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def _correlated(rng, n, d, shift=0.0, scale=1.0, dtype=np.float64):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix * scale + shift).astype(dtype)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
@pytest.mark.parametrize("n,d,dtype", [(600, 64, np.float64), (400, 32, np.float32),
                                       (100, 128, np.float64), (50, 64, np.float32)])
def test_fid_matches_pytorch_fid(pytorch_fid_frechet, n, d, dtype):
    rng = np.random.default_rng(n + d)
    real = _correlated(rng, n, d, dtype=dtype)
    fake = _correlated(rng, n + 17, d, shift=0.3, scale=1.2, dtype=dtype)
    mu_r, s_r = metrics.feature_stats(real)
    mu_f, s_f = metrics.feature_stats(fake)
    assert mu_r.dtype == s_r.dtype == np.float64 and s_r.shape == (d, d)
    np.testing.assert_array_equal(s_r, np.cov(real.astype(np.float64), rowvar=False))
    ref = float(pytorch_fid_frechet(mu_r, s_r, mu_f, s_f))
    ours = metrics.frechet_distance(mu_r, s_r, mu_f, s_f)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref, abs(ours - ref) / abs(ref))
    if n > d:  # full-rank covariances: both are exact up to round-off
        assert abs(ours - ref) <= 1e-10 * abs(ref)
    assert metrics.fid_from_features(real, fake) == pytest.approx(ours, rel=1e-12)


def test_fid_basic_properties():
    rng = np.random.default_rng(0)
    x = _correlated(rng, 300, 16)
    assert abs(metrics.fid_from_features(x, x)) < 1e-9
    # Two Gaussians with the same covariance: FD = ||mu1 - mu2||^2.
    mu, sigma = metrics.feature_stats(x)
    assert metrics.frechet_distance(mu, sigma, mu + 2.0, sigma) == pytest.approx(4.0 * 16, rel=1e-9)
    # Diagonal covariances: FD = sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    assert metrics.frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b)) == pytest.approx(
        ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-10)
    with pytest.raises(ValueError, match="shapes"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        metrics.feature_stats(np.full((4, 2), np.nan))


@pytest.fixture(scope="module")
def compute_prdc():
    prdc = pytest.importorskip("prdc", reason="prdc is a test dependency (setup.py [test])")
    return prdc.compute_prdc


@pytest.mark.parametrize("n_real,n_fake,d,k", [(200, 200, 16, 5), (300, 170, 8, 3), (150, 260, 32, 1)])
def test_prdc_equals_reference_on_continuous_features(compute_prdc, n_real, n_fake, d, k):
    rng = np.random.default_rng(n_real * k)
    real = rng.normal(size=(n_real, d))
    fake = rng.normal(size=(n_fake, d)) * 1.15 + 0.2
    ref = compute_prdc(real, fake, nearest_k=k)
    ours = metrics.prdc(real, fake, k=k, chunk=64)  # small chunks: several row blocks
    assert ours == {key: float(v) for key, v in ref.items()}
    assert metrics.prdc(real, fake, k=k) == ours  # chunking changes nothing


# Hand-worked ties (1-D integer features, k = 1):
#   real 0 1 2 3  -> radius 1 each;     fake 2 4 10 -> radii 2, 2, 6
#   precision: fake 2 (d=0), fake 4 (d=1 to real 3, on the boundary) | fake 10 never  -> <=: 2/3, <: 1/3
#   recall:    fake 2's ball (r=2) holds reals 0..3 (real 0 on the boundary), fake 4's holds 2, 3
#              (real 2 on the boundary)                                             -> <=: 4/4, <: 3/4
#   density:   real balls holding fake 2: reals 1, 2, 3 (1 and 3 on the boundary); fake 4: real 3
#              (boundary) -> <=: (3 + 1 + 0) / (1 * 3) = 4/3;  <: (1 + 0 + 0) / 3 = 1/3
#   coverage:  reals whose nearest fake is within their radius: 1 (d=1), 2 (d=0), 3 (d=1)
#                                                                                   -> <=: 3/4, <: 1/4
TIE_REAL = np.array([[0], [1], [2], [3]])
TIE_FAKE = np.array([[2], [4], [10]])


def test_prdc_ties_use_closed_balls():
    ours = metrics.prdc(TIE_REAL, TIE_FAKE, k=1)
    assert ours == dict(precision=2 / 3, recall=1.0, density=4 / 3, coverage=3 / 4)


def test_prdc_package_uses_strict_inequality_on_ties(compute_prdc):
    """Documents the difference: prdc 0.2 counts boundary points as outside."""
    ref = compute_prdc(TIE_REAL.astype(np.float64), TIE_FAKE.astype(np.float64), nearest_k=1)
    assert {k: float(v) for k, v in ref.items()} == dict(precision=1 / 3, recall=3 / 4,
                                                         density=1 / 3, coverage=1 / 4)


def _dense_prdc_closed(real, fake, k):
    """The definitions, written out densely (brute force, exact integer arithmetic)."""
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_rf = ((real[:, None] - fake[None]) ** 2).sum(-1)
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside = d_rf <= r_real[:, None]
    return dict(precision=float(inside.any(0).mean()),
                recall=float((d_rf <= r_fake[None, :]).any(1).mean()),
                density=float(inside.sum() / (k * len(fake))),
                coverage=float((d_rf.min(1) <= r_real).mean()))


def test_prdc_tie_heavy_integer_features_match_definition():
    rng = np.random.default_rng(3)
    real = rng.integers(0, 3, size=(120, 3))  # 27 possible points: ties and duplicates everywhere
    fake = rng.integers(0, 4, size=(90, 3))
    for k in (1, 3, 5):
        assert metrics.prdc(real, fake, k=k, chunk=17) == _dense_prdc_closed(real, fake, k)


def test_prdc_errors():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="k=5"):
        metrics.prdc(x, x, k=5)
    with pytest.raises(ValueError, match="dims"):
        metrics.prdc(x, np.zeros((5, 3)), k=2)


def test_nearest_neighbor_distance():
    rng = np.random.default_rng(1)
    q, ref = rng.normal(size=(70, 5)), rng.normal(size=(130, 5))
    brute = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(metrics.nearest_neighbor_distance(q, ref, chunk=16), brute, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(metrics.nearest_neighbor_distance(ref[:3], ref), 0.0, atol=1e-6)


def test_consistency_and_diversity_by_hand():
    cond = np.array([[1.0, 0.0], [0.0, 2.0]])
    var = np.array([[[3.0, 0.0], [0.0, 5.0]],     # cos 1 and 0
                    [[0.0, 1.0], [-1.0, 0.0]]])   # cos 1 and 0
    assert metrics.consistency(cond, var) == pytest.approx(0.5)
    var3 = np.array([[[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]],   # pairwise L2 5, 4, 3 -> mean 4
                     [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])  # identical -> 0
    assert metrics.diversity(var3) == pytest.approx(2.0)
    assert isinstance(metrics.diversity(var3), float)
    np.testing.assert_allclose(metrics.pairwise_distances_within(var3), [4.0, 0.0], atol=1e-12)
    # cosine: condition 0 pairs ([1,0] vs [0,1] -> 1, [1,0] vs [-1,0] -> 2, [0,1] vs [-1,0] -> 1)
    var_cos = np.array([[[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    assert metrics.diversity(var_cos, metric="cosine") == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match=">= 2 variations"):
        metrics.diversity(var[:, :1])
    with pytest.raises(ValueError, match="does not fit"):
        metrics.consistency(cond[:1], var)


def _blobs(rng, n_per, centers, noise):
    feats = np.concatenate([c + noise * rng.normal(size=(n_per, centers.shape[1])) for c in centers])
    labels = np.repeat(np.arange(len(centers)) * 10 + 7, n_per)  # non-contiguous label values
    return feats, labels


def test_linear_probe_and_class_consistency():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 12)) * 3
    feats, labels = _blobs(rng, 50, centers, 1.0)
    clf = metrics.fit_classifier(feats, labels, l2=1e-2, steps=500)
    assert clf.converged
    assert clf.accuracy(feats, labels) > 0.95
    again = metrics.fit_classifier(feats, labels, l2=1e-2, steps=500)
    np.testing.assert_array_equal(again.weights, clf.weights)  # deterministic
    assert set(clf.predict(feats)) <= set(labels)
    np.testing.assert_allclose(clf.predict_proba(feats[:5]).sum(1), 1.0)
    # Variations: condition 0..3 each with 3 samples at its own class centre, except 2 samples of
    # condition 1 that sit at class 3's centre -> 10 of 12 consistent.
    var = np.repeat(centers[:, None], 3, axis=1).copy()
    var[1, :2] = centers[3]
    cond_labels = np.arange(4) * 10 + 7
    assert metrics.class_consistency(clf, var, cond_labels) == pytest.approx(10 / 12)


def test_linear_probe_matches_sklearn():
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    feats, labels = _blobs(rng, 40, rng.normal(size=(3, 6)), 1.5)  # overlapping classes
    l2 = 0.05
    ours = metrics.fit_classifier(feats, labels, l2=l2, steps=2000, tol=1e-10)
    xs = (feats - feats.mean(0)) / feats.std(0)
    ref = sklearn_lm.LogisticRegression(C=1.0 / (l2 * len(feats)), tol=1e-12, max_iter=10_000).fit(xs, labels)
    np.testing.assert_allclose(ours.predict_proba(feats), ref.predict_proba(xs), atol=1e-5)
    np.testing.assert_array_equal(ours.predict(feats), ref.predict(xs))
