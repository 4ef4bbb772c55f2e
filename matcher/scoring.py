"""Exact top-K by inner product, in blocks so memory is bounded by block_size * N rather than N^2."""
from __future__ import annotations

import numpy as np
import torch


def topk(queries: np.ndarray, items: np.ndarray, k: int, block_size: int | None = None,
         exclude_self: bool = False, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (Q, min(k, candidates)), best first; ties broken by lower item index.

    With exclude_self, query i is item i and never its own neighbour (queries and items must then be the same set)."""
    q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=device)
    x = torch.as_tensor(np.ascontiguousarray(items, dtype=np.float32), device=device)
    n_q, n_items = q.shape[0], x.shape[0]
    if exclude_self and n_q != n_items:
        raise ValueError("exclude_self needs queries and items to be the same set")
    k_eff = max(0, min(k, n_items - (1 if exclude_self else 0)))
    scores = np.zeros((n_q, k_eff), dtype=np.float32)
    indices = np.zeros((n_q, k_eff), dtype=np.int64)
    if k_eff == 0 or n_q == 0:
        return scores, indices
    block = block_size or max(1, min(n_q, (64 * 1024 * 1024) // max(1, 4 * n_items)))
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        sims = q[start:stop] @ x.T
        if exclude_self:
            rows = torch.arange(stop - start, device=sims.device)
            sims[rows, rows + start] = -torch.inf
        # Take a few extra candidates so ties at the boundary can be resolved by index.
        take = min(n_items, k_eff + 8)
        vals, idx = torch.topk(sims, take, dim=1, largest=True, sorted=True)
        vals_np, idx_np = vals.cpu().numpy(), idx.cpu().numpy()
        kth = vals_np[:, k_eff - 1:k_eff]
        # Rows where a tie at the k-th value might extend past the extra candidates need a full stable sort.
        boundary = (vals_np[:, -1:] == kth).ravel() & (take < n_items)
        order = np.lexsort((idx_np, -vals_np), axis=1)[:, :k_eff]
        block_scores = np.take_along_axis(vals_np, order, 1)
        block_idx = np.take_along_axis(idx_np, order, 1)
        for r in np.nonzero(boundary)[0]:
            row = sims[r].cpu().numpy()
            full = np.lexsort((np.arange(n_items), -row))[:k_eff]
            block_scores[r], block_idx[r] = row[full], full
        scores[start:stop], indices[start:stop] = block_scores, block_idx
    return scores, indices


def assign_categories(vectors: np.ndarray, categories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest category centroid (of the labelled products' normalised vectors) for every product.

    Returns (predicted category, cosine score); all "" when no product has a category."""
    labelled = categories != ""
    names = np.unique(categories[labelled])
    if len(names) == 0:
        return np.full(len(vectors), "", dtype=object), np.zeros(len(vectors), dtype=np.float32)
    centroids = np.stack([vectors[categories == name].mean(0) for name in names])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)
    scores, idx = topk(vectors, centroids, k=1)
    return names[idx[:, 0]].astype(object), scores[:, 0]
