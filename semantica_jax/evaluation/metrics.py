"""Sample-quality metrics on feature arrays (numpy, float64 math).

Everything here takes features that an extractor (`evaluation/features.py`) already computed, as
numpy arrays [N, D]; nothing here touches images or JAX.

- `feature_stats`, `frechet_distance`, `fid_from_features`: the Fréchet distance between
  Gaussians fitted to two feature sets (Heusel et al. 2017). Statistics are `mean(0)` and
  `np.cov(rowvar=False)` (unbiased, N - 1), as pytorch-fid computes them. The matrix square root
  term is `tr sqrt(sqrt(S1) S2 sqrt(S1))` from two symmetric eigendecompositions, which equals
  pytorch-fid's `tr sqrtm(S1 S2)` (the two matrices are similar) but stays real and finite when the
  covariances are singular (N <= D); tests/test_metrics.py checks it against pytorch-fid's own
  `calculate_frechet_distance` (<= 1e-6 relative, measured ~1e-12).
- `prdc`: k-NN precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et
  al. 2020). A sample is inside a real (fake) point's ball when its distance is `<=` that point's
  radius, the distance to its k-th nearest neighbour in its own set, self excluded. This is the
  rule of the official precision/recall code (kynkaat/improved-precision-and-recall-metric:
  `distance_batch <= self.D`) and of torch-fidelity; the `prdc` package (0.2) uses strict `<`. On
  continuous features the two are identical (no ties); on tied features (duplicated images,
  quantised features) `<=` counts a sample lying exactly on a ball's boundary as inside.
  Distances are compared squared (no sqrt), computed in row chunks so 10k x 10k sets fit in memory.
- `consistency`, `diversity`: the few-shot protocol's per-condition scores (docs/EVALUATION.md).
- `LinearProbe` / `fit_classifier` / `class_consistency`: a multinomial logistic-regression probe
  fitted on real features and labels (L-BFGS, deterministic), and the fraction of variations it
  assigns to their condition's class.
- `nearest_neighbor_distance`: distance from each query to its nearest reference (memorisation).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import scipy.linalg
import scipy.optimize

# Rows per distance chunk: a [CHUNK, N] float64 block is 8 * CHUNK * N bytes (1024 x 10k = 80 MB).
CHUNK = 1024


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] feature array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or Inf")
    return x


# ============================================================================ Fréchet distance
def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of features [N, D] in float64: mean(0) and np.cov(rowvar=False)."""
    x = _as_features(feats, "feature_stats")
    if x.shape[0] < 2:
        raise ValueError(f"feature_stats: need at least 2 samples for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1)) (similar matrices; the latter is symmetric PSD)."""
    r = _psd_sqrt(sigma1)
    m = r @ sigma2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians.

    Agrees with pytorch-fid's `calculate_frechet_distance` (scipy `sqrtm`) to ~1e-12 relative on
    float64 statistics, also for singular covariances. If the eigendecomposition fails or gives a
    non-finite trace, falls back like pytorch-fid: scipy `sqrtm` of the product with `eps` added to
    both diagonals.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size,) * 2:
        raise ValueError(
            f"frechet_distance: shapes disagree: mu {mu1.shape} / {mu2.shape}, "
            f"sigma {sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        tr_covmean = float(np.trace(covmean).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(real, fake) -> float:
    """Fréchet distance between the Gaussians of two feature sets [N, D], [M, D]."""
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


# ============================================================================ distances
def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _sq_dist_chunks(x: np.ndarray, y: np.ndarray, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(start, squared L2 distances [rows, len(y)]) for row chunks of x; clipped at 0."""
    yy = _sq_norms(y)
    for start in range(0, x.shape[0], chunk):
        xc = x[start:start + chunk]
        d2 = _sq_norms(xc)[:, None] + yy[None, :] - 2.0 * (xc @ y.T)
        np.maximum(d2, 0.0, out=d2)
        yield start, d2


def _kth_nn_sq_radii(x: np.ndarray, k: int, chunk: int = CHUNK) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest neighbour in x, itself excluded."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k={k} needs 1 <= k < number of samples ({x.shape[0]})")
    radii = np.empty(x.shape[0])
    for start, d2 in _sq_dist_chunks(x, x, chunk):
        rows = np.arange(d2.shape[0])
        d2[rows, start + rows] = 0.0  # self distance exactly 0 (round-off otherwise)
        # The (k+1)-th smallest incl. the self distance = the k-th neighbour excl. self (duplicates
        # of a point count as neighbours at distance 0).
        radii[start:start + d2.shape[0]] = np.partition(d2, k, axis=1)[:, k]
    return radii


def nearest_neighbor_distance(query, reference, chunk: int = CHUNK) -> np.ndarray:
    """[N] L2 distance of each query row to its nearest reference row (chunked, float64)."""
    q = _as_features(query, "query")
    r = _as_features(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"nearest_neighbor_distance: dims differ: {q.shape} vs {r.shape}")
    out = np.empty(q.shape[0])
    for start, d2 in _sq_dist_chunks(q, r, chunk):
        out[start:start + d2.shape[0]] = d2.min(axis=1)
    return np.sqrt(out)


# ============================================================================ PRDC
def prdc(real, fake, k: int = 5, chunk: int = CHUNK) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density, coverage (Naeem et al. 2020).

    real [N, D], fake [M, D]; radii = distance to the k-th nearest neighbour within the same set
    (self excluded). With B(x, r) the closed ball (`<=`):
      precision = fraction of fakes inside some real ball,
      recall    = fraction of reals inside some fake ball,
      density   = (1 / kM) sum over fakes of the number of real balls containing it,
      coverage  = fraction of reals whose ball contains at least one fake.
    """
    real = _as_features(real, "real")
    fake = _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"prdc: feature dims differ: real {real.shape} vs fake {fake.shape}")
    r_real = _kth_nn_sq_radii(real, k, chunk)  # [N]
    r_fake = _kth_nn_sq_radii(fake, k, chunk)  # [M]
    n_real, n_fake = real.shape[0], fake.shape[0]
    in_count = np.zeros(n_fake, np.int64)  # per fake: number of real balls containing it
    recalled = np.zeros(n_real, bool)  # per real: inside some fake ball
    nearest_fake = np.full(n_real, np.inf)  # per real: squared distance to the nearest fake
    for start, d2 in _sq_dist_chunks(real, fake, chunk):  # d2: [real chunk, M]
        stop = start + d2.shape[0]
        in_count += (d2 <= r_real[start:stop, None]).sum(axis=0)
        recalled[start:stop] = (d2 <= r_fake[None, :]).any(axis=1)
        nearest_fake[start:stop] = d2.min(axis=1)
    return dict(
        precision=float((in_count > 0).mean()),
        recall=float(recalled.mean()),
        density=float(in_count.sum() / (k * n_fake)),
        coverage=float((nearest_fake <= r_real).mean()),
    )


# ============================================================================ few-shot protocol
def _var_feats(var_feats, name: str = "var_feats") -> np.ndarray:
    v = np.asarray(var_feats, np.float64)
    if v.ndim != 3:
        raise ValueError(f"{name}: expected [N conditions, M variations, D], got shape {v.shape}")
    return v


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def consistency(cond_feats, var_feats) -> float:
    """Mean cosine similarity between each condition [N, D] and each of its variations [N, M, D]."""
    c = np.asarray(cond_feats, np.float64)
    v = _var_feats(var_feats)
    if c.ndim != 2 or c.shape[0] != v.shape[0] or c.shape[1] != v.shape[2]:
        raise ValueError(f"consistency: cond_feats {c.shape} does not fit var_feats {v.shape}")
    return float(np.einsum("nd,nmd->nm", _unit(c), _unit(v)).mean())


def pairwise_distances_within(var_feats, metric: str = "l2") -> np.ndarray:
    """[N] mean pairwise distance among each condition's M variations ('l2' or 'cosine' = 1 - cos)."""
    v = _var_feats(var_feats)
    m = v.shape[1]
    if m < 2:
        raise ValueError(f"diversity needs >= 2 variations per condition, got {m}")
    iu = np.triu_indices(m, 1)
    if metric == "l2":
        sq = np.einsum("nmd,nmd->nm", v, v)
        d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * np.einsum("nid,njd->nij", v, v)
        d = np.sqrt(np.maximum(d2, 0.0))
    elif metric == "cosine":
        u = _unit(v)
        d = 1.0 - np.einsum("nid,njd->nij", u, u)
    else:
        raise ValueError(f"diversity: metric={metric!r}; expected 'l2' or 'cosine'")
    return d[:, iu[0], iu[1]].mean(axis=1)


def diversity(var_feats, metric: str = "l2") -> float:
    """Mean pairwise distance among one condition's M variations [N, M, D], averaged over the N
    conditions. metric='l2' (default) or 'cosine' (1 - cosine similarity)."""
    return float(pairwise_distances_within(var_feats, metric).mean())


@dataclasses.dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features (see `fit_classifier`)."""

    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    weights: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]
    classes: np.ndarray  # [C] the label values, sorted
    converged: bool = True

    def logits(self, feats) -> np.ndarray:
        x = (np.asarray(feats, np.float64) - self.mean) / self.scale
        return x @ self.weights + self.bias

    def predict_proba(self, feats) -> np.ndarray:
        z = self.logits(feats)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, feats) -> np.ndarray:
        return self.classes[np.argmax(self.logits(feats), axis=1)]

    def accuracy(self, feats, labels) -> float:
        return float((self.predict(feats) == np.asarray(labels)).mean())


def fit_classifier(feats, labels, *, l2: float = 1e-3, steps: int = 1000, tol: float = 1e-8) -> LinearProbe:
    """Fits a `LinearProbe`: features are standardised (train mean/std), then
    minimise  mean_i CE(softmax(W x_i + b), y_i) + (l2 / 2) ||W||^2  (bias unpenalised)
    with L-BFGS (scipy, float64, zero init: deterministic). Same objective as scikit-learn's
    `LogisticRegression(C=1 / (l2 * N))`."""
    x = _as_features(feats, "feats")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"fit_classifier: labels {y.shape} do not fit feats {x.shape}")
    classes, yi = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError("fit_classifier: need at least 2 classes")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    xs = (x - mean) / scale
    n, d = xs.shape
    c = classes.size
    onehot = np.zeros((n, c))
    onehot[np.arange(n), yi] = 1.0

    def loss_grad(theta):
        w = theta[: d * c].reshape(d, c)
        b = theta[d * c:]
        z = xs @ w + b
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * (w * w).sum()
        g = (np.exp(logp) - onehot) / n
        return loss, np.concatenate([(xs.T @ g + l2 * w).ravel(), g.sum(axis=0)])

    res = scipy.optimize.minimize(
        loss_grad, np.zeros(d * c + c), jac=True, method="L-BFGS-B",
        options=dict(maxiter=int(steps), gtol=tol, ftol=1e-15, maxcor=20),
    )
    theta = res.x
    return LinearProbe(mean=mean, scale=scale, weights=theta[: d * c].reshape(d, c),
                       bias=theta[d * c:], classes=classes, converged=bool(res.success))


def class_consistency(classifier: LinearProbe, var_feats, cond_labels) -> float:
    """Fraction of variations [N, M, D] that `classifier` assigns to their condition's label [N]."""
    v = _var_feats(var_feats)
    labels = np.asarray(cond_labels)
    if labels.shape != (v.shape[0],):
        raise ValueError(f"class_consistency: cond_labels {labels.shape} do not fit var_feats {v.shape}")
    pred = classifier.predict(v.reshape(-1, v.shape[2])).reshape(v.shape[:2])
    return float((pred == labels[:, None]).mean())
