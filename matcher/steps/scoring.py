"""Exact top-K by inner product, in blocks so memory is bounded by threads * block_size^2 (plus N*K for the
answer) rather than N^2.

On the CPU the block products run in a pool of threads, each calling BLAS single-threaded, and each thread filters
its own block: the top-K selection then runs on every core beside the arithmetic instead of one core after it. The
filter is a threshold per row (its current K-th score): the block's column maxima over tiles of a few rows are
compared with it first, and only the tiles that can hold a hit are read again, so a block is scanned about once
beyond its product. Merges keep each row's k least (-score, index) sort keys, which makes the result independent
of the order blocks finish in."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

_NO_INDEX = np.iinfo(np.int64).max
_LOWEST = np.finfo(np.float32).min  # a threshold that lets every finite score through but never an excluded -inf
_TILE_ROWS = 8
_SIGN = np.uint32(0x80000000)
_NO_INDEX_32 = 0xFFFFFFFF  # a free slot's index inside a sort key; real item indices stay below it
_EMPTY_KEY = np.uint64(0xFF800000_FFFFFFFF)  # (-inf, free): after every real entry
_PAD_KEY = np.uint64(np.iinfo(np.uint64).max)
_UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


def topk(queries: np.ndarray, items: np.ndarray, k: int, block_size: int | None = None,
         exclude_self: bool = False, device: str | torch.device = "cpu",
         exclude: np.ndarray | None = None, threads: int | None = None,
         precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (Q, min(k, candidates)), best first; ties broken by lower item index.

    With exclude_self, query i is item i and never its own neighbour (queries and items must then be the same set);
    `exclude` names, per query, one item index never to return (e.g. the query's own row in a larger item set).
    Queries and items are both taken in blocks of block_size (default: `default_block_size`), the CPU's blocks
    spread over `threads` threads (default: torch's thread count). precision "fp16" or "bf16" multiplies the
    blocks in that precision (with float32 accumulation: a GPU's tensor cores) and rescores in float32 every entry
    that the rounding error bound cannot rule out, so the answer is still the float32 one."""
    same = items is queries  # topk(v, v, ...): check, convert and copy to the device once
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    items = queries if same else np.ascontiguousarray(items, dtype=np.float32)
    for name, array in (("queries", queries),) + ((() if same else (("items", items),))):
        bad = ~np.isfinite(array).all(axis=1) if array.ndim == 2 and array.size else np.zeros(0, bool)
        if bad.any():  # a NaN would sort above every real score and surface as a "best" neighbour
            raise ValueError(f"{name} hold NaN or infinite values in {int(bad.sum())} rows, e.g. row "
                             f"{int(np.argmax(bad))}")
    n_q, n_items = queries.shape[0], items.shape[0]
    engine = _BlockEngine(device, block_size, threads, precision)
    if exclude_self:
        if n_q != n_items:
            raise ValueError("exclude_self needs queries and items to be the same set")
        exclude = np.arange(n_q)
    if exclude is not None and len(exclude) != n_q:
        raise ValueError("exclude needs one item index per query")
    k_eff = max(0, min(k, n_items - (1 if exclude is not None else 0)))
    if k_eff == 0 or n_q == 0:
        return np.zeros((n_q, k_eff), dtype=np.float32), np.zeros((n_q, k_eff), dtype=np.int64)
    if exclude_self:
        return engine.all_pairs(queries, k_eff)
    return engine.queries_against(queries, [(0, items)], k_eff, exclude)


