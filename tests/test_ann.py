import numpy as np
import pytest

from matcher.steps.ann import (
    ListIndex,
    ann_all_pairs,
    assign_lists,
    build_index,
    choose_query_probes,
    probe_lists,
    recall_at_k,
    recall_of_probes,
    refine_centroids,
    search_lists,
    train_centroids,
)
from matcher.steps.scoring import topk


def clustered(n: int, d: int, centers: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d), dtype=np.float32)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_one_list_is_the_exact_search():
    x = np.random.default_rng(2).integers(0, 3, size=(400, 4)).astype(np.float32)  # ties everywhere
    scores, idx, _ = ann_all_pairs(x, 10, lists=1, probes=1)
    want_scores, want_idx = topk(x, x, 10, exclude_self=True)
    np.testing.assert_array_equal(scores, want_scores)
    # One list numbers the rows as they are, so even the ties go to the same (lower) rows.
    np.testing.assert_array_equal(idx, want_idx)


def test_clustered_catalog_recall_and_shape():
    x = clustered(6000, 32, 120, spread=0.5)
    scores, idx, _ = ann_all_pairs(x, 20, probes=1, query_probes=8)
    assert idx.shape == (6000, 20) and not (idx == np.arange(6000)[:, None]).any()
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    np.testing.assert_allclose(scores, np.take_along_axis(x @ x.T, idx, 1), atol=1e-5)  # exact dot products
    _, exact = topk(x, x, 20, exclude_self=True)
    assert recall_at_k(idx, exact) >= 0.95
    # With one probe per list and none per query, recall is lower: the per-query probes are what carries it.
    _, narrow, _ = ann_all_pairs(x, 20, probes=1, query_probes=0)
    assert recall_at_k(narrow, exact) < recall_at_k(idx, exact)


def test_probes_grow_until_they_hold_k_candidates():
    centroids = np.eye(4, dtype=np.float32)
    counts = np.array([1, 1, 1, 30])
    probes = probe_lists(centroids, counts, probes=1, min_items=3)
    for c in range(3):  # lists of one product take two more lists to show it 2 others
        chosen = probes[c][probes[c] >= 0]
        assert chosen[0] == c and counts[chosen].sum() >= 3
    assert list(probes[3][probes[3] >= 0]) == [3]
    with pytest.raises(ValueError, match="cannot give"):
        probe_lists(centroids, counts, probes=1, min_items=40)


def test_a_query_shown_too_few_items_is_an_error():
    x = np.eye(4, dtype=np.float32)
    index = ListIndex(x[:2], np.array([0, 2, 4]), np.array([[0], [1]]))  # lists of 2, each searching itself only
    with pytest.raises(ValueError, match="fewer than k=2"):
        search_lists(index, x, np.arange(4), lambda a, b: x[a:b], 2)


def test_kmeans_finds_separated_clusters_and_assigns_to_them():
    x = clustered(3000, 16, 5, spread=0.05, seed=4)
    centroids = train_centroids(x, 5, seed=1)
    assigned = assign_lists(x, centroids)
    # Points of one true cluster share a list.
    truth = np.random.default_rng(4)
    truth.standard_normal((5, 16), dtype=np.float32)
    labels = truth.integers(0, 5, 3000)
    for c in range(5):
        assert len(np.unique(assigned[labels == c])) == 1
    index = build_index(centroids, np.bincount(assigned, minlength=5), probes=1, min_items=2)
    assert index.offsets[-1] == 3000 and (np.diff(index.offsets) == np.bincount(assigned, minlength=5)).all()


def test_recall_at_k_by_hand():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approximate = np.array([[3, 2, 9], [6, 5, 4]])
    assert recall_at_k(approximate, exact) == pytest.approx(5 / 6)


def test_the_driver_side_training_sample_is_bounded_whatever_the_catalog():
    from matcher.steps.ann import MAX_TRAINING_SAMPLE, list_count, training_sample_size

    # Up to 1M products: about 4 sqrt(N) lists, 64 sampled products each (at least 100,000).
    assert (list_count(1_000_000), training_sample_size(1_000_000, list_count(1_000_000))) == (4000, 256_000)
    assert training_sample_size(50_000, list_count(50_000)) == 50_000  # a small catalog: all of it
    # Beyond: the sample stops at the cap and the lists stop growing in number, so each still gets 64.
    for n in (2_000_000, 10_000_000, 100_000_000):
        lists = list_count(n)
        sample = training_sample_size(n, lists)
        assert sample <= MAX_TRAINING_SAMPLE and sample >= 64 * lists and lists == MAX_TRAINING_SAMPLE // 64
    # What a user sets is kept.
    assert list_count(10_000_000, 20_000) == 20_000 and training_sample_size(10_000_000, 20_000, 900_000) == 900_000


