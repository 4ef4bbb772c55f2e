"""Exact top-K by inner product, in blocks so memory is bounded by block_size^2 (plus N*K for the answer)
rather than N^2."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

_NO_INDEX = np.iinfo(np.int64).max


def topk(queries: np.ndarray, items: np.ndarray, k: int, block_size: int | None = None,
         exclude_self: bool = False, device: str | torch.device = "cpu",
         exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (Q, min(k, candidates)), best first; ties broken by lower item index.

    With exclude_self, query i is item i and never its own neighbour (queries and items must then be the same set);
    `exclude` names, per query, one item index never to return (e.g. the query's own row in a larger item set).
    Queries and items are both taken in blocks of block_size (default 2048)."""
    same = items is queries  # topk(v, v, ...): check, convert and copy to the device once
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    items = queries if same else np.ascontiguousarray(items, dtype=np.float32)
    for name, array in (("queries", queries),) + ((() if same else (("items", items),))):
        bad = ~np.isfinite(array).all(axis=1) if array.ndim == 2 and array.size else np.zeros(0, bool)
        if bad.any():  # a NaN would sort above every real score and surface as a "best" neighbour
            raise ValueError(f"{name} hold NaN or infinite values in {int(bad.sum())} rows, e.g. row "
                             f"{int(np.argmax(bad))}")
    q = torch.as_tensor(queries, device=device)
    x = q if same else torch.as_tensor(items, device=device)
    n_q, n_items = q.shape[0], x.shape[0]
    block = max(1, block_size or 2048)
    if exclude_self:
        if n_q != n_items:
            raise ValueError("exclude_self needs queries and items to be the same set")
        exclude = np.arange(n_q)
    if exclude is not None and len(exclude) != n_q:
        raise ValueError("exclude needs one item index per query")
    if exclude_self and n_q > 1 and min(k, n_q - 1) > 0:
        return _topk_all_pairs(x, k, block)
    k_eff = max(0, min(k, n_items - (1 if exclude is not None else 0)))
    scores = np.zeros((n_q, k_eff), dtype=np.float32)
    indices = np.zeros((n_q, k_eff), dtype=np.int64)
    if k_eff == 0 or n_q == 0:
        return scores, indices
    for q_start in range(0, n_q, block):
        q_stop = min(n_q, q_start + block)
        best = _RunningTopK(q_stop - q_start, k_eff, flush_at=block * k_eff)
        for x_start in range(0, n_items, block):
            x_stop = min(n_items, x_start + block)
            sims = _similarities(q[q_start:q_stop], x[x_start:x_stop])
            if exclude is not None:
                own = np.asarray(exclude[q_start:q_stop]) - x_start
                rows = np.nonzero((own >= 0) & (own < x_stop - x_start))[0]
                cols = own[rows]
                sims[torch.as_tensor(rows, device=sims.device), torch.as_tensor(cols, device=sims.device)] = -torch.inf
            best.add_block(sims, x_start)
        scores[q_start:q_stop], indices[q_start:q_stop] = best.result()
    return scores, indices


