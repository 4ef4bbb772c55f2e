"""Closed-form baselines between frozen image and text features, fitted every night on the training split: ridge
maps in both directions and regularised CCA. The promotion gate refuses a learned model that does not beat the best
of them, and the CCA solution seeds the learned heads (see matcher.train).

All work in standardised feature space (the training split's mean and standard deviation) and return L2-normalised
embeddings, so retrieval is by cosine as for the learned model. Their one hyper-parameter (the ridge penalty, the
CCA regulariser and width) is chosen on a validation split by mean reciprocal rank, not tuned to any catalog."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGE_PENALTIES = (0.1, 1.0, 10.0, 100.0)       # multiples of the mean squared feature norm / n (scale-free)
CCA_REGULARISERS = (0.01, 0.1, 0.5)             # added to the normalised covariances' diagonals
CCA_WIDTHS = (32, 64, 128, 256)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


@dataclass
class Standardiser:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        return cls(x.mean(0), x.std(0) + 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float64)


def mean_reciprocal_rank(queries: np.ndarray, gallery: np.ndarray) -> float:
    """Query i's true match is gallery item i: the mean of 1 / its rank by cosine."""
    sims = _normalise(queries) @ _normalise(gallery).T
    rank = (sims > np.diag(sims)[:, None]).sum(1) + 1
    return float(np.mean(1.0 / rank))


@dataclass
class LinearPair:
    """An image map and a text map into one space: embed with (x - mean) / std @ w, then normalise."""
    name: str
    image_std: Standardiser
    text_std: Standardiser
    image_w: np.ndarray
    text_w: np.ndarray
    setting: float

    def embed_images(self, image_feats: np.ndarray) -> np.ndarray:
        return _normalise(self.image_std(image_feats) @ self.image_w).astype(np.float32)

    def embed_texts(self, text_feats: np.ndarray) -> np.ndarray:
        return _normalise(self.text_std(text_feats) @ self.text_w).astype(np.float32)

    def validation_mrr(self, image_feats: np.ndarray, text_feats: np.ndarray) -> float:
        z, u = self.embed_images(image_feats), self.embed_texts(text_feats)
        return (mean_reciprocal_rank(u, z) + mean_reciprocal_rank(z, u)) / 2


def _ridge_map(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """argmin ||x w - y||^2 + lam ||w||^2, in whichever of the primal or dual forms is smaller."""
    n, d = x.shape
    lam = penalty * float((x * x).sum()) / n
    if d <= n:
        return np.linalg.solve(x.T @ x + lam * np.eye(d), x.T @ y)
    return x.T @ np.linalg.solve(x @ x.T + lam * np.eye(n), y)


def fit_ridge(image_feats: np.ndarray, text_feats: np.ndarray, direction: str, penalty: float) -> LinearPair:
    """`image_to_text`: images mapped into the (standardised) text space; `text_to_image`: the reverse."""
    si, st = Standardiser.fit(image_feats), Standardiser.fit(text_feats)
    x, y = si(image_feats), st(text_feats)
    if direction == "image_to_text":
        return LinearPair("ridge image->text", si, st, _ridge_map(x, y, penalty), np.eye(y.shape[1]), penalty)
    if direction == "text_to_image":
        return LinearPair("ridge text->image", si, st, np.eye(x.shape[1]), _ridge_map(y, x, penalty), penalty)
    raise ValueError(f"unknown direction {direction!r}")


def _inverse_sqrt(c: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(c)
    return (vectors / np.sqrt(values.clip(1e-9))) @ vectors.T


def fit_cca(image_feats: np.ndarray, text_feats: np.ndarray, regulariser: float, width: int) -> LinearPair:
    """Regularised CCA: whiten each view (covariance + regulariser * I, on unit-variance features), then the top
    `width` singular directions of the whitened cross-covariance, each weighted by its canonical correlation."""
    si, st = Standardiser.fit(image_feats), Standardiser.fit(text_feats)
    x, y = si(image_feats), st(text_feats)
    n = len(x)
    # Work in each view's span when features outnumber products (the covariance is then rank-deficient anyway).
    bx = _span(x)
    by = _span(y)
    xr, yr = x @ bx, y @ by
    cxx = xr.T @ xr / n + regulariser * np.eye(xr.shape[1])
    cyy = yr.T @ yr / n + regulariser * np.eye(yr.shape[1])
    wx, wy = _inverse_sqrt(cxx), _inverse_sqrt(cyy)
    u, s, vt = np.linalg.svd(wx @ (xr.T @ yr / n) @ wy, full_matrices=False)
    k = max(1, min(width, len(s)))
    scale = s[:k]
    return LinearPair(f"cca (width {k})", si, st, bx @ wx @ u[:, :k] * scale, by @ wy @ vt[:k].T * scale,
                      regulariser)


def _span(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis (d, r) of the row space of x, r <= min(n, d)."""
    n, d = x.shape
    if d <= n:
        return np.eye(d)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-6
    return vt[keep].T


def fit_baselines(image_feats: np.ndarray, text_feats: np.ndarray, validation: np.ndarray) -> dict[str, LinearPair]:
    """Ridge both ways and CCA, each with its setting chosen by validation MRR, then refitted on all the rows
    given (training + validation). `validation` marks the rows held out for the choice."""
    fit = ~validation
    if validation.sum() < 2 or fit.sum() < 2:
        fit = validation = np.ones(len(image_feats), dtype=bool)

    def choose(make, settings):
        scored = [(make(image_feats[fit], text_feats[fit], *s).validation_mrr(image_feats[validation],
                                                                             text_feats[validation]), i)
                  for i, s in enumerate(settings)]
        best = settings[max(scored)[1]]
        return make(image_feats, text_feats, *best)

    return {
        "ridge_image_to_text": choose(lambda x, y, p: fit_ridge(x, y, "image_to_text", p),
                                      [(p,) for p in RIDGE_PENALTIES]),
        "ridge_text_to_image": choose(lambda x, y, p: fit_ridge(x, y, "text_to_image", p),
                                      [(p,) for p in RIDGE_PENALTIES]),
        "cca": choose(fit_cca, [(r, w) for r in CCA_REGULARISERS for w in CCA_WIDTHS]),
    }
