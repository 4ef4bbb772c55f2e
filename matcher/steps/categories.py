"""The categories table: which labelled categories it may predict, their centroids, and each product's nearest."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from matcher.steps.scoring import topk

# A category far smaller than the one a typical product sits in is more likely a mislabeled row or a one-off label
# than a class: as its own sharp centroid it would take its look-alikes' predictions. The fraction and the cap were
# chosen by leave-one-out accuracy over catalogs of 150 to 9,583 products, with and without injected label noise
# (docs/benchmarks.md, "Categories").
_TYPICAL_FRACTION = 1 / 16
_MAX_MINIMUM = 3


def min_category_products(sizes: dict[str, int]) -> int:
    """The fewest labelled products a category needs to be predicted: 1/16 of the size of the category the median
    labelled product belongs to, rounded, between 1 and 3."""
    return min_category_products_by_size(dict(Counter(n for n in sizes.values() if n > 0)))


def min_category_products_by_size(categories_of_size: dict[int, int]) -> int:
    """min_category_products from how many categories there are of each size (a histogram with at most about
    sqrt(2 x products) entries, where the sizes themselves are as many as the categories)."""
    sizes = np.array([s for s, c in categories_of_size.items() if s > 0 and c > 0], np.int64)
    if not len(sizes):
        return 1
    products = sizes * np.array([categories_of_size[s] for s in sizes], np.int64)
    typical = _weighted_median(sizes, products)
    return int(min(_MAX_MINIMUM, max(1, round(typical * _TYPICAL_FRACTION))))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """np.median(np.repeat(values, weights)) without the repeat (one entry per product)."""
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order], np.cumsum(weights[order])
    total = int(cumulative[-1])
    low = values[np.searchsorted(cumulative, (total - 1) // 2, side="right")]  # the 0-based middle entries
    high = values[np.searchsorted(cumulative, total // 2, side="right")]
    return (float(low) + float(high)) / 2


def category_sums(categories: list[str | None], vectors: np.ndarray,
                  into: dict[str, tuple[np.ndarray, int]] | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """Per labelled category: the float64 sum of its products' vectors and their count, added into `into` (a
    partition's running sums); unlabelled products ("" or None) count for none."""
    acc = {} if into is None else into
    cats = np.asarray(categories, dtype=object)
    for name in set(categories) - {"", None}:
        rows = vectors[cats == name]
        total, n = acc.get(name, (np.zeros(vectors.shape[1], np.float64), 0))
        acc[name] = (total + rows.sum(0, dtype=np.float64), n + len(rows))
    return acc


def category_centroids(sums: dict[str, tuple[np.ndarray, int]], min_products: int, dim: int
                       ) -> tuple[list[str], np.ndarray]:
    """The categories the table may predict (at least `min_products` products; 0: min_category_products of the
    catalog) and their centroids: the normalised mean vector of each."""
    minimum = min_products or min_category_products({c: n for c, (_, n) in sums.items()})
    names = sorted(c for c, (_, n) in sums.items() if n >= minimum)
    if not names:
        return [], np.zeros((0, dim), np.float32)
    centroids = np.stack([sums[c][0] / sums[c][1] for c in names]).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)
    return names, centroids


def predict_categories(product_ids: pa.Array, categories: list[str | None], vectors: np.ndarray, names: list[str],
                       centroids: np.ndarray, version: str) -> tuple[pa.Table, dict[str, int]]:
    """The categories table's rows for a batch (each product's nearest centroid, cosine score, whether it agrees
    with its own label), and how many labelled products agree."""
    cats = [c or "" for c in categories]
    if names:
        scores, idx = topk(vectors, centroids, k=1)
        predicted, score = [names[i] for i in idx[:, 0]], np.clip(scores[:, 0], -1.0, 1.0)
    else:  # no category qualifies (a catalog without labels): no prediction, not a prediction of ""
        predicted, score = [None] * len(cats), [None] * len(cats)
    agrees = [bool(c == p) if c and p is not None else None for c, p in zip(cats, predicted)]
    table = pa.table({"product_id": product_ids, "category": cats,
                      "predicted_category": pa.array(predicted, pa.string()),
                      "score": pa.array(score, pa.float32()), "agrees": pa.array(agrees, pa.bool_()),
                      "model_version": [version] * len(cats)})
    labelled = [a for a in agrees if a is not None]
    return table, {"labelled": len(labelled), "agree": sum(labelled)}
