"""Held-out metrics: cross-modal recall, matching AUC/accuracy, category accuracy, recommendation precision.

The metrics are computed from embeddings and a pair-scoring function, so baselines (random, ridge) and the matcher
model are measured by the same code."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from matcher.steps.baselines import true_match_standing
from matcher.steps.hubness import hubness, normalised_scores
from matcher.steps.model import MatcherModel
from matcher.steps.scoring import topk

# (image row indices, text row indices) -> match scores in [0, 1] (or any monotone score)
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def recall_at_k(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Row i's true match is column i. Ties with it are broken at random, in expectation: behind `better` items and
    tied with `tied` others, it is in the top k with probability (k - better) / (tied + 1), clipped to [0, 1]; so
    a model that scores everything alike (a view that is the same for every product) gets k / n, not 1."""
    better, tied = true_match_standing(sim)
    return {k: float(np.clip((k - better) / (tied + 1), 0, 1).mean()) for k in ks}


def inverted_softmax(sim: np.ndarray, temperature: float = 0.05) -> np.ndarray:
    """Gallery-aware scores for a (queries x gallery) similarity matrix: each gallery item's scores normalised
    across all the queries (a softmax over each column, in log form), so an item that is close to every query (a
    hub) counts less for each of them. Rank each query's row by the result."""
    scaled = sim / temperature
    top = scaled.max(axis=0, keepdims=True)
    return scaled - (top + np.log(np.exp(scaled - top).sum(axis=0, keepdims=True)))


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]  # ties share their average rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def best_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The score threshold with the best accuracy on these true and false pairs."""
    candidates = np.unique(np.concatenate([pos, neg]))
    if len(candidates) > 512:
        candidates = np.quantile(candidates, np.linspace(0, 1, 513))
    acc = [((pos >= t).sum() + (neg < t).sum()) for t in candidates]
    return float(candidates[int(np.argmax(acc))])


def derangement(n: int, seed: int) -> np.ndarray:
    """A fixed shift: index i is paired with another product's text."""
    shift = int(np.random.default_rng(seed).integers(1, n)) if n > 1 else 0
    return np.roll(np.arange(n), shift)


