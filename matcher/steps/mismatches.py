"""Photo/title mismatches judged by a scorer that never saw the product: cross-fitting over K folds by a hash of
product_id. Fold k's products are scored by a closed-form pair (ridge either way or CCA, matcher.steps.baselines) fitted
on a sample's products outside fold k, so a mislabelled product is never taught to count as a match, as it is by a
matching network trained on its own pair.

The setting (kind and penalty, or regulariser and width) is the one with the best out-of-fold mean reciprocal rank;
the threshold is the best-accuracy cut between out-of-fold true pairs and each fold's photos paired with other
products' titles, lowered so that at most score.mismatch_max_flagged_share of the products score under it. The fitted
scorers are small (at most MAX_WIDTH columns per view and fold): the driver fits them
on a bounded sample and executors score every product."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from matcher.steps.baselines import (
    CCA_REGULARISERS,
    CCA_WIDTHS,
    RIDGE_PENALTIES,
    LinearPair,
    PairFitters,
    folds_can_cross_validate,
    product_folds,
    reduce_width,
)
from matcher.steps.evaluate import best_threshold, derangement, roc_auc

# The fold scorers are fitted in float32: faster than float64 for the same chosen setting and out-of-fold MRR
# (measured on the fashion catalog), and they score in float32 anyway.
FIT_DTYPE = np.float32
MAX_WIDTH = 256  # columns per view of a fold's scorer: a ridge map's whole text space (1,536 wide) is reduced to this
SETTINGS = {"ridge_image_to_text": [(p,) for p in RIDGE_PENALTIES],
            "ridge_text_to_image": [(p,) for p in RIDGE_PENALTIES],
            "cca": [(r, w) for r in CCA_REGULARISERS for w in CCA_WIDTHS]}


@dataclass
class FoldScorer:
    """One fold's closed-form pair as float32 arrays: cosine of (x - mean) / std @ w in both views."""
    image_mean: np.ndarray
    image_std: np.ndarray
    image_w: np.ndarray
    text_mean: np.ndarray
    text_std: np.ndarray
    text_w: np.ndarray

    @classmethod
    def of(cls, pair: LinearPair) -> "FoldScorer":
        if any(std.power != 1.0 or std.columns for std in (pair.image_std, pair.text_std)):
            raise ValueError("a fold scorer reads the features as extracted: it takes no pair of powered or cut "
                             "features")
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        return cls(f32(pair.image_std.mean), f32(pair.image_std.std), f32(pair.image_w),
                   f32(pair.text_std.mean), f32(pair.text_std.std), f32(pair.text_w))

    def pair_scores(self, image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        z = ((image_feats - self.image_mean) / self.image_std) @ self.image_w
        u = ((text_feats - self.text_mean) / self.text_std) @ self.text_w
        z /= np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
        u /= np.linalg.norm(u, axis=1, keepdims=True).clip(1e-12)
        return np.einsum("nd,nd->n", z, u).astype(np.float32)


@dataclass
class CrossFitScorer:
    """K fold scorers, each fitted without its fold's products, and one threshold set on out-of-fold pairs."""
    folds: int
    scorers: list[FoldScorer]
    threshold: float
    kind: str
    params: tuple
    fit_products: int
    out_of_fold_mrr: float
    out_of_fold_auc: float  # how often a true pair scores above a photo with another product's title, out of fold
    max_flagged_share: float = 0.0  # the setting the threshold was set with (score.mismatch_max_flagged_share)
    best_cut: float = float("nan")  # the best-accuracy cut, before the cap
    flagged_share: float = float("nan")  # the share of the fit sample's own out-of-fold pairs under the threshold

    def own_pair_scores(self, product_ids: list[str] | np.ndarray, image_feats: np.ndarray,
                        text_feats: np.ndarray) -> np.ndarray:
        """Each product's own photo and title, scored by the scorer of its fold (one that never fitted on it)."""
        fold = product_folds(product_ids, self.folds)
        out = np.empty(len(fold), np.float32)
        for k in np.unique(fold):
            rows = fold == k
            out[rows] = self.scorers[k].pair_scores(image_feats[rows], text_feats[rows])
        return out

    def describe(self) -> dict:
        return {"scorer": self.kind, "setting": list(self.params), "folds": self.folds,
                "fit_products": self.fit_products, "threshold": round(self.threshold, 6),
                "out_of_fold_mrr": round(self.out_of_fold_mrr, 6), "out_of_fold_auc": round(self.out_of_fold_auc, 6),
                "best_cut": round(self.best_cut, 6), "max_flagged_share": self.max_flagged_share,
                "flagged_share": round(self.flagged_share, 6)}


class TooFewProducts(ValueError):
    pass


def fit_cross_fitted(product_ids: list[str] | np.ndarray, image_feats: np.ndarray, text_feats: np.ndarray, folds: int,
                     max_flagged_share: float = 0.0) -> CrossFitScorer:
    """Fit K fold scorers on these products (a sample of the catalog): fold k's on the products outside fold k,
    with the setting of the best out-of-fold mean reciprocal rank; the threshold by capped_threshold."""
    fold = _folds(product_ids, folds)
    image_feats, text_feats = image_feats.astype(FIT_DTYPE), text_feats.astype(FIT_DTYPE)
    fits, totals = [], {kind: np.zeros(len(grid)) for kind, grid in SETTINGS.items()}
    for k in range(folds):
        held, out = fold == k, fold != k
        fitted = PairFitters(image_feats[out], text_feats[out], FIT_DTYPE)
        fits.append(fitted)
        for kind, scores in fitted.validation_mrrs(SETTINGS, image_feats[held], text_feats[held]).items():
            totals[kind] += np.asarray(scores) * held.sum()
    kind, best = max(((kind, i) for kind in SETTINGS for i in range(len(SETTINGS[kind]))),
                     key=lambda c: totals[c[0]][c[1]])  # the first of equals, in SETTINGS order
    scorer = _cross_fit(fold, fits, image_feats, text_feats, kind, SETTINGS[kind][best], max_flagged_share)
    scorer.out_of_fold_mrr = float(totals[kind][best] / len(fold))
    return scorer


def fit_with_setting(product_ids: list[str] | np.ndarray, image_feats: np.ndarray, text_feats: np.ndarray,
                     folds: int, kind: str, setting: tuple, max_flagged_share: float = 0.0) -> CrossFitScorer:
    """The fold scorers of one given setting (kind and parameters), fitted as fit_cross_fitted fits them."""
    fold = _folds(product_ids, folds)
    image_feats, text_feats = image_feats.astype(FIT_DTYPE), text_feats.astype(FIT_DTYPE)
    fits = [PairFitters(image_feats[fold != k], text_feats[fold != k], FIT_DTYPE) for k in range(folds)]
    return _cross_fit(fold, fits, image_feats, text_feats, kind, setting, max_flagged_share)


def capped_threshold(best_cut: float, own_pair_scores: np.ndarray, share: float) -> float:
    """The flag threshold: the best-accuracy cut between as many true as false pairs, lowered where more than
    `share` of the products' own out-of-fold pairs score under it (score.mismatch_max_flagged_share; 0: the cut as
    it is). A catalog's mislabelled products are a few in a hundred, not half: where the cut flags many, most of its
    flags are sound products, and the lowest-scoring ones are the likeliest mismatches."""
    allowed = int(np.floor(share * len(own_pair_scores) + 1e-9))  # products that may be flagged: a share, not more
    if share <= 0 or allowed >= len(own_pair_scores):
        return best_cut
    # A product is flagged strictly below the threshold: the allowed-th lowest score lets at most that many under.
    return min(best_cut, float(np.partition(own_pair_scores, allowed)[allowed]))


def _folds(product_ids, folds: int) -> np.ndarray:
    fold = product_folds(product_ids, folds)
    if not folds_can_cross_validate(fold, folds):
        raise TooFewProducts(f"{len(fold)} products cannot fill {folds} folds of at least 2 products "
                             f"(fold sizes {np.bincount(fold, minlength=folds).tolist()})")
    return fold


def _cross_fit(fold: np.ndarray, fits: list[PairFitters], image_feats: np.ndarray, text_feats: np.ndarray,
               kind: str, setting: tuple, max_flagged_share: float = 0.0) -> CrossFitScorer:
    """Each fold's scorer of this setting, and the threshold on the out-of-fold pairs: every fold's own pairs
    against its photos with other products' titles, each scored by the fold's scorer."""
    scorers, pos, neg = [], [], []
    for k, fitted in enumerate(fits):
        out, held = fold != k, np.nonzero(fold == k)[0]
        pair = reduce_width(fitted.pair(kind, setting), image_feats[out], text_feats[out], MAX_WIDTH)
        scorer = FoldScorer.of(pair)
        scorers.append(scorer)
        img, txt = image_feats[held].astype(np.float32), text_feats[held].astype(np.float32)
        pos.append(scorer.pair_scores(img, txt))
        neg.append(scorer.pair_scores(img, txt[derangement(len(held), k)]))
    pos, neg = np.concatenate(pos), np.concatenate(neg)
    best_cut = best_threshold(pos, neg)
    threshold = capped_threshold(best_cut, pos, max_flagged_share)
    return CrossFitScorer(len(fits), scorers, threshold, kind, setting, len(fold), float("nan"), roc_auc(pos, neg),
                          max_flagged_share, best_cut, float((pos < threshold).mean()))