def topk_over_blocks(queries: np.ndarray, query_idx: np.ndarray,
                     item_blocks: Iterable[tuple[int, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-k items by dot product, as (scores, global item indices), best first, ties by the lower index;
    a query is never its own neighbour (item index == its entry in `query_idx`).

    The items arrive as (first index, rows) blocks of consecutive indices, in increasing order, one at a time: a
    caller can stream them from storage, holding one block and the queries' running top-k. `k` must not exceed
    the number of items other than the queries themselves (topk's min(k, N - 1))."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    query_idx = np.asarray(query_idx, dtype=np.int64)
    best = _RunningTopK(len(queries), k, flush_at=max(1, len(queries)) * max(1, k))
    if k <= 0:
        return best.result()
    q = torch.from_numpy(queries)
    last = None
    for first, items in item_blocks:
        if last is not None and first < last:
            raise ValueError(f"item blocks out of order: a block starting at {first} after one ending at {last}")
        items = np.ascontiguousarray(items, dtype=np.float32)
        last = first + len(items)
        sims = _similarities(q, torch.from_numpy(items))
        own = query_idx - first
        rows = np.nonzero((own >= 0) & (own < len(items)))[0]
        if len(rows):
            sims[torch.from_numpy(rows), torch.from_numpy(own[rows])] = -torch.inf
        best.add_block(sims, first)
    values, indices = best.result()
    if (indices == _NO_INDEX).any():
        raise ValueError(f"fewer than k={k} items besides the queries themselves")
    return values, indices


def _similarities(queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """queries @ items.T. On the CPU through numpy's BLAS (OpenBLAS): on this project's AMD EPYC machine it ran
    the 2048-row blocks 20-25% faster than torch's MKL and bench/allpairs.py at N=100,000 took 38 s instead of
    43 s; the result shares memory with a torch tensor either way."""
    if queries.device.type == "cpu":
        return torch.from_numpy(np.matmul(queries.numpy(), items.numpy().T))
    return queries @ items.T


class _RunningTopK:
    """The best k (score, index) of each row of a block of queries so far, ties by lower index.

    Item blocks must arrive in increasing index order: then an entry that only equals a row's current k-th score
    can never displace it, so once every row holds k entries only scores strictly above the k-th are kept. Those
    are few after the first blocks; they are buffered and merged in batches (the k-th scores used as the filter
    may lag behind by one batch, which only lets a few more through)."""

    def __init__(self, n_rows: int, k: int, flush_at: int):
        self.k = k
        self.values = np.full((n_rows, k), -np.inf, dtype=np.float32)
        self.indices = np.full((n_rows, k), _NO_INDEX, dtype=np.int64)
        self._flush_at = flush_at
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_count = 0
        self.full = False

    def add_block(self, sims: torch.Tensor, offset: int, rows_are_columns: bool = False) -> None:
        """Fold in one block of similarities whose items start at index `offset`; with rows_are_columns this
        block's rows are the columns of `sims` (the mirror half of a symmetric block pair)."""
        if not self.full:
            self.flush()
            # Callers orient blocks so this is rare by columns (a strided top-k is slow).
            values, indices = _block_candidates(sims.T if rows_are_columns else sims, offset, self.k)
            self.values, self.indices = _merge(self.values, self.indices, values, indices, self.k)
            self.full = not np.isneginf(self.values[:, -1]).any()
            return
        rows, cols, values = _entries_above(sims, self.values[:, -1], along_columns=rows_are_columns)
        if rows_are_columns:
            rows, cols = cols, rows
        if len(rows):
            self._pending.append((rows, values, cols + offset))
            self._pending_count += len(rows)
            if self._pending_count >= self._flush_at:
                self.flush()

    def flush(self) -> None:
        if self._pending:
            rows, values, indices = (np.concatenate(part) for part in zip(*self._pending))
            self._pending, self._pending_count = [], 0
            self.values, self.indices = _merge_sparse(self.values, self.indices, rows, values, indices, self.k)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        return self.values, self.indices


def _entries_above(sims: torch.Tensor, thresholds: np.ndarray,
                   along_columns: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, score) of every entry of `sims` strictly above its row's threshold (its column's, with
    along_columns), in row-major order. On the CPU numpy's flat nonzero is several times faster than torch's
    two-dimensional one; on a GPU the filtering stays on the device and only the hits are copied back."""
    if sims.device.type == "cpu":
        return _entries_above_numpy(sims.numpy(), thresholds, along_columns)
    return _entries_above_torch(sims, thresholds, along_columns)


def _entries_above_numpy(sims: np.ndarray, thresholds: np.ndarray,
                         along_columns: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    limits = thresholds[None, :] if along_columns else thresholds[:, None]
    flat = np.flatnonzero(sims > limits)
    rows, cols = np.divmod(flat, sims.shape[1])
    return rows, cols, sims.reshape(-1)[flat]


def _entries_above_torch(sims: torch.Tensor, thresholds: np.ndarray,
                         along_columns: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    limits = torch.as_tensor(thresholds, device=sims.device)
    limits = limits[None, :] if along_columns else limits[:, None]
    flat = (sims > limits).reshape(-1).nonzero().squeeze(1)
    values = sims.reshape(-1)[flat].cpu().numpy()
    rows, cols = np.divmod(flat.cpu().numpy(), sims.shape[1])
    return rows, cols, values


def _block_candidates(sims: torch.Tensor, offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's exact top-k of one block by (-score, index), indices shifted by `offset`."""
    width = sims.shape[1]
    take = min(width, k + 8)  # a few extra so that most ties at the k-th score are settled by index here
    if sims.device.type == "cpu":
        # numpy rather than torch.topk: in a loop of numpy BLAS calls, torch's threads would fight BLAS's.
        vals_np, idx_np = _top_of_rows_numpy(sims.numpy(), take)
    else:
        vals_np, idx_np = _top_of_rows_torch(sims, take)
    if take < width:
        kth = vals_np[:, min(k, take) - 1]
        for r in np.nonzero(vals_np[:, -1] == kth)[0]:  # a tie may run past the extra candidates
            row = sims[r].cpu().numpy()
            full = np.lexsort((np.arange(width), -row))[:take]
            vals_np[r], idx_np[r] = row[full], full
    return vals_np, idx_np + offset


def _top_of_rows_numpy(sims: np.ndarray, take: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `take` largest scores, best first (ties in index order), with their column indices."""
    width = sims.shape[1]
    idx = np.argpartition(sims, width - take, axis=1)[:, width - take:]
    vals = np.take_along_axis(sims, idx, 1)
    order = np.lexsort((idx, -vals), axis=1)
    return np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1).astype(np.int64)


def _top_of_rows_torch(sims: torch.Tensor, take: int) -> tuple[np.ndarray, np.ndarray]:
    vals, idx = torch.topk(sims, take, dim=1, largest=True, sorted=True)
    return vals.cpu().numpy(), idx.cpu().numpy()


def _merge(best_v: np.ndarray, best_i: np.ndarray, cand_v: np.ndarray, cand_i: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.concatenate([best_v, cand_v], 1)
    i = np.concatenate([best_i, cand_i], 1)
    order = np.lexsort((i, -v), axis=1)[:, :k]
    return np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)


def _merge_sparse(best_v: np.ndarray, best_i: np.ndarray, rows: np.ndarray, vals: np.ndarray, idx: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge (row, score, index) candidates into each row's current top-k, by (-score, index).

    The candidates must come after the entries they join in index order, and in increasing index order within a
    row (true when item blocks arrive in order): then a stable sort by (row, -score) settles ties by index."""
    n = len(best_v)
    all_rows = np.concatenate([np.repeat(np.arange(n), k), rows])
    all_v = np.concatenate([best_v.ravel(), vals])
    all_i = np.concatenate([best_i.ravel(), idx])
    order = np.argsort(_row_then_descending_score(all_rows, all_v), kind="stable")
    counts = k + np.bincount(rows, minlength=n)
    pick = order[((np.cumsum(counts) - counts)[:, None] + np.arange(k)).ravel()]
    return all_v[pick].reshape(n, k), all_i[pick].reshape(n, k)


def _row_then_descending_score(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One int64 sort key per entry ordering by row, then by score from high to low (float32 bits made
    monotone; + 0.0 turns -0.0 into 0.0 so the two tie as they compare)."""
    bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    monotone = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return rows.astype(np.int64) * (1 << 33) - monotone


def _topk_all_pairs(x: torch.Tensor, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every row of x against all other rows. The similarity matrix is symmetric, so each block pair
    (i, j >= i) is computed once and serves the rows of both blocks: half the multiply-adds of the general path.
    Every row block still sees item blocks in increasing order (first as the columns of earlier pairs, then as
    the rows of its own). Memory: O(N*k + block^2)."""
    n = x.shape[0]
    k_eff = min(k, n - 1)
    starts = list(range(0, n, block))
    best = [_RunningTopK(min(n, start + block) - start, k_eff, flush_at=block * k_eff) for start in starts]
    for a in range(len(starts)):
        for b in range(a, len(starts)):
            # Block b's first pair puts b on the rows of the product, as its first fill is a top-k of rows.
            on_rows, on_cols = (b, a) if a != b and not best[b].full else (a, b)
            r0, c0 = starts[on_rows], starts[on_cols]
            sims = _similarities(x[r0:r0 + block], x[c0:c0 + block])
            if a == b:
                sims.fill_diagonal_(-torch.inf)
            best[on_rows].add_block(sims, c0)
            if a != b:
                best[on_cols].add_block(sims, r0, rows_are_columns=True)
    values, indices = zip(*(running.result() for running in best))
    return np.concatenate(values), np.concatenate(indices)


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


def cross_match_scorer(pair: Callable[[np.ndarray, np.ndarray], np.ndarray]
                       ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(p, q) -> the mean of pair(q, p) and pair(p, q), `pair` being the matching network's probability for
    (photo, text): does q's photo go with p's text, and p's photo with q's text? That is symmetric in p and q, so
    a pair found in both products' candidate lists is scored once."""
    def cross_match(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        p, q = np.asarray(p, dtype=np.int64), np.asarray(q, dtype=np.int64)
        if len(p) == 0:
            return np.zeros(0, dtype=np.float32)
        n = int(max(p.max(), q.max())) + 1
        keys, where = np.unique(np.minimum(p, q) * n + np.maximum(p, q), return_inverse=True)
        a, b = np.divmod(keys, n)
        return ((pair(b, a) + pair(a, b)) / 2)[where]

    return cross_match


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
