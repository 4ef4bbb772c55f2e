"""Closed-form baselines between frozen image and text features, fitted every night on the training split: ridge
maps in both directions and regularised CCA. The promotion gate refuses a learned model that does not beat the best
of them, and the CCA solution seeds the learned heads (see matcher.steps.train).

All work in standardised feature space (the training split's mean and standard deviation) and return L2-normalised
embeddings, so retrieval is by cosine as for the learned model. Their one hyper-parameter (the ridge penalty, the
CCA regulariser and width) is chosen by mean reciprocal rank, not tuned to any catalog: by k-fold cross-validation
over the training and validation rows together (a small catalog's validation split alone, ~70 products, is too
noisy to choose among 36 settings), or on the validation split alone with folds <= 1."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

# Each grid reaches past the values validation picks on the small-catalog protocol, so that the choice is
# validation's and not the grid's edge (on wide features CCA chose the largest regulariser offered in every draw
# when the grid stopped at 0.5).
RIDGE_PENALTIES = (0.01, 0.1, 0.3, 1.0, 10.0, 100.0)  # multiples of the mean squared feature norm / n (scale-free)
CCA_REGULARISERS = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0)    # added to the normalised covariances' diagonals
CCA_WIDTHS = (16, 32, 48, 64, 128, 256)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


# A column constant on the rows a standardisation is fitted on (e.g. a hashed word or a colour bin no product had)
# carries nothing learned: it is divided by DEAD_COLUMN_STD, so a later row (a new product, a search query) that has
# it reads about 0 there, where a division by its std would have made it the largest value of the row.
DEAD_COLUMN = 1e-6
DEAD_COLUMN_STD = 1e6


def product_folds(product_ids: list[str] | np.ndarray, folds: int) -> np.ndarray:
    """Each product's fold, by a hash of its id: the same every night, on every machine and in any row order, and a
    product added to the catalog moves no other product's fold (a fold drawn by row position would reshuffle them
    all, and with them the night's choice between settings whose scores are close)."""
    return np.array([int.from_bytes(hashlib.sha1(str(p).encode(), usedforsecurity=False).digest()[4:8], "little")
                     % folds
                     for p in product_ids], dtype=np.int64)


def signed_power(x: np.ndarray, power: float) -> np.ndarray:
    """sign(x) * |x| ** power: with power < 1, a few large activations of a pooled CNN feature weigh less against
    the many small ones (power normalisation); 1 returns x itself."""
    if power == 1.0:
        return x
    return np.sign(x) * np.abs(x) ** power


@dataclass
class Standardiser:
    mean: np.ndarray
    std: np.ndarray
    dtype: type = np.float64  # of the standardised rows, and so of every fit on them
    power: float = 1.0  # the rows are first raised to this power (signed_power): that of the head it maps into
    columns: int = 0  # and before that cut to their first this many columns (0: all), as that head reads them

    @classmethod
    def fit(cls, x: np.ndarray, dtype: type = np.float64) -> "Standardiser":
        std = x.std(0)
        return cls(x.mean(0), np.where(std < DEAD_COLUMN, DEAD_COLUMN_STD, std + 1e-6), dtype)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """The rows as the fit read them: cut to `columns`, raised to `power`."""
        return signed_power(x[:, :self.columns] if self.columns else x, self.power)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.subtract(self.inputs(x), self.mean, dtype=self.dtype)  # one new array, divided in place
        out /= self.std
        return out