def _numbered_by_list(x: np.ndarray, lists: int, k: int):
    """x renumbered list by list and its index with one probe per list, as the score stage builds them."""
    centroids = train_centroids(x, lists, seed=3)
    assigned = assign_lists(x, centroids)
    order = np.argsort(assigned, kind="stable")
    index = build_index(centroids, np.bincount(assigned, minlength=lists), probes=1, min_items=k + 1)
    return x[order], index


def test_recall_of_probes_is_the_recall_the_search_reaches():
    k = 10
    ordered, index = _numbered_by_list(clustered(3000, 16, 150, spread=0.8, seed=6), 40, k)
    q_idx = np.sort(np.random.default_rng(1).choice(len(ordered), 300, replace=False))
    _, exact = topk(ordered[q_idx], ordered, k, exclude=q_idx)
    seen = []
    for probes in (0, 1, 2, 4, 40):
        _, found = search_lists(ListIndex(index.centroids, index.offsets, index.probes, probes), ordered[q_idx],
                                q_idx, lambda a, b: ordered[a:b], k)
        computed = recall_of_probes(index, ordered[q_idx], q_idx, exact, probes)
        assert computed == pytest.approx(recall_at_k(found, exact), abs=1e-12)
        seen.append(computed)
    assert seen[0] < seen[2] < seen[-1] == 1.0  # more probes find more; all of them is the exact search
    # Padding (a query with fewer than k neighbours) is left out, not counted as missed.
    padded = exact.copy()
    padded[:, -1] = -1
    assert recall_of_probes(index, ordered[q_idx], q_idx, padded, 40) == 1.0


def test_choose_query_probes_doubles_until_the_target_and_stops_at_the_most():
    k = 10
    ordered, index = _numbered_by_list(clustered(3000, 16, 150, spread=0.8, seed=6), 40, k)
    q_idx = np.sort(np.random.default_rng(1).choice(len(ordered), 300, replace=False))
    q, (_, exact) = ordered[q_idx], topk(ordered[q_idx], ordered, k, exclude=q_idx)
    recall = {p: recall_of_probes(index, q, q_idx, exact, p) for p in (1, 2, 4, 8, 16, 32)}
    target = (recall[4] + recall[8]) / 2  # between what 4 and 8 probes reach
    assert recall[4] < target <= recall[8]
    assert choose_query_probes(index, q, q_idx, exact, 1, target, 256) == (8, recall[8])
    assert choose_query_probes(index, q, q_idx, exact, 16, target, 256) == (16, recall[16])  # never below start
    assert choose_query_probes(index, q, q_idx, exact, 1, target, 2) == (2, recall[2])  # capped: its recall
    assert choose_query_probes(index, q, q_idx, exact, 0, 1.0, 256)[1] == 1.0  # from none: 1, 2, 4, ... lists


def test_refining_on_the_whole_catalog_mends_lists_trained_on_a_thin_sample():
    x = clustered(6000, 32, 300, spread=0.6, seed=8)  # 20 products a cluster, 1.3 of them sampled
    _, exact = topk(x, x, 10, exclude_self=True)
    thin = recall_at_k(ann_all_pairs(x, 10, lists=100, query_probes=2, sample=400)[1], exact)
    refined = recall_at_k(ann_all_pairs(x, 10, lists=100, query_probes=2, sample=400, refine=3)[1], exact)
    assert refined > thin + 0.02
    # The passes add up per-chunk statistics: any chunking gives the same centroids.
    start = train_centroids(x[:400], 100, seed=0)
    np.testing.assert_allclose(refine_centroids(x, start, 2, chunk=700), refine_centroids(x, start, 2), atol=1e-6)


def test_ann_all_pairs_grows_its_query_probes_to_the_target_recall():
    x = clustered(6000, 32, 300, spread=0.6, seed=8)
    _, exact = topk(x, x, 10, exclude_self=True)
    _, fixed, fixed_probes = ann_all_pairs(x, 10, lists=100, query_probes=1, sample=400)
    _, grown, grown_probes = ann_all_pairs(x, 10, lists=100, query_probes=1, sample=400, target_recall=0.97,
                                           recall_queries=500)
    assert fixed_probes == 1 and grown_probes in (2, 4, 8, 16, 32, 64, 100)
    assert recall_at_k(fixed, exact) < 0.97 <= recall_at_k(grown, exact) + 0.01  # the target is met on a sample
