"""Approximate all-pairs candidates beyond the exact budget: the vectors are cut into k-means lists, and each list's
products are searched, exactly, against the products of its nearest lists only.

The catalog is numbered list by list (idx sorted by list), so a list is one range of idx and a search reads whole
ranges: the same streamed (first idx, rows) blocks as the exact path, fewer of them. Within the candidates every
dot product is exact and ties go to the lower idx; what is approximate is only which items are looked at. Recall
against the exact top-K is measured each night on sampled queries (jobs/score_ann.py), not assumed."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np

from matcher.config import ANN_MAX_TRAINING_SAMPLE, ANN_SAMPLE_PER_LIST, ANN_SEEDS_PER_LIST
from matcher.steps.scoring import topk, topk_for_row_groups


@dataclass(frozen=True)
class ListIndex:
    """centroids (lists, d); offsets (lists + 1): list c holds idx offsets[c] .. offsets[c + 1] - 1; probes
    (lists, P): the lists each list searches, itself first, nearest centroids next, -1 as padding."""
    centroids: np.ndarray
    offsets: np.ndarray
    probes: np.ndarray
    query_probes: int = 0

    def list_of(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, idx, side="right") - 1


# Sizing the config check also uses (matcher.config: the driver's budget): products per list in the training sample,
# the sample's most (on Spark it is cached on executors, never on the driver), k-means++ candidate rows per list.
SAMPLE_PER_LIST = ANN_SAMPLE_PER_LIST
MAX_TRAINING_SAMPLE = ANN_MAX_TRAINING_SAMPLE
SEEDS_PER_LIST = ANN_SEEDS_PER_LIST
TRAIN_ITERATIONS = 10


def list_count(n_items: int, lists: int = 0) -> int:
    """`lists` when set, else about 4 sqrt(N) (FAISS's guide for inverted lists is 4 to 16 sqrt(N)), within 1 .. N,
    and at most as many as the capped training sample can give 64 products each (4,687: reached above 1.37M
    products, where the lists then grow longer instead of more numerous)."""
    default = min(int(round(4 * np.sqrt(n_items))), MAX_TRAINING_SAMPLE // SAMPLE_PER_LIST)
    return max(1, min(n_items, lists or default))


def training_sample_size(n_items: int, lists: int, requested: int = 0) -> int:
    """`requested` when set, else 64 products per list, at least 100,000 (all of a smaller catalog) and at most
    MAX_TRAINING_SAMPLE: with a handful per list, k-means misplaces whole clusters and recall falls
    (bench/allpairs.py --ann)."""
    return min(n_items, requested or min(MAX_TRAINING_SAMPLE, max(100_000, SAMPLE_PER_LIST * lists)))


def train_centroids(sample: np.ndarray, lists: int, iterations: int = TRAIN_ITERATIONS, seed: int = 0) -> np.ndarray:
    """Spherical k-means on a sample of the vectors (inner product, so the centroids are kept at unit length):
    `lists` centroids seeded from distinct sample rows. A list left empty keeps its previous centroid."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if len(sample) == 0:
        raise ValueError("no vectors to train the lists on")
    lists = min(lists, len(sample))
    rng = np.random.default_rng(seed)
    centroids = _seeds(sample, lists, rng)
    for _ in range(iterations):
        centroids = centroids_from_sums(*list_sums(sample, centroids), centroids)
    return centroids


def seed_centroids(rows: np.ndarray, lists: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeds for `lists` lists (at most one per row) from these rows, as train_centroids seeds its sample's:
    for k-means steps that run elsewhere (on Spark's executors) from a few rows per list."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if len(rows) == 0:
        raise ValueError("no vectors to seed the lists from")
    return _seeds(rows, min(lists, len(rows)), np.random.default_rng(seed))


def list_sums(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each list's sum of the vectors it is assigned (lists, d) float64, each list's count): one k-means step's
    statistics over these vectors, which add up across any split of the catalog."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    assigned = assign_lists(vectors, centroids)
    order = np.argsort(assigned, kind="stable")
    filled, starts = np.unique(assigned[order], return_index=True)
    sums = np.zeros(centroids.shape, np.float64)
    if len(filled):
        sums[filled] = np.add.reduceat(vectors[order], starts, axis=0, dtype=np.float64)
    return sums, np.bincount(assigned, minlength=len(centroids))


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Each list's new centroid, its members' mean direction; a list with no members keeps its previous one."""
    centroids = np.array(previous, dtype=np.float32, copy=True)
    filled = np.asarray(counts) > 0
    centroids[filled] = _unit(sums[filled])
    return centroids


def list_sums_over(chunks: Iterable[np.ndarray], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """list_sums added up over chunks of the vectors (a task's batches, or a catalog in slices)."""
    sums, counts = np.zeros(centroids.shape, np.float64), np.zeros(len(centroids), np.int64)
    for chunk in chunks:
        if len(chunk):
            part_sums, part_counts = list_sums(chunk, centroids)
            sums += part_sums
            counts += part_counts
    return sums, counts


def refine_centroids(vectors: np.ndarray, centroids: np.ndarray, iterations: int, chunk: int = 100_000) -> np.ndarray:
    """k-means iterations over all the vectors, from centroids trained on a sample: with few sampled products per
    cluster, the sample's lists cut clusters apart, and each pass over the whole catalog moves them back
    (bench/allpairs.py --ann). In chunks, as the score stage's tasks do."""
    for _ in range(iterations):
        chunks = (vectors[a:a + chunk] for a in range(0, len(vectors), chunk))
        centroids = centroids_from_sums(*list_sums_over(chunks, centroids), centroids)
    return centroids


def _seeds(sample: np.ndarray, lists: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on up to 8 rows per list (few enough to stay in cache over `lists` passes): each next
    seed drawn with probability proportional to its distance (1 - cosine) from the seeds so far, so two seeds
    rarely start in one cluster."""
    rows = sample[rng.choice(len(sample), min(len(sample), SEEDS_PER_LIST * lists), replace=False)]
    chosen = [int(rng.integers(len(rows)))]
    nearest = rows @ rows[chosen[0]]
    for _ in range(1, lists):
        distance = np.clip(1.0 - nearest, 0.0, None).astype(np.float64)
        total = distance.sum()
        pick = int(rng.choice(len(rows), p=distance / total)) if total > 0 else int(rng.integers(len(rows)))
        chosen.append(pick)
        nearest = np.maximum(nearest, rows @ rows[pick])
    return _unit(rows[chosen])


def assign_lists(vectors: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Each vector's list: its centroid of largest dot product (ties to the lower list)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    out = np.zeros(len(vectors), np.int64)
    for a in range(0, len(vectors), chunk):  # an argmax per row: k = 1 needs none of topk's running merges
        out[a:a + chunk] = np.argmax(vectors[a:a + chunk] @ centroids.T, axis=1)
    return out


def probe_lists(centroids: np.ndarray, counts: np.ndarray, probes: int, min_items: int) -> np.ndarray:
    """(lists, P) padded with -1: each list, then its nearest lists by centroid dot product, at least `probes`
    lists and as many more as it takes to hold `min_items` products (a query's own row included), so every
    product gets its full K even beside small lists."""
    counts = np.asarray(counts, dtype=np.int64)
    n_lists = len(centroids)
    if counts.sum() < min_items:
        raise ValueError(f"{counts.sum()} products cannot give {min_items} candidates")
    width = min(n_lists, 4 * probes + 64)
    while True:
        order = _lists_by_nearness(centroids, width)
        covered = np.cumsum(counts[order], axis=1)
        if width == n_lists or (covered[:, -1] >= min_items).all():
            break
        width = n_lists
    need = np.minimum(np.maximum(probes, 1 + (covered < min_items).sum(axis=1)), width)
    width = int(need.max())
    return np.where(np.arange(width)[None, :] < need[:, None], order[:, :width], -1)


def _lists_by_nearness(centroids: np.ndarray, width: int) -> np.ndarray:
    """(lists, width): each list first (its centroid need not be its own best match), then the others by
    decreasing dot product."""
    own = np.arange(len(centroids))[:, None]
    nearest = topk(centroids, centroids, width)[1]
    others = np.take_along_axis(nearest, np.argsort(nearest == own, axis=1, kind="stable")[:, :width - 1], 1)
    return np.concatenate([own, others], axis=1)


def build_index(centroids: np.ndarray, counts: np.ndarray, probes: int, min_items: int,
                query_probes: int = 0) -> ListIndex:
    """The index over items numbered list by list, list c holding counts[c] of them."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ListIndex(centroids, offsets, probe_lists(centroids, counts, probes, min_items), query_probes)


def searched_lists(index: ListIndex, queries: np.ndarray, query_idx: np.ndarray, threads: int | None = None,
                   nearest: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(query row, list) pairs, possibly repeated: the lists each query searches (see search_lists). `nearest`:
    each query's lists by decreasing dot product, when the caller has them already."""
    n = len(query_idx)
    rows = [np.repeat(np.arange(n), index.probes.shape[1])]
    lists = [index.probes[index.list_of(query_idx)].ravel()]
    probes = min(index.query_probes, len(index.centroids))
    if probes and n:
        rows.append(np.repeat(np.arange(n), probes))
        if nearest is None or nearest.shape[1] < probes:
            nearest = topk(queries, index.centroids, probes, threads=threads)[1]
        lists.append(nearest[:, :probes].ravel())
    rows, lists = np.concatenate(rows), np.concatenate(lists)
    keep = lists >= 0
    return rows[keep], lists[keep]


def search_lists(index: ListIndex, queries: np.ndarray, query_idx: np.ndarray,
                 read_items: Callable[[int, int], np.ndarray], k: int, threads: int | None = None,
                 nearest: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-k (scores, idx) among the items of the lists it searches, never itself: its own list's
    `probes` (nearest to the list's centroid, enough to hold k others) and the `query_probes` lists nearest to the
    query itself (a query near the edge of its list has neighbours the centroid's nearest lists miss).
    read_items(first, stop) returns the vectors of idx first .. stop - 1; each list is read once."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    query_idx = np.asarray(query_idx, dtype=np.int64)
    n = len(query_idx)
    rows, lists = searched_lists(index, queries, query_idx, threads, nearest)
    pairs = np.unique(lists * max(1, n) + rows)  # (list, row) once each, by list
    lists, rows = np.divmod(pairs, max(1, n))
    starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]]) if len(lists) else np.zeros(0, np.int64)
    bounds = np.r_[starts, len(lists)]

    def groups():
        for a, b in zip(bounds[:-1], bounds[1:]):
            s = int(lists[a])
            first, stop = int(index.offsets[s]), int(index.offsets[s + 1])
            if stop > first:
                yield rows[a:b], first, read_items(first, stop)

    scores, found = topk_for_row_groups(queries, query_idx, groups(), k, threads=threads)
    if (found == np.iinfo(np.int64).max).any():
        raise ValueError(f"a query was shown fewer than k={k} other items; the probes must cover k + 1 items")
    return scores, found


def recall_of_probes(index: ListIndex, queries: np.ndarray, query_idx: np.ndarray, exact_idx: np.ndarray,
                     query_probes: int, nearest: np.ndarray | None = None) -> float:
    """Recall@k that search_lists reaches with `query_probes` on these queries, given their exact top-k (idx,
    -1 as padding): the share of those neighbours whose list the query searches. The search is exact within the
    lists it reads, so it finds every such neighbour, and no other item can displace one."""
    exact_idx = np.asarray(exact_idx, dtype=np.int64).reshape(len(query_idx), -1)
    present = exact_idx >= 0
    if not present.any():
        return 1.0
    rows, lists = searched_lists(replace(index, query_probes=query_probes), queries, query_idx, nearest=nearest)
    searched = np.zeros((len(query_idx), len(index.centroids)), bool)
    searched[rows, lists] = True
    neighbour_lists = index.list_of(np.where(present, exact_idx, 0))
    found = searched[np.arange(len(query_idx))[:, None], neighbour_lists] & present
    return float(found.sum() / present.sum())


def choose_query_probes(index: ListIndex, queries: np.ndarray, query_idx: np.ndarray, exact_idx: np.ndarray,
                        start: int, target: float, most: int) -> tuple[int, float]:
    """(query probes, sampled recall@k): the fewest of start, 2 start, 4 start, ... up to `most` whose recall on
    these sampled queries (recall_of_probes) reaches `target`, else `most` and its recall. A catalog whose lists
    hold many small clusters needs more probes than one of a few large ones, so the count is measured per night
    rather than fixed."""
    most = max(start, min(most, len(index.centroids)))
    nearest = topk(np.ascontiguousarray(queries, dtype=np.float32), index.centroids, max(1, most))[1] \
        if len(query_idx) else None
    probes = start
    while True:
        recall = recall_of_probes(index, queries, query_idx, exact_idx, probes, nearest)
        if recall >= target or probes >= most:
            return probes, recall
        probes = min(most, max(1, 2 * probes))


def ann_all_pairs(vectors: np.ndarray, k: int, lists: int = 0, probes: int = 1, query_probes: int = 32,
                  sample: int = 0, seed: int = 0, chunk: int = 8192, threads: int | None = None,
                  refine: int = 0, target_recall: float | None = None, max_query_probes: int = 256,
                  recall_queries: int = 2000) -> tuple[np.ndarray, np.ndarray, int]:
    """(each row's approximate top-k other rows' scores, their row numbers, the query probes used), in one process:
    train on a sample, refine over all rows (`refine` iterations), number the rows list by list, search. With
    `target_recall`, the query probes grow from `query_probes` as the score stage grows them (choose_query_probes
    on `recall_queries` rows drawn by `seed`). For benchmarks and tests; the score stage runs the same steps on
    Spark."""
    n = len(vectors)
    rng = np.random.default_rng(seed)
    lists = list_count(n, lists)
    sample_rows = rng.choice(n, training_sample_size(n, lists, sample), replace=False)
    centroids = refine_centroids(vectors, train_centroids(vectors[sample_rows], lists, seed=seed), refine)
    nearest = topk(vectors, centroids, max(1, min(query_probes, len(centroids))), threads=threads)[1]
    assigned = nearest[:, 0]  # as assign_lists: the one product of the vectors and centroids serves both
    order = np.argsort(assigned, kind="stable")
    nearest = nearest[order]
    ordered = np.ascontiguousarray(vectors[order])
    k = min(k, n - 1)
    index = build_index(centroids, np.bincount(assigned, minlength=len(centroids)), probes, k + 1, query_probes)
    if target_recall is not None:
        q_idx = np.sort(rng.choice(n, min(n, recall_queries), replace=False))
        exact = topk(ordered[q_idx], ordered, k, exclude=q_idx, threads=threads)[1]
        chosen, _ = choose_query_probes(index, ordered[q_idx], q_idx, exact, query_probes, target_recall,
                                        max_query_probes)
        if chosen != query_probes:
            index, nearest = replace(index, query_probes=chosen), None  # each chunk finds its own nearest lists
    scores = np.zeros((n, k), np.float32)
    found = np.zeros((n, k), np.int64)
    for a in range(0, n, chunk):  # as the score stage's query blocks
        rows = np.arange(a, min(n, a + chunk))
        scores[rows], found[rows] = search_lists(index, ordered[rows], rows, lambda a, b: ordered[a:b], k,
                                                 threads=threads, nearest=None if nearest is None else nearest[rows])
    result_scores, result_idx = np.empty_like(scores), np.empty_like(found)
    result_scores[order], result_idx[order] = scores, order[found]
    return result_scores, result_idx, index.query_probes


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """The share of the exact top-k neighbours the approximate lists also hold (row by row, order ignored)."""
    if exact.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approximate, exact))
    return hits / exact.size


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