def true_match_standing(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a similarity matrix whose true match is the diagonal entry: how many items score above the
    true match, and how many others tie with it (the counts recall and MRR break ties by). A NaN similarity ranks
    last: a model whose scores are NaN measures as chance or worse, never as perfect."""
    if np.isnan(sim).any():
        sim = np.where(np.isnan(sim), -np.inf, sim)
    true = np.diag(sim)[:, None]
    return (sim > true).sum(1), (sim == true).sum(1) - 1


def _expected_reciprocal_rank(better: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """1 / rank of a true match behind `better` items and tied with `tied` others, ties broken at random, in
    expectation: the mean of 1 / (better + 1) ... 1 / (better + tied + 1)."""
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int((better + tied).max(initial=0)) + 2))])
    return (harmonic[better + tied + 1] - harmonic[better]) / (tied + 1)


def two_way_mrr(z: np.ndarray, u: np.ndarray) -> float:
    """The mean of both directions' MRR (texts u[i] querying photos z, and photos querying texts; the true match is
    the same row), from one similarity matrix: its rows rank one way, its columns the other. Ties with the true
    match count as broken at random (evaluate.recall_at_k), so a view alike for every product scores as chance."""
    sims = _normalise(u) @ _normalise(z).T
    text_to_image = _expected_reciprocal_rank(*true_match_standing(sims))
    image_to_text = _expected_reciprocal_rank(*true_match_standing(sims.T))
    return float((np.mean(text_to_image) + np.mean(image_to_text)) / 2)


@dataclass
class LinearPair:
    """An image map and a text map into one space: embed with (x - mean) / std @ w, then normalise."""
    name: str
    image_std: Standardiser
    text_std: Standardiser
    image_w: np.ndarray
    text_w: np.ndarray
    kind: str          # ridge_image_to_text | ridge_text_to_image | cca
    params: tuple      # the setting: (penalty,) or (regulariser, width)
    selection_mrr: float = float("nan")  # the score its setting was chosen by (cross-validated or validation MRR)

    def embed_images(self, image_feats: np.ndarray) -> np.ndarray:
        return _normalise(self.image_std(image_feats) @ self.image_w).astype(np.float32)

    def embed_texts(self, text_feats: np.ndarray) -> np.ndarray:
        return _normalise(self.text_std(text_feats) @ self.text_w).astype(np.float32)

    def validation_mrr(self, image_feats: np.ndarray, text_feats: np.ndarray) -> float:
        return two_way_mrr(self.embed_images(image_feats), self.embed_texts(text_feats))


class _Views:
    """Two views' rows standardised once, and each view's Gram eigendecomposition computed once: the ridge maps
    and CCA fitted on the same rows share both. `dtype`: what the fits compute in (float32: faster)."""

    def __init__(self, image_feats: np.ndarray, text_feats: np.ndarray, dtype: type = np.float64):
        self.si, self.st = Standardiser.fit(image_feats, dtype), Standardiser.fit(text_feats, dtype)
        self.x, self.y = self.si(image_feats), self.st(text_feats)
        self._eigh: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._cross: np.ndarray | None = None

    def cross(self) -> np.ndarray:
        """x.T @ y (image features x text features), computed once: the ridge maps either way and CCA all need it
        where features <= rows (each computing it from the rows cost as much as the rest of its fit)."""
        if self._cross is None:
            self._cross = self.x.T @ self.y
        return self._cross

    def gram_eigh(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        """eigh of v.T @ v (features <= rows) or v @ v.T (the dual, when features outnumber rows)."""
        if view not in self._eigh:
            v = self.x if view == "image" else self.y
            self._eigh[view] = np.linalg.eigh(v.T @ v if v.shape[1] <= v.shape[0] else v @ v.T)
        return self._eigh[view]


class RidgeFit:
    """Ridge maps between two feature views in one direction, factored once (an eigendecomposition of the Gram
    matrix, in whichever of the primal or dual forms is smaller) so that every penalty costs two small products:
    argmin ||x w - y||^2 + lam ||w||^2, lam = penalty * mean squared row norm of x."""

    def __init__(self, image_feats: np.ndarray, text_feats: np.ndarray, direction: str, views: _Views | None = None):
        if direction not in ("image_to_text", "text_to_image"):
            raise ValueError(f"unknown direction {direction!r}")
        self.direction = direction
        views = views or _Views(image_feats, text_feats)
        self.si, self.st = views.si, views.st
        x, y = views.x, views.y
        if direction == "text_to_image":
            x, y = y, x
        n, d = x.shape
        # A view alike for every product standardises to zeros: any positive penalty then maps it to zeros (zero
        # would divide by zero).
        self.scale = float((x * x).sum()) / n or 1.0
        primal = d <= n
        self.values, vectors = views.gram_eigh("image" if direction == "image_to_text" else "text")
        self.left = vectors if primal else x.T @ vectors  # w = left diag(1 / (values + lam)) right
        if primal:
            self.right = vectors.T @ (views.cross() if direction == "image_to_text" else views.cross().T)
        else:
            self.right = vectors.T @ y

    def shrinkage(self, penalty: float) -> np.ndarray:
        """The eigenvalues' divisors for this penalty: w = left diag(1 / shrinkage) right."""
        return self.values.clip(0) + penalty * self.scale

    def pair(self, penalty: float) -> LinearPair:
        w = self.left @ (self.right / self.shrinkage(penalty)[:, None])
        target = np.eye(w.shape[1])  # the mapped-onto view stays as it is
        if self.direction == "image_to_text":
            return LinearPair("ridge image->text", self.si, self.st, w, target, "ridge_image_to_text", (penalty,))
        return LinearPair("ridge text->image", self.si, self.st, target, w, "ridge_text_to_image", (penalty,))


