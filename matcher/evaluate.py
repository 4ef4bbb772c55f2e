"""Held-out metrics of a model: cross-modal recall, matching AUC/accuracy, category accuracy, rec precision."""
from __future__ import annotations

import numpy as np
import torch

from matcher.model import MatcherModel
from matcher.scoring import topk


def recall_at_k(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Row i's true match is column i."""
    true = np.diag(sim)[:, None]
    rank = (sim > true).sum(1)  # 0 = best
    return {k: float((rank < k).mean()) for k in ks}


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    scores = np.concatenate([pos, neg])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks of ties.
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def embed(model: MatcherModel, image_feats: np.ndarray, text_feats: np.ndarray) -> tuple[np.ndarray, ...]:
    z = model.embed_images(torch.as_tensor(image_feats, dtype=torch.float32))
    u = model.embed_texts(torch.as_tensor(text_feats, dtype=torch.float32))
    v = model.product_vectors(z, u)
    return z.numpy(), u.numpy(), v.numpy()


@torch.no_grad()
def evaluate_model(model: MatcherModel, image_feats: np.ndarray, text_feats: np.ndarray, categories: np.ndarray,
                   heldout: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Metrics on the held-out rows; categories ("" = unknown) of all rows serve the kNN and precision metrics."""
    z, u, v = embed(model, image_feats, text_feats)
    ho = np.nonzero(heldout)[0]
    metrics: dict[str, float] = {"heldout_products": int(len(ho))}
    if len(ho) < 2:
        return metrics
    sim = z[ho] @ u[ho].T
    for k, r in recall_at_k(sim).items():
        metrics[f"image_to_text_recall_at_{k}"] = r
    for k, r in recall_at_k(sim.T).items():
        metrics[f"text_to_image_recall_at_{k}"] = r
    metrics["mean_recall_at_10"] = (metrics["image_to_text_recall_at_10"] + metrics["text_to_image_recall_at_10"]) / 2

    rng = np.random.default_rng(seed)
    shift = rng.integers(1, len(ho))
    zt, ut = torch.as_tensor(z[ho]), torch.as_tensor(u[ho])
    pos = model.match_probability(zt, ut).numpy()
    neg = model.match_probability(zt, torch.roll(ut, int(shift), 0)).numpy()
    metrics["matching_auc"] = roc_auc(pos, neg)
    metrics["matching_accuracy"] = float(((pos >= 0.5).sum() + (neg < 0.5).sum()) / (len(pos) + len(neg)))

    labelled = categories != ""
    train_lab = np.nonzero(labelled & ~heldout)[0]
    test_lab = np.nonzero(labelled & heldout)[0]
    if len(train_lab) >= 1 and len(test_lab) >= 1:
        _, nn_idx = topk(v[test_lab], v[train_lab], k=10)
        votes = categories[train_lab][nn_idx]
        predicted = np.array([_majority(row) for row in votes])
        metrics["category_accuracy"] = float((predicted == categories[test_lab]).mean())
        _, rec_idx = topk(v, v, k=10, exclude_self=True)
        rec_idx = rec_idx[test_lab]
        metrics["recommendation_precision_at_10"] = float((categories[rec_idx] == categories[test_lab][:, None]).mean())
    return metrics


def _majority(labels: np.ndarray) -> str:
    values, counts = np.unique(labels, return_counts=True)
    # First-seen (nearest) label wins ties.
    best = counts.max()
    for label in labels:
        if counts[values == label][0] == best:
            return str(label)
    return str(labels[0])