def topk_over_blocks(queries: np.ndarray, query_idx: np.ndarray,
                     item_blocks: Iterable[tuple[int, np.ndarray]], k: int, threads: int | None = None,
                     device: str | torch.device = "cpu", precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-k items by dot product, as (scores, global item indices), best first, ties by the lower index;
    a query is never its own neighbour (item index == its entry in `query_idx`).

    The items arrive as (first index, rows) blocks, one at a time: a caller can stream them from storage, holding
    one block and the queries' running top-k. `k` must not exceed the number of items other than the queries
    themselves (topk's min(k, N - 1))."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    query_idx = np.asarray(query_idx, dtype=np.int64)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    engine = _BlockEngine(device, None, threads, precision)
    values, indices = engine.queries_against(queries, item_blocks, k, exclude=query_idx)
    if (indices == _NO_INDEX).any():
        raise ValueError(f"fewer than k={k} items besides the queries themselves")
    return values, indices


def topk_for_row_groups(queries: np.ndarray, query_idx: np.ndarray,
                        groups: Iterable[tuple[np.ndarray, int, np.ndarray]], k: int,
                        threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-k (scores, item indices) over the items it is shown, never itself (item index ==
    its query_idx). `groups` yields (query rows, first index, items): those rows of `queries` against items
    numbered first, first + 1, ...; a query may appear in many groups, an (query, item) pair in at most one.
    Rows shown fewer than k items keep -inf / the largest int64 in the slots left over."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    query_idx = np.asarray(query_idx, dtype=np.int64)
    best = _RunningTopK(len(queries), k, flush_at=max(1, len(queries)) * max(1, k), eager=False)
    engine = _BlockEngine("cpu", None, threads)

    def group(rows: np.ndarray, first: int, items: np.ndarray) -> None:
        sims = np.matmul(queries[rows], np.ascontiguousarray(items, dtype=np.float32).T)
        _exclude_own(sims, None, query_idx[rows] - first)
        best.add_rows(sims, np.asarray(rows), first)

    with engine._workers():
        batch: list[tuple] = []
        for job in groups:
            batch.append(job)
            if len(batch) >= 4 * engine.threads:
                engine._run(batch, group)
                batch = []
        engine._run(batch, group)
    return best.result()


def default_block_size(device: str | torch.device = "cpu", threads: int | None = None) -> int:
    """Rows per block. On the CPU the largest power of two (256..2048) whose square blocks of float32 scores, one
    per thread, fill at most a quarter of the last-level cache, so a block's second read by the filter is a cache
    hit and the threads do not evict each other's blocks; on a GPU 8192."""
    if torch.device(device).type != "cpu":
        return 8192
    budget = _cache_bytes("index3", 8 * 2**20) // 4 // max(1, threads or torch.get_num_threads())
    block = 256
    while (2 * block) ** 2 * 4 <= budget and block < 2048:
        block *= 2
    return block


@lru_cache(maxsize=None)  # read once per process: topk builds an engine per call, Spark tasks call it per batch
def _cache_bytes(level: str, fallback: int) -> int:
    """The size of cpu0's cache `level` (index2: L2, index3: L3) as Linux reports it."""
    try:
        text = Path(f"/sys/devices/system/cpu/cpu0/cache/{level}/size").read_text().strip()
        units = {"K": 2**10, "M": 2**20}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return fallback


class _BlockEngine:
    """Runs block products and their top-k filtering, on the CPU in a pool of threads (BLAS single-threaded in
    each), on a GPU in order on the device."""

    def __init__(self, device: str | torch.device, block_size: int | None, threads: int | None,
                 precision: str = "fp32"):
        if precision not in _UNIT_ROUNDOFF:
            raise ValueError(f"precision must be one of {', '.join(_UNIT_ROUNDOFF)}, got {precision!r}")
        self.device = torch.device(device)
        self.low = None if precision == "fp32" else getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])
        self.unit_roundoff = _UNIT_ROUNDOFF[precision]
        self.on_cpu = self.device.type == "cpu" and self.low is None  # numpy's BLAS; else torch on the device
        self.threads = max(1, threads or torch.get_num_threads()) if self.on_cpu else 1
        self.block = max(1, block_size or default_block_size(self.device, self.threads))
        self._pool: ThreadPoolExecutor | None = None

    def all_pairs(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of every row of x against all other rows. The similarity matrix is symmetric, so each block pair
        (a, b >= a) is computed once and serves the rows of both: half the multiply-adds. The diagonal pairs go
        first, so every block holds k entries (a threshold) before the others arrive."""
        n, block = len(x), self.block
        starts = list(range(0, n, block))
        best = [_RunningTopK(min(n, s + block) - s, k, flush_at=block * k) for s in starts]
        xs = self._on_device(x)

        def pair(a: int, b: int) -> None:
            r0, c0 = starts[a], starts[b]
            sims, bounds = self._product(xs[r0:r0 + block], xs[c0:c0 + block])
            if a == b:
                for scores in _with_bounds(sims, bounds):
                    _fill_diagonal(scores)
                best[a].add(sims, c0, bounds=bounds)
            else:
                best[a].add(sims, c0, best[b], r0, bounds=bounds)

        pairs = [(a, b) for a in range(len(starts)) for b in range(a + 1, len(starts))]
        with self._workers():
            self._run([(a, a) for a in range(len(starts))], pair)
            self._run(pairs, pair)
        values, indices = zip(*(running.result() for running in best))
        return np.concatenate(values), np.concatenate(indices)

    def queries_against(self, queries: np.ndarray, item_blocks: Iterable[tuple[int, np.ndarray]], k: int,
                        exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query over items arriving as (first index, rows) blocks; `exclude` (an item index per
        query) is never returned."""
        block = self.block
        q_starts = list(range(0, len(queries), block))
        best = [_RunningTopK(min(len(queries), s + block) - s, k, flush_at=block * k) for s in q_starts]
        qs = self._on_device(queries)

        def tile(a: int, first: int, c0: int, items: torch.Tensor | np.ndarray) -> None:
            r0 = q_starts[a]
            sims, bounds = self._product(qs[r0:r0 + block], items[c0:c0 + block])
            if exclude is not None:
                _exclude_own(sims, bounds, np.asarray(exclude[r0:r0 + block], dtype=np.int64) - (first + c0))
            best[a].add(sims, first + c0, bounds=bounds)

        with self._workers():
            for first, items in item_blocks:
                on_device = self._on_device(np.ascontiguousarray(items, dtype=np.float32))
                self._run([(a, first, c0, on_device) for a in range(len(q_starts))
                           for c0 in range(0, len(on_device), block)], tile)
        if not best:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        values, indices = zip(*(running.result() for running in best))
        return np.concatenate(values), np.concatenate(indices)

    def _on_device(self, array: np.ndarray):
        if self.on_cpu:
            return array
        exact = torch.as_tensor(array, device=self.device)
        if self.low is None:
            return exact
        norms = exact.norm(dim=1)
        if self.low == torch.float16 and len(norms) and float(norms.max()) ** 2 > 6e4:
            raise ValueError("fp16 products of these vectors would overflow (norms up to "
                             f"{float(norms.max()):.0f}); use bf16 or fp32")
        return _LowPrecisionRows(exact, exact.to(self.low), norms)

    def _product(self, a, b) -> tuple[np.ndarray | torch.Tensor, _Bounds | None]:
        """The block's scores, and with reduced precision the bounds of the float32 ones and their rescoring."""
        if self.on_cpu:
            return np.matmul(a, b.T), None
        if self.low is None:
            return a @ b.T, None
        approx = (a.low @ b.low.T).float()
        # Rounding each input to `low` moves a dot product by at most 2u|a||b| (+u^2), rounding the result by
        # u|a||b| and float32 accumulation over d terms by about d 2^-24 |a||b|: twice that is the margin.
        eps = 2 * (3 * self.unit_roundoff + a.exact.shape[1] * 2.0 ** -24)
        margin = eps * a.norms[:, None] * b.norms[None, :]

        def rescore(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            r = torch.as_tensor(rows, device=self.device)
            c = torch.as_tensor(cols, device=self.device)
            return (a.exact[r] * b.exact[c]).sum(dim=1).cpu().numpy()

        return approx, _Bounds(approx - margin, approx + margin, rescore)

    @contextmanager
    def _workers(self) -> Iterator[None]:
        """For one top-k call: BLAS single-threaded (the workers are the threads) and the pool of workers."""
        with _blas_threads(1 if self.on_cpu else None):
            if self.threads == 1:
                yield
                return
            with ThreadPoolExecutor(self.threads) as pool:
                self._pool = pool
                try:
                    yield
                finally:
                    self._pool = None

    def _run(self, jobs: list[tuple], work: Callable[..., None]) -> None:
        """work(*job) for every job: in order on a GPU or with one thread, else in the pool."""
        if self._pool is None or len(jobs) <= 1:
            for job in jobs:
                work(*job)
            return
        for _ in self._pool.map(lambda job: work(*job), jobs):  # re-raises a worker's exception here
            pass


_BLAS = None  # threadpoolctl's view of the loaded BLAS libraries: looked up once: a lookup per block adds up


def _blas_threads(limit: int | None):
    global _BLAS
    if limit is None:
        return nullcontext()
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=limit, user_api="blas")


def _with_bounds(sims, bounds: "_Bounds | None") -> tuple:
    """The block's scores and, with reduced precision, their bounds: what an exclusion must reach."""
    return (sims,) if bounds is None else (sims, bounds.lower, bounds.upper)


def _exclude_own(sims, bounds: "_Bounds | None", own: np.ndarray) -> None:
    """-inf at (r, own[r]) for every row whose own item (its column in this block) falls inside the block."""
    rows = np.nonzero((own >= 0) & (own < sims.shape[1]))[0]
    if not len(rows):
        return
    if isinstance(sims, np.ndarray):
        sims[rows, own[rows]] = -np.inf
        return
    at = (torch.as_tensor(rows, device=sims.device), torch.as_tensor(own[rows], device=sims.device))
    for scores in _with_bounds(sims, bounds):
        scores[at] = -torch.inf


def _fill_diagonal(sims) -> None:
    if isinstance(sims, np.ndarray):
        np.fill_diagonal(sims, -np.inf)
    else:
        sims.fill_diagonal_(-torch.inf)


class _RunningTopK:
    """The best k (score, index) of each row of a block of queries so far, ties by lower index.

    Entries at or above a row's current k-th score are kept (an entry equal to it may still win on index), buffered
    and merged in batches, so blocks may arrive in any order and from any thread. Each row's best are held as
    (score, index) sort keys (`_descending_keys`), so a merge needs no tie rule of its own. The k-th scores used as
    the filter lag behind by one batch, which only lets a few more through."""

    def __init__(self, n_rows: int, k: int, flush_at: int, eager: bool = True):
        self.k = k
        self._eager = eager  # merge every push until all rows hold k (thresholds early; costly for many rows)
        self.keys = np.full((n_rows, k), _EMPTY_KEY, dtype=np.uint64)
        self.thresholds = np.full(n_rows, _LOWEST, dtype=np.float32)
        self.full = False
        self._flush_at = flush_at
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_count = 0
        self._lock = threading.Lock()

    def add(self, sims, offset: int, columns: "_RunningTopK | None" = None, column_offset: int = 0,
            bounds: "_Bounds | None" = None) -> None:
        """Fold in one block of similarities whose items start at index `offset`; with `columns`, the block's
        columns are that other block's rows (the mirror half of a symmetric pair), whose items start at
        `column_offset`. With `bounds` the scores are approximate: limits come from the lower bounds, entries are
        found by the upper ones and kept by their rescored float32 values."""
        lower, upper = (sims, sims) if bounds is None else (bounds.lower, bounds.upper)
        row_limits = self._limits(lower, along_columns=False)
        col_limits = columns._limits(lower, along_columns=True) if columns is not None else None
        row_hits, col_hits = _entries_at_least(upper, row_limits, col_limits)
        if bounds is not None:
            row_hits = _rescored(row_hits, bounds.rescore, row_limits[row_hits[0]])
            if col_hits is not None:
                col_hits = _rescored(col_hits, bounds.rescore, col_limits[col_hits[1]])
        rows, cols, values = row_hits
        self._push(rows, values, cols + offset)
        if columns is not None:
            rows, cols, values = col_hits
            columns._push(cols, values, rows + column_offset)

    def add_rows(self, sims: np.ndarray, rows: np.ndarray, offset: int) -> None:
        """Fold in a block whose rows are these rows (of this object's), items starting at index `offset`."""
        limits = self._limits(sims, along_columns=False, rows=rows)
        hit_rows, cols, values = _entries_above_numpy(sims, limits, along_columns=False)
        self._push(rows[hit_rows], values, cols + offset)

    def _limits(self, sims, along_columns: bool, rows: np.ndarray | None = None) -> np.ndarray:
        """The current thresholds (of `rows`, when the block holds only those); while some rows hold fewer than
        k entries, raised to a lower bound of each row's k-th score within this block (nothing below it can make
        that row's top k)."""
        limits = self.thresholds if rows is None else self.thresholds[rows]
        if not self.full:
            width = sims.shape[0 if along_columns else 1]
            if width >= self.k:
                kth = _kth_largest_bound(sims, self.k, axis=0 if along_columns else 1)
                limits = np.maximum(limits, kth)
        return limits

    def _push(self, rows: np.ndarray, values: np.ndarray, indices: np.ndarray) -> None:
        if not len(rows):
            return
        with self._lock:
            self._pending.append((rows, values, indices))
            self._pending_count += len(rows)
            if self._pending_count >= self._flush_at or (self._eager and not self.full):
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            rows, values, indices = (np.concatenate(part) for part in zip(*self._pending))
            self._pending, self._pending_count = [], 0
            self.keys = _merge_keys(self.keys, rows, _descending_keys(values, indices), self.k)
            kth, _ = _decode_keys(self.keys[:, -1])
            self.full = not np.isneginf(kth).any()
            self.thresholds = np.where(np.isneginf(kth), _LOWEST, kth)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self._flush()
        return _decode_keys(self.keys)


@dataclass(frozen=True)
class _LowPrecisionRows:
    """Rows on the device in float32, the same rounded to fp16 / bf16, and their norms; sliced together."""
    exact: torch.Tensor
    low: torch.Tensor
    norms: torch.Tensor

    def __getitem__(self, rows: slice) -> "_LowPrecisionRows":
        return _LowPrecisionRows(self.exact[rows], self.low[rows], self.norms[rows])

    def __len__(self) -> int:
        return len(self.exact)


@dataclass(frozen=True)
class _Bounds:
    """Reduced-precision scores' bounds of the float32 ones, and rescore(rows, cols) -> their float32 values."""
    lower: torch.Tensor
    upper: torch.Tensor
    rescore: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _rescored(hits: tuple[np.ndarray, np.ndarray, np.ndarray], rescore: Callable, limits: np.ndarray):
    rows, cols, _ = hits
    if not len(rows):
        return hits
    values = rescore(rows, cols).astype(np.float32)
    keep = values >= limits
    return rows[keep], cols[keep], values[keep]


def _kth_largest_bound(sims, k: int, axis: int) -> np.ndarray:
    """A lower bound of each row's (column's, axis 0) k-th largest score. On the CPU the k-th largest of the
    maxima of groups of up to 16 entries: k groups reach it, so at least k entries do, and it costs
    one pass over the block and a partition a sixteenth its size instead of a partition of the whole block. On a
    GPU the exact k-th, by torch.topk."""
    if isinstance(sims, np.ndarray):
        width = sims.shape[axis]
        group = next(g for g in (16, 8, 4, 2, 1) if width % g == 0 and width // g >= k)
        if group > 1:
            # Any split into groups gives the bound; groups of entries width // group apart (along a row) and of
            # neighbouring rows (along a column) are both a maximum over the middle axis, which numpy vectorises.
            shape = (sims.shape[0], group, width // group) if axis == 1 else (width // group, group, sims.shape[1])
            sims = sims.reshape(shape).max(axis=1)
        width = sims.shape[axis]
        kth = np.take(np.partition(sims, width - k, axis=axis), width - k, axis=axis)
    else:
        kth = torch.topk(sims, k, dim=axis).values.select(axis, k - 1).cpu().numpy()
    return np.where(np.isneginf(kth), _LOWEST, kth).astype(np.float32)


def _entries_at_least(sims, row_limits: np.ndarray, col_limits: np.ndarray | None):
    """((row, column, score) of the entries of `sims` >= their row's limit, the same for their column's limit
    or None)."""
    if not isinstance(sims, np.ndarray):
        return (_entries_above_torch(sims, row_limits, False),
                None if col_limits is None else _entries_above_torch(sims, col_limits, True))
    n_rows, n_cols = sims.shape
    if n_rows % _TILE_ROWS or n_rows < 4 * _TILE_ROWS:
        return (_entries_above_numpy(sims, row_limits, False),
                None if col_limits is None else _entries_above_numpy(sims, col_limits, True))
    # The best of each tile of _TILE_ROWS rows in every column: a tile-column can only hold a row hit if it
    # reaches the lowest row limit in the tile, and a column hit if it reaches the column's limit. One scan finds
    # the tile-columns that can hold either; their entries are then sorted into row and column hits.
    tiled = sims.reshape(n_rows // _TILE_ROWS, _TILE_ROWS, n_cols)
    tile_max = tiled.max(axis=1)
    tile_row_limits = row_limits.reshape(-1, _TILE_ROWS).min(axis=1)[:, None]
    tile_limits = tile_row_limits if col_limits is None else np.minimum(tile_row_limits, col_limits[None, :])
    tiles, cols = np.divmod(np.flatnonzero(tile_max >= tile_limits), n_cols)
    values = tiled[tiles, :, cols]  # (candidate tile-columns, _TILE_ROWS)

    def hits(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Positions first, then rows, columns and scores of the hits only: the candidates' values are read once.
        at = np.flatnonzero(keep)
        candidate, offset = np.divmod(at, _TILE_ROWS)
        return tiles[candidate] * _TILE_ROWS + offset, cols[candidate], values.reshape(-1)[at]

    row_hits = hits(values >= row_limits.reshape(-1, _TILE_ROWS)[tiles])
    if col_limits is None:
        return row_hits, None
    return row_hits, hits(values >= col_limits[cols][:, None])


def _entries_above_numpy(sims: np.ndarray, thresholds: np.ndarray,
                         along_columns: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, score) of every entry of `sims` at or above its row's threshold (its column's, with
    along_columns), in row-major order."""
    limits = thresholds[None, :] if along_columns else thresholds[:, None]
    flat = np.flatnonzero(sims >= limits)
    rows, cols = np.divmod(flat, sims.shape[1])
    return rows, cols, sims.reshape(-1)[flat]


def _entries_above_torch(sims: torch.Tensor, thresholds: np.ndarray,
                         along_columns: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As _entries_above_numpy; on a GPU the filtering stays on the device and only the hits are copied back."""
    limits = torch.as_tensor(thresholds, device=sims.device)
    limits = limits[None, :] if along_columns else limits[:, None]
    flat = (sims >= limits).reshape(-1).nonzero().squeeze(1)
    values = sims.reshape(-1)[flat].cpu().numpy()
    rows, cols = np.divmod(flat.cpu().numpy(), sims.shape[1])
    return rows, cols, values


def _descending_keys(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One uint64 per (score, real item index), ascending as the score descends, then as the index ascends: the
    float32 bits made monotone and inverted above, the index below (+ 0.0 turns -0.0 into 0.0 so the two tie as
    they compare)."""
    if len(indices) and int(indices.max()) >= _NO_INDEX_32:
        raise ValueError(f"item indices must stay below {_NO_INDEX_32:,}")
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    ascending = np.where(bits >= _SIGN, ~bits, bits | _SIGN)
    return ((~ascending).astype(np.uint64) << np.uint64(32)) | indices.astype(np.uint64)


def _decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of `_descending_keys` output; a free slot is (-inf, the largest int64)."""
    ascending = ~(keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ascending >= _SIGN, ascending & ~_SIGN, ~ascending)
    indices = (keys & np.uint64(_NO_INDEX_32)).astype(np.int64)
    return bits.view(np.float32), np.where(indices == _NO_INDEX_32, _NO_INDEX, indices)


def _merge_keys(best: np.ndarray, rows: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Each row's k smallest of its current keys (n, k, ascending) and the new (row, key) pairs, ascending.

    The new keys are laid out beside their row's current ones in an (n, k + most new in a row) table, padded with
    the largest key, and each row partitioned at k: linear in the table. A row with far more new keys than the
    rest would make the table mostly padding; then one sort by (row, key) instead."""
    n = len(best)
    if not len(rows):
        return best
    counts = np.bincount(rows, minlength=n)
    width = k + int(counts.max())
    if n * width > 4 * (n * k + len(rows)):
        all_rows = np.concatenate([np.repeat(np.arange(n), k), rows])
        all_keys = np.concatenate([best.ravel(), keys])
        order = np.lexsort((all_keys, all_rows))
        first = np.cumsum(k + counts) - (k + counts)
        return all_keys[order[(first[:, None] + np.arange(k)).ravel()]].reshape(n, k)
    by_row = np.argsort(rows.astype(np.uint16 if n <= 2**16 else np.int64), kind="stable")  # a radix sort
    sorted_rows = rows[by_row]
    slot = k + np.arange(len(rows)) - (np.cumsum(counts) - counts)[sorted_rows]
    table = np.full((n, width), _PAD_KEY, dtype=np.uint64)
    table[:, :k] = best
    table[sorted_rows, slot] = keys[by_row]
    return np.sort(np.partition(table, k - 1, axis=1)[:, :k], axis=1)


def rerank(similarity: np.ndarray, candidates: np.ndarray, cross_match: Callable[[np.ndarray, np.ndarray], np.ndarray],
           k: int, weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each row's candidates: score = (1 - weight) * similarity + weight * cross_match(rows, candidates).

    Returns (score, similarity, candidate index), each (N, min(k, M)), best score first, ties by lower index."""
    n, m = candidates.shape
    similarity = np.clip(similarity, -1.0, 1.0)  # a cosine in float32 may pass 1 by rounding (identical products)
    rows = np.repeat(np.arange(n), m)
    match = cross_match(rows, candidates.ravel()).reshape(n, m) if m else np.zeros((n, 0), np.float32)
    score = ((1.0 - weight) * similarity + weight * match).astype(np.float32)
    order = np.lexsort((candidates, -score), axis=1)[:, :min(k, m)]
    return (np.take_along_axis(score, order, 1), np.take_along_axis(similarity, order, 1),
            np.take_along_axis(candidates, order, 1))


def recommendation_table(query_ids: np.ndarray, candidates: np.ndarray, candidate_ids: np.ndarray,
                         similarity: np.ndarray, match: np.ndarray, k: int, weight: float, version: str) -> pa.Table:
    """The recommendations table's rows for a block of queries: each query's M candidates (row numbers, their
    product ids, cosine similarity and match probability, each (queries, M)) re-ranked by rerank, the best k kept."""
    score, sims, ranked = rerank(similarity, candidates, lambda _rows, _cands: match.ravel(), k, weight)
    at = (candidates[:, None, :] == ranked[:, :, None]).argmax(2)  # where each kept candidate sits in its row
    n_q, kept = ranked.shape
    return pa.table({
        "product_id": pa.array(np.repeat(query_ids, kept), pa.string()),
        "rank": pa.array(np.tile(np.arange(1, kept + 1, dtype=np.int32), n_q), pa.int32()),
        "rec_product_id": pa.array(np.take_along_axis(candidate_ids, at, 1).ravel(), pa.string()),
        "similarity": pa.array(sims.ravel(), pa.float32()),
        "score": pa.array(score.ravel(), pa.float32()),
        "model_version": pa.array([version] * (n_q * kept), pa.string()),
    })