def fit_ridge(image_feats: np.ndarray, text_feats: np.ndarray, direction: str, penalty: float) -> LinearPair:
    """`image_to_text`: images mapped into the (standardised) text space; `text_to_image`: the reverse."""
    return RidgeFit(image_feats, text_feats, direction).pair(penalty)


class CCAFit:
    """Regularised CCA of two feature views, factored once so that every regulariser costs one small singular-value
    decomposition and every width a slice: whiten each view (covariance + regulariser * I, on unit-variance
    features, in each view's row space when features outnumber products), then the top `width` singular
    directions of the whitened cross-covariance, each weighted by its canonical correlation."""

    def __init__(self, image_feats: np.ndarray, text_feats: np.ndarray, views: _Views | None = None,
                 max_width: int = max(CCA_WIDTHS)):
        views = views or _Views(image_feats, text_feats)
        self.max_width = max_width  # the directions kept per regulariser: no setting uses more
        self.si, self.st = views.si, views.st
        x, y = views.x, views.y
        self.n = len(x)
        # Each view's covariance eigenvectors: the shared Gram's where features <= rows, else the row space's.
        (vx, self.bx), (vy, self.by) = (_eigh_in_span(views, view, self.n) for view in ("image", "text"))
        # The cross-covariance in those eigenbases: whitening is then a diagonal scaling for every regulariser.
        self.values_x, self.values_y = vx[0], vy[0]
        self.vectors_x, self.vectors_y = vx[1], vy[1]
        if self.bx is None and self.by is None:  # from the shared x.T @ y: two products of feature-sized matrices
            self.m = self.vectors_x.T @ views.cross() @ self.vectors_y / self.n
        else:
            xr = x if self.bx is None else x @ self.bx
            yr = y if self.by is None else y @ self.by
            self.m = (xr @ self.vectors_x).T @ (yr @ self.vectors_y) / self.n
        self._solved: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def pair(self, regulariser: float, width: int) -> LinearPair:
        if regulariser not in self._solved:
            # wx @ cxy @ wy with wx = V diag(1 / sqrt(values + r)) V.T: the SVD of the diagonally scaled m, turned
            # back by V (the same solution, without two covariance-sized products per regulariser).
            dx = 1.0 / np.sqrt((self.values_x + regulariser).clip(1e-9))
            dy = 1.0 / np.sqrt((self.values_y + regulariser).clip(1e-9))
            u, s, v = _svd_by_gram(dx[:, None] * self.m * dy[None, :], self.max_width)
            image_w = self.vectors_x @ (dx[:, None] * u)
            text_w = self.vectors_y @ (dy[:, None] * v)
            self._solved[regulariser] = (image_w if self.bx is None else self.bx @ image_w,
                                         text_w if self.by is None else self.by @ text_w, s)
        image_w, text_w, s = self._solved[regulariser]
        if width > self.max_width:
            raise ValueError(f"this CCA fit keeps {self.max_width} directions, not {width}")
        k = max(1, min(width, len(s)))
        return LinearPair(f"cca (width {k})", self.si, self.st, image_w[:, :k] * s[:k], text_w[:, :k] * s[:k],
                          "cca", (regulariser, width))