def true_and_false_pair_scores(pair_score: PairScorer, rows: np.ndarray,
                               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each row's own photo and text, and of its photo with another row's text."""
    return pair_score(rows, rows), pair_score(rows, rows[derangement(len(rows), seed)])


def recall_at_10_with_hubness(z: np.ndarray, u: np.ndarray, rows: np.ndarray, bank: np.ndarray,
                              temperature: float) -> dict[str, float]:
    """Text->image and image->text R@10 among `rows`, ranked by cosine less hubness against the `bank` rows'
    other modality: as a user ranks with the published embeddings' hubness columns."""
    image_hub, text_hub = hubness(z[rows], u[bank], temperature), hubness(u[rows], z[bank], temperature)
    return {"text_to_image_recall_at_10_hubness":
            recall_at_k(normalised_scores(u[rows], z[rows], image_hub), (10,))[10],
            "image_to_text_recall_at_10_hubness":
            recall_at_k(normalised_scores(z[rows], u[rows], text_hub), (10,))[10]}


def mean_recalls(metrics: dict) -> dict[str, float]:
    """mean_recall_at_1 and _at_10: each the mean of the two directions' recall, where `metrics` hold both."""
    ways = ("image_to_text", "text_to_image")
    return {f"mean_recall_at_{k}": sum(metrics[f"{w}_recall_at_{k}"] for w in ways) / 2 for k in (1, 10)
            if all(isinstance(metrics.get(f"{w}_recall_at_{k}"), (int, float)) for w in ways)}


def embedding_metrics(z: np.ndarray, u: np.ndarray, v: np.ndarray, categories: np.ndarray, heldout: np.ndarray,
                      pair_score: PairScorer, threshold: float, seed: int = 0,
                      hubness_bank: tuple[np.ndarray, float] | None = None) -> dict[str, float]:
    """`hubness_bank`: (bank rows, temperature), to add R@10 ranked with hubness against those rows."""
    ho = np.nonzero(heldout)[0]
    metrics: dict[str, float] = {"heldout_products": int(len(ho))}
    if len(ho) < 2:
        return metrics
    sim = z[ho] @ u[ho].T
    for k, r in recall_at_k(sim).items():
        metrics[f"image_to_text_recall_at_{k}"] = r
    for k, r in recall_at_k(sim.T).items():
        metrics[f"text_to_image_recall_at_{k}"] = r
    metrics |= mean_recalls(metrics)
    if hubness_bank is not None and len(hubness_bank[0]):
        metrics |= recall_at_10_with_hubness(z, u, ho, *hubness_bank)

    pos, neg = true_and_false_pair_scores(pair_score, ho, seed)
    metrics["matching_auc"] = roc_auc(pos, neg)
    metrics["matching_threshold"] = float(threshold)
    metrics["matching_accuracy"] = float(((pos >= threshold).sum() + (neg < threshold).sum()) / (2 * len(ho)))

    labelled = categories != ""
    train_lab = np.nonzero(labelled & ~heldout)[0]
    test_lab = np.nonzero(labelled & heldout)[0]
    if len(train_lab) >= 1 and len(test_lab) >= 1:
        _, nn_idx = topk(v[test_lab], v[train_lab], k=10)
        predicted = np.array([_majority(row) for row in categories[train_lab][nn_idx]])
        metrics["category_accuracy"] = float((predicted == categories[test_lab]).mean())
        _, rec_idx = topk(v[test_lab], v, k=11)
        # Drop each product itself from its own list (it is its own nearest neighbour).
        rec_idx = np.array([[j for j in row if j != i][:10] for i, row in zip(test_lab, rec_idx)])
        # Of all the neighbours whose category is known, pooled: an unlabelled one is neither right nor wrong (and a
        # per-product share would rate one right neighbour among nine unlabelled above nine right of ten).
        known = int((categories[rec_idx] != "").sum())
        if known:
            same = int((categories[rec_idx] == categories[test_lab][:, None]).sum())
            metrics["recommendation_precision_at_10"] = same / known
    return metrics


@torch.no_grad()
def embed(model: MatcherModel, image_feats: np.ndarray, text_feats: np.ndarray) -> tuple[np.ndarray, ...]:
    z = model.embed_images(torch.as_tensor(image_feats, dtype=torch.float32))
    u = model.embed_texts(torch.as_tensor(text_feats, dtype=torch.float32))
    v = model.product_vectors(z, u)
    return z.numpy(), u.numpy(), v.numpy()


def model_pair_scorer(model: MatcherModel, z: np.ndarray, u: np.ndarray, batch_size: int = 4096) -> PairScorer:
    """Match probability of (photo i, text j) pairs, batch_size pairs at a time: a catalog's candidate pairs
    (products x re-ranked candidates) would otherwise hold gigabytes of hidden activations at once."""
    zt, ut = torch.as_tensor(z), torch.as_tensor(u)

    @torch.no_grad()
    def score(img_idx: np.ndarray, txt_idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(img_idx), dtype=np.float32)
        for start in range(0, len(img_idx), batch_size):
            stop = start + batch_size
            out[start:stop] = model.match_probability(zt[img_idx[start:stop]], ut[txt_idx[start:stop]]).numpy()
        return out

    return score


def cross_match(pair: PairScorer, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How well products a and b match each other (row by row), by the matching network's probability `pair` of
    (photo, text): the mean of (b's photo, a's text) and (a's photo, b's text), so symmetric in a and b."""
    return (pair(b, a) + pair(a, b)) / 2


def evaluate_model(model: MatcherModel, image_feats: np.ndarray, text_feats: np.ndarray, categories: np.ndarray,
                   heldout: np.ndarray, seed: int = 0,
                   hubness_bank: tuple[np.ndarray, float] | None = None) -> dict[str, float]:
    """Metrics on the held-out rows; categories ("" = unknown) of all rows serve the kNN and precision metrics."""
    z, u, v = embed(model, image_feats, text_feats)
    return embedding_metrics(z, u, v, categories, heldout, model_pair_scorer(model, z, u),
                             float(model.match_threshold), seed, hubness_bank)


def _majority(labels: np.ndarray) -> str:
    values, counts = np.unique(labels, return_counts=True)
    best = counts.max()
    for label in labels:  # the nearest of the most frequent labels wins ties
        if counts[values == label][0] == best:
            return str(label)
    return str(labels[0])
