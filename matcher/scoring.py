"""Exact top-K by inner product, in blocks so memory is bounded by block_size * N rather than N^2."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def topk(queries: np.ndarray, items: np.ndarray, k: int, block_size: int | None = None,
         exclude_self: bool = False, device: str | torch.device = "cpu",
         exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (Q, min(k, candidates)), best first; ties broken by lower item index.

    With exclude_self, query i is item i and never its own neighbour (queries and items must then be the same set);
    `exclude` names, per query, one item index never to return (e.g. the query's own row in a larger item set)."""
    q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=device)
    x = torch.as_tensor(np.ascontiguousarray(items, dtype=np.float32), device=device)
    n_q, n_items = q.shape[0], x.shape[0]
    if exclude_self:
        if n_q != n_items:
            raise ValueError("exclude_self needs queries and items to be the same set")
        exclude = np.arange(n_q)
    if exclude is not None and len(exclude) != n_q:
        raise ValueError("exclude needs one item index per query")
    if exclude_self and n_q > 1 and min(k, n_q - 1) > 0:
        return _topk_all_pairs(x, k, block_size or 2048)
    k_eff = max(0, min(k, n_items - (1 if exclude is not None else 0)))
    scores = np.zeros((n_q, k_eff), dtype=np.float32)
    indices = np.zeros((n_q, k_eff), dtype=np.int64)
    if k_eff == 0 or n_q == 0:
        return scores, indices
    block = block_size or max(1, min(n_q, (64 * 1024 * 1024) // max(1, 4 * n_items)))
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        sims = q[start:stop] @ x.T
        if exclude is not None:
            rows = torch.arange(stop - start, device=sims.device)
            cols = torch.as_tensor(exclude[start:stop], device=sims.device)
            sims[rows, cols] = -torch.inf
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


def _block_candidates(sims: torch.Tensor, offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's exact top-k of one block by (-score, index), indices shifted by `offset`."""
    width = sims.shape[1]
    take = min(width, k + 8)
    vals, idx = torch.topk(sims, take, dim=1, largest=True, sorted=True)
    vals_np, idx_np = vals.cpu().numpy(), idx.cpu().numpy()
    if take < width:
        kth = vals_np[:, min(k, take) - 1]
        for r in np.nonzero(vals_np[:, -1] == kth)[0]:  # a tie may run past the extra candidates
            row = sims[r].cpu().numpy()
            full = np.lexsort((np.arange(width), -row))[:take]
            vals_np[r], idx_np[r] = row[full], full
    return vals_np, idx_np + offset


def _merge(best_v: np.ndarray, best_i: np.ndarray, cand_v: np.ndarray, cand_i: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.concatenate([best_v, cand_v], 1)
    i = np.concatenate([best_i, cand_i], 1)
    order = np.lexsort((i, -v), axis=1)[:, :k]
    return np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)


def _merge_sparse(best_v: np.ndarray, best_i: np.ndarray, rows: np.ndarray, vals: np.ndarray, idx: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge a few (row, score, index) candidates into each row's current top-k, by (-score, index); only the
    rows that have candidates are touched."""
    touched, local = np.unique(rows, return_inverse=True)
    m = len(touched)
    all_rows = np.concatenate([np.repeat(np.arange(m), k), local])
    all_v = np.concatenate([best_v[touched].ravel(), vals])
    all_i = np.concatenate([best_i[touched].ravel(), idx])
    order = np.lexsort((all_i, -all_v, all_rows))
    counts = k + np.bincount(local, minlength=m)
    take = (np.cumsum(counts) - counts)[:, None] + np.arange(k)
    best_v, best_i = best_v.copy(), best_i.copy()
    best_v[touched], best_i[touched] = all_v[order][take], all_i[order][take]
    return best_v, best_i


def _update_rows(best_v: np.ndarray, best_i: np.ndarray, sims: torch.Tensor, offset: int,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold one block of similarities into its rows' top-k. Once every row has k candidates, only entries at or
    above a row's current k-th score can enter, and after the first blocks those are few: filter, then merge."""
    if np.isneginf(best_v[:, -1]).any():
        v, i = _block_candidates(sims, offset, k)
        return _merge(best_v, best_i, v, i, k)
    thresholds = torch.as_tensor(best_v[:, -1], device=sims.device)
    rows, cols = (sims >= thresholds[:, None]).nonzero(as_tuple=True)
    if len(rows) == 0:
        return best_v, best_i
    vals = sims[rows, cols].cpu().numpy()
    return _merge_sparse(best_v, best_i, rows.cpu().numpy(), vals, cols.cpu().numpy() + offset, k)


def _topk_all_pairs(x: torch.Tensor, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every row of x against all other rows. The similarity matrix is symmetric, so each block pair
    (i, j >= i) is computed once and serves the rows of both blocks: half the multiply-adds of the general path.
    Memory: O(N*k + block^2)."""
    n = x.shape[0]
    k_eff = min(k, n - 1)
    best_v = np.full((n, k_eff), -np.inf, dtype=np.float32)
    best_i = np.full((n, k_eff), np.iinfo(np.int64).max, dtype=np.int64)
    for bi in range(0, n, block):
        ei = min(n, bi + block)
        for bj in range(bi, n, block):
            ej = min(n, bj + block)
            sims = x[bi:ei] @ x[bj:ej].T
            if bi == bj:
                sims.fill_diagonal_(-torch.inf)
            best_v[bi:ei], best_i[bi:ei] = _update_rows(best_v[bi:ei], best_i[bi:ei], sims, bj, k_eff)
            if bj != bi:
                best_v[bj:ej], best_i[bj:ej] = _update_rows(best_v[bj:ej], best_i[bj:ej], sims.T, bi, k_eff)
    return best_v, best_i


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


def rerank(similarity: np.ndarray, candidates: np.ndarray, cross_match: Callable[[np.ndarray, np.ndarray], np.ndarray],
           k: int, weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each row's candidates: score = (1 - weight) * similarity + weight * cross_match(rows, candidates).

    Returns (score, similarity, candidate index), each (N, min(k, M)), best score first, ties by lower index."""
    n, m = candidates.shape
    rows = np.repeat(np.arange(n), m)
    match = cross_match(rows, candidates.ravel()).reshape(n, m) if m else np.zeros((n, 0), np.float32)
    score = ((1.0 - weight) * similarity + weight * match).astype(np.float32)
    order = np.lexsort((candidates, -score), axis=1)[:, :min(k, m)]
    return (np.take_along_axis(score, order, 1), np.take_along_axis(similarity, order, 1),
            np.take_along_axis(candidates, order, 1))