def fit_cca(image_feats: np.ndarray, text_feats: np.ndarray, regulariser: float, width: int) -> LinearPair:
    """One CCA setting (see CCAFit)."""
    return CCAFit(image_feats, text_feats, max_width=max(width, 1)).pair(regulariser, width)


def _svd_by_gram(b: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """b = u diag(s) v.T, s descending, from the eigendecomposition of the smaller Gram matrix (faster than an
    SVD); with `k`, only the top k singular triplets (the products that turn them into maps then cost k columns,
    not all). The squaring costs accuracy only in singular values below sqrt(eps) of the largest, whose
    directions CCA weighs by s and so never uses; their columns are zeros here."""
    flip = b.shape[0] < b.shape[1]
    a = b.T if flip else b
    values, right = np.linalg.eigh(a.T @ a)
    s = np.sqrt(values[::-1][:k].clip(0))
    right = right[:, ::-1][:, :k]
    used = s > s[0] * 1e-7 if len(s) and s[0] > 0 else np.zeros(len(s), dtype=bool)
    left = np.zeros((a.shape[0], len(s)), dtype=a.dtype)
    left[:, used] = (a @ right[:, used]) / s[used]
    return (right, s, left) if flip else (left, s, right)


def _eigh_in_span(views: _Views, view: str, n: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    """A view's covariance eigendecomposition (values, vectors) and the basis it is expressed in: None (the
    features themselves) where features <= rows, sharing the Gram's eigendecomposition with the ridge maps; else
    an orthonormal basis (d, r) of the rows' span, r <= n, where the covariance is diagonal (s^2 / n): x's right
    singular vectors, from the dual Gram's eigendecomposition the ridge maps share (x.T u / s; an SVD of x cost
    several times more)."""
    x = views.x if view == "image" else views.y
    d = x.shape[1]
    values, vectors = views.gram_eigh(view)
    if d <= n:
        return (values / n, vectors), None
    s2, u = values[::-1].clip(0), vectors[:, ::-1]
    # s > 1e-6 of the largest, as far as the Gram's precision resolves it (float32 fits: its eigenvalues' noise).
    keep = s2 > s2[0] * max(1e-12, 100 * np.finfo(values.dtype).eps)
    basis = x.T @ (u[:, keep] / np.sqrt(s2[keep]))
    return (s2[keep] / n, np.eye(int(keep.sum()))), basis


def _mapped(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w, skipping the product where w is the identity (a ridge pair's mapped-onto view)."""
    if w.shape[0] == w.shape[1] and np.array_equal(w, np.eye(len(w), dtype=w.dtype)):
        return x
    return x @ w


def reduce_width(pair: LinearPair, image_feats: np.ndarray, text_feats: np.ndarray, dim: int) -> LinearPair:
    """The same pair in at most `dim` dimensions: the top principal directions of both views' embeddings of these
    rows (a ridge map lands in a whole feature space, 384 or 1,280 wide, where the learned space has `dim`)."""
    k = pair.image_w.shape[1]
    if k <= dim:
        return pair
    both = np.concatenate([_mapped(pair.image_std(image_feats), pair.image_w), _mapped(pair.text_std(text_feats),
                                                                                   pair.text_w)])
    both -= both.mean(0)
    _, vectors = np.linalg.eigh(both.T @ both)  # its principal directions, ascending: the SVD's right vectors
    q = vectors[:, ::-1][:, :dim]
    return LinearPair(f"{pair.name} (top {dim} directions)", pair.image_std, pair.text_std, pair.image_w @ q,
                      pair.text_w @ q, pair.kind, pair.params)


def refit(pair: LinearPair, image_feats: np.ndarray, text_feats: np.ndarray) -> LinearPair:
    """The same kind of baseline with the same setting (and the same inputs: columns and powers), fitted on other
    rows (e.g. training + validation)."""
    si, st = pair.image_std, pair.text_std
    x, t = si.inputs(image_feats), st.inputs(text_feats)
    fitted = (fit_cca(x, t, *pair.params) if pair.kind == "cca"
              else fit_ridge(x, t, pair.kind.removeprefix("ridge_"), *pair.params))
    return replace(fitted, image_std=replace(fitted.image_std, power=si.power, columns=si.columns),
                   text_std=replace(fitted.text_std, power=st.power, columns=st.columns))


def fit_baselines(image_feats: np.ndarray, text_feats: np.ndarray, validation: np.ndarray,
                  folds: int = 1, product_ids: list[str] | np.ndarray | None = None) -> dict[str, LinearPair]:
    """Ridge both ways and CCA, each fitted on the rows outside `validation` (a mask) with its setting chosen by
    mean reciprocal rank: cross-validated over all the rows in `folds` folds by product id (`product_folds`; the
    rows' positions stand in for ids not given), or on the validation rows (folds <= 1, or too few rows to give
    each fold two). Each pair's `selection_mrr` is that score, comparable across the three."""
    fit = ~validation
    if validation.sum() < 2 or fit.sum() < 2:
        fit = validation = np.ones(len(image_feats), dtype=bool)
    grids = {"ridge_image_to_text": [(p,) for p in RIDGE_PENALTIES],
             "ridge_text_to_image": [(p,) for p in RIDGE_PENALTIES],
             "cca": [(r, w) for r in CCA_REGULARISERS for w in CCA_WIDTHS]}
    fitters = PairFitters(image_feats[fit], text_feats[fit])
    fold = _cross_validation_folds(len(image_feats), folds, product_ids)
    if fold is not None:
        scores = _cross_validated_mrr(image_feats, text_feats, grids, fold, folds)
    else:
        scores = fitters.validation_mrrs(grids, image_feats[validation], text_feats[validation])
    out = {}
    for kind, grid in grids.items():
        best = int(np.argmax(scores[kind]))  # the first of equals
        out[kind] = replace(fitters.pair(kind, grid[best]), selection_mrr=float(scores[kind][best]))
    return out


class PairFitters:
    """Each kind's pair for a setting on one set of rows; CCA's factorisation shared by all its settings.
    `dtype`: what the fits compute in (float64 by default; float32 faster)."""

    def __init__(self, image_feats: np.ndarray, text_feats: np.ndarray, dtype: type = np.float64):
        self.image_feats, self.text_feats = image_feats, text_feats
        self.views = _Views(image_feats, text_feats, dtype)
        self._fits: dict[str, CCAFit | RidgeFit] = {}

    def _fit(self, kind: str) -> "CCAFit | RidgeFit":
        if kind not in self._fits:
            self._fits[kind] = (CCAFit(self.image_feats, self.text_feats, self.views) if kind == "cca" else
                                RidgeFit(self.image_feats, self.text_feats, kind.removeprefix("ridge_"), self.views))
        return self._fits[kind]

    def pair(self, kind: str, setting: tuple) -> LinearPair:
        return self._fit(kind).pair(*setting)

    def validation_mrrs(self, grids: dict[str, list[tuple]], image_feats: np.ndarray,
                        text_feats: np.ndarray) -> dict[str, list[float]]:
        """Each setting's validation MRR on these rows (as LinearPair.validation_mrr), the rows standardised once,
        each CCA regulariser's full embedding computed once and sliced per width, and each ridge penalty applied
        to the rows' projection on the factored map (never forming the map itself)."""
        x, y = self.views.si(image_feats), self.views.st(text_feats)
        out: dict[str, list[float]] = {}
        for kind, grid in grids.items():
            fit, scores, full = self._fit(kind), [], {}
            if isinstance(fit, RidgeFit):
                # The mapped view's rows on the map's left factor; the other view is its own standardised space.
                mapped, other = (x, y) if fit.direction == "image_to_text" else (y, x)
                projected = mapped @ fit.left
            for setting in grid:
                if isinstance(fit, CCAFit):
                    pair = fit.pair(*setting)
                    if setting[0] not in full:
                        image_w, text_w, s = fit._solved[setting[0]]
                        full[setting[0]] = (x @ image_w, y @ text_w, s)
                        # The slice below reproduces pair.image_w = image_w[:, :k] * s[:k].
                    zx, zy, s = full[setting[0]]
                    k = pair.image_w.shape[1]
                    z, u = _normalise(zx[:, :k] * s[:k]), _normalise(zy[:, :k] * s[:k])
                else:
                    z = _normalise((projected / fit.shrinkage(setting[0])) @ fit.right)
                    u = _normalise(other)
                z, u = z.astype(np.float32), u.astype(np.float32)
                scores.append(two_way_mrr(z, u))
            out[kind] = scores
        return out


def folds_can_cross_validate(fold: np.ndarray, folds: int) -> bool:
    """Whether each row's fold (`fold`) gives every fold, and the rows outside it, at least two rows: a fit and an
    MRR each need two."""
    sizes = np.bincount(fold, minlength=folds)
    return folds >= 2 and not ((sizes < 2).any() or (len(fold) - sizes < 2).any())


def can_cross_validate(rows: int, folds: int, product_ids: list[str] | np.ndarray | None = None) -> bool:
    """Whether fit_baselines chooses the settings of `rows` rows by cross-validation in `folds` folds."""
    return _cross_validation_folds(rows, folds, product_ids) is not None


def _cross_validation_folds(rows: int, folds: int, product_ids) -> np.ndarray | None:
    """Each row's fold, or None where cross-validation cannot run: one fold asked for, or a fold (or the rows outside
    it) under two rows."""
    if folds <= 1:
        return None
    if product_ids is None:
        product_ids = range(rows)
    elif len(product_ids) != rows:
        raise ValueError(f"{len(product_ids)} product ids for {rows} rows")
    fold = product_folds(product_ids, folds)
    return fold if folds_can_cross_validate(fold, folds) else None


def _cross_validated_mrr(image_feats: np.ndarray, text_feats: np.ndarray, grids: dict[str, list[tuple]],
                         fold: np.ndarray, folds: int) -> dict[str, list[float]]:
    """Each setting's mean validation MRR over the folds (`fold`: each row's)."""
    totals = {kind: np.zeros(len(grid)) for kind, grid in grids.items()}
    for f in range(folds):
        held = fold == f
        fitters = PairFitters(image_feats[~held], text_feats[~held])
        for kind, scores in fitters.validation_mrrs(grids, image_feats[held], text_feats[held]).items():
            totals[kind] += scores
    return {kind: list(total / folds) for kind, total in totals.items()}


def baseline_metrics(image_feats: np.ndarray, text_feats: np.ndarray, categories: np.ndarray, heldout: np.ndarray,
                     train_rows: np.ndarray, pairs: dict[str, LinearPair]) -> dict[str, dict[str, float]]:
    """Each baseline (fitted on `train_rows`) measured on the held-out rows by the same code as the learned model
    (cosine for the pair score, its match threshold set on `train_rows`)."""
    from matcher.steps.evaluate import best_threshold, embedding_metrics, true_and_false_pair_scores

    rows = np.nonzero(train_rows)[0]
    out = {}
    for name, pair in pairs.items():
        z, u = pair.embed_images(image_feats), pair.embed_texts(text_feats)

        def cosine(i: np.ndarray, j: np.ndarray, z=z, u=u) -> np.ndarray:
            return np.einsum("nd,nd->n", z[i], u[j])

        threshold = best_threshold(*true_and_false_pair_scores(cosine, rows))
        out[name] = embedding_metrics(z, u, _normalise(z + u), categories, heldout, cosine, threshold)
    return out
