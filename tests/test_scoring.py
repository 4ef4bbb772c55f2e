import numpy as np
import pytest
import torch

from matcher.steps.scoring import topk
from tests.reference import cross_match_scorer


def brute_force(q, x, k, exclude_self):
    sims = q.astype(np.float64) @ x.T.astype(np.float64)
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.lexsort((np.tile(np.arange(x.shape[0]), (q.shape[0], 1)), -sims), axis=1)
    k_eff = min(k, x.shape[0] - (1 if exclude_self else 0))
    return order[:, :k_eff]


@pytest.mark.parametrize("n_q, n_x, d, k, block, exclude_self", [
    (200, 200, 32, 10, 37, True),
    (50, 300, 8, 20, 16, False),
    (30, 30, 4, 50, 7, True),      # k > candidates
    (1, 1000, 64, 5, None, False),
])
def test_topk_matches_brute_force(n_q, n_x, d, k, block, exclude_self):
    rng = np.random.default_rng(n_q + n_x + d)
    x = rng.normal(size=(n_x, d)).astype(np.float32)
    q = x[:n_q] if exclude_self else rng.normal(size=(n_q, d)).astype(np.float32)
    scores, idx = topk(q, x, k, block_size=block, exclude_self=exclude_self)
    expected = brute_force(q, x, k, exclude_self)
    assert idx.shape == expected.shape
    # Scores agree; indices agree except where two scores are within float error of each other.
    ref_scores = np.take_along_axis(q @ x.T, expected, 1)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (idx == expected).mean() > 0.99
    if exclude_self:
        assert not (idx == np.arange(n_q)[:, None]).any()


def test_ties_go_to_the_lower_index():
    # Integer-valued vectors: exact ties, many of them crossing the k boundary.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, size=(120, 3)).astype(np.float32)
    scores, idx = topk(x, x, 15, block_size=25, exclude_self=True)
    expected = brute_force(x, x, 15, True)
    np.testing.assert_array_equal(idx, expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_many_blocks_with_duplicate_products_are_exact(symmetric):
    # Small-integer vectors repeat (like duplicate listings in a catalog): whole runs of equal scores cross the
    # k boundary in many blocks, so the running filter and the batched merges must settle ties by index.
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, size=(900, 4)).astype(np.float32)
    if symmetric:
        _, idx = topk(x, x, 15, block_size=64, exclude_self=True)
    else:  # the general path, as Spark tasks run it: a slice of queries, each excluding its own row
        rows = np.arange(100, 400)
        _, idx = topk(x[rows], x, 15, block_size=64, exclude=rows)
    expected = brute_force(x, x, 15, True)
    np.testing.assert_array_equal(idx, expected if symmetric else expected[100:400])


def test_random_catalog_over_many_blocks_matches_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2500, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores, idx = topk(x, x, 20, block_size=96, exclude_self=True)
    expected = brute_force(x, x, 20, True)
    np.testing.assert_allclose(scores, np.take_along_axis(x @ x.T, expected, 1), atol=1e-5)
    assert (idx == expected).mean() > 0.999


def test_gpu_filter_path_equals_the_cpu_one():
    # The torch filtering used on a GPU, run here on CPU tensors, against the numpy one used on the CPU: plain
    # and through the tiles of rows.
    from matcher.steps.scoring import _entries_above_numpy, _entries_above_torch, _entries_at_least

    def as_set(hits):
        return set(zip(*(h.tolist() for h in hits)))

    sims = np.random.default_rng(5).normal(size=(64, 90)).astype(np.float32)
    row_limits = np.random.default_rng(64).normal(1.0, 0.3, size=64).astype(np.float32)
    col_limits = np.random.default_rng(90).normal(1.0, 0.3, size=90).astype(np.float32)
    tiled_rows, tiled_cols = _entries_at_least(sims, row_limits, col_limits)
    for along_columns, limits, tiled in ((False, row_limits, tiled_rows), (True, col_limits, tiled_cols)):
        got = _entries_above_torch(torch.from_numpy(sims), limits, along_columns)
        want = _entries_above_numpy(sims, limits, along_columns)
        assert len(want[0]) > 100
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert as_set(tiled) == as_set(want)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_result_does_not_depend_on_threads_or_block_size(threads):
    x = np.random.default_rng(11).integers(0, 3, size=(700, 5)).astype(np.float32)
    expected = brute_force(x, x, 12, True)
    for block in (64, 96, 200):
        _, idx = topk(x, x, 12, block_size=block, exclude_self=True, threads=threads)
        np.testing.assert_array_equal(idx, expected)
        _, idx = topk(x[50:300], x, 12, block_size=block, exclude=np.arange(50, 300), threads=threads)
        np.testing.assert_array_equal(idx, expected[50:300])


def test_default_block_is_chosen_from_the_cache_and_the_threads():
    from matcher.steps.scoring import _cache_bytes, default_block_size

    for threads in (1, 2, 8, 64):
        block = default_block_size(threads=threads)
        assert 256 <= block <= 2048 and block & (block - 1) == 0
        assert block == 256 or threads * block * block * 4 <= _cache_bytes("index3", 8 * 2**20) // 4
    assert default_block_size(threads=64) <= default_block_size(threads=1)
    assert default_block_size("cuda") == 8192  # only reads the device type; no GPU needed


def test_sort_keys_order_by_score_descending_then_index_and_decode_back():
    from matcher.steps.scoring import _EMPTY_KEY, _NO_INDEX, _decode_keys, _descending_keys

    scores = np.array([1.0, 0.5, 0.5, 0.0, -0.0, -0.5, -1.0, -np.inf, 3e-38, -3e-38], dtype=np.float32)
    indices = np.array([9, 3, 4, 7, 2, 0, 1, 5, 6, 8])
    keys = _descending_keys(scores, indices)
    expected = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), indices[i]))  # -0.0 ties 0.0
    assert list(np.argsort(keys)) == expected
    values, back = _decode_keys(keys)
    np.testing.assert_array_equal(values, scores)
    np.testing.assert_array_equal(back, indices)
    assert keys.max() < _EMPTY_KEY
    assert _decode_keys(np.array([_EMPTY_KEY]))[1][0] == _NO_INDEX
    with pytest.raises(ValueError, match="item indices must stay below"):
        _descending_keys(np.zeros(1, np.float32), np.array([2**32]))


@pytest.mark.parametrize("skewed", [False, True])
def test_merged_keys_are_each_rows_k_least(skewed):
    from matcher.steps.scoring import _merge_keys

    rng = np.random.default_rng(5)
    n, k = 50, 6
    best = np.sort(rng.integers(0, 2**40, (n, k)).astype(np.uint64), axis=1)
    rows = np.full(400, 3) if skewed else rng.integers(0, n, 400)  # skewed: the one-sort path
    keys = rng.integers(0, 2**40, len(rows)).astype(np.uint64)
    merged = _merge_keys(best, rows, keys, k)
    for row in range(n):
        np.testing.assert_array_equal(merged[row], np.sort(np.concatenate([best[row], keys[rows == row]]))[:k])


def test_non_finite_vectors_are_refused_with_the_row():
    x = np.eye(4, dtype=np.float32)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="items hold NaN or infinite values in 1 rows, e.g. row 2"):
        topk(np.eye(4, dtype=np.float32), x, 2)
    with pytest.raises(ValueError, match="queries hold NaN"):
        topk(x, x, 2, exclude_self=True)


def test_empty_and_degenerate_inputs():
    x = np.eye(3, dtype=np.float32)
    s, i = topk(x[:0], x, 2)
    assert s.shape == (0, 2)
    s, i = topk(x[:1], x[:1], 3, exclude_self=True)
    assert s.shape == (1, 0)


def test_categories_are_predicted_by_the_nearest_centroid_of_the_labelled_products():
    import pyarrow as pa

    from matcher.steps.categories import category_centroids, category_sums, predict_categories

    v = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    cats = ["a", "a", "b", "b", ""]
    names, centroids = category_centroids(category_sums(cats, v), 1, 2)
    table, agreement = predict_categories(pa.array(list("pqrst")), cats, v, names, centroids, "m1")
    assert table.column("predicted_category").to_pylist() == ["a", "a", "b", "b", "a"]
    assert table.column("agrees").to_pylist() == [True, True, True, True, None]  # no label: no verdict
    assert agreement == {"labelled": 4, "agree": 4}


def test_rerank_orders_by_the_blended_score_and_keeps_similarity():
    from matcher.steps.scoring import rerank

    sim = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    cand = np.array([[5, 6, 7]])
    match = {5: 0.0, 6: 1.0, 7: 0.5}
    scores, sims, idx = rerank(sim, cand, lambda p, q: np.array([match[j] for j in q], np.float32), 2, 0.5)
    assert idx.tolist() == [[6, 7]]
    np.testing.assert_allclose(sims, [[0.8, 0.7]])
    np.testing.assert_allclose(scores, [[0.9, 0.6]])
    _, _, plain = rerank(sim, cand, lambda p, q: np.zeros(len(q), np.float32), 3, 0.0)
    assert plain.tolist() == [[5, 6, 7]]



def test_identical_products_publish_a_similarity_of_at_most_one():
    """Two products with the same content: their float32 cosine can round past 1, which a reader checking the
    range of a cosine would take for a bug."""
    from matcher.steps.scoring import recommendation_table, topk

    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.normal(size=(1, 256)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        sims, idx = topk(np.vstack([v, v]), np.vstack([v, v]), k=2)
        if sims.max() > 1.0:
            break
    assert sims.max() > 1.0  # a vector whose float32 cosine with its twin passes 1
    table = recommendation_table(np.array(["A", "B"]), idx, np.array([["A", "B"], ["A", "B"]]), sims,
                                 np.ones_like(sims), 2, 0.3, "v1")
    assert max(table.column("similarity").to_pylist()) <= 1.0
    assert max(table.column("score").to_pylist()) <= 1.0


def test_cross_match_scores_each_unordered_pair_once():

    calls = []

    def pair(img, txt):  # a fixed, asymmetric function of (photo, text)
        calls.append(len(img))
        return (np.asarray(img) * 0.01 + np.asarray(txt) * 0.001).astype(np.float32)

    p = np.array([0, 0, 1, 2, 3, 3])
    q = np.array([1, 2, 0, 0, 3, 1])
    got = cross_match_scorer(pair)(p, q)
    expected = (pair(q, p) + pair(p, q)) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert calls[:2] == [4, 4]  # the unordered pairs {0,1}, {0,2}, {3,3}, {1,3}, each scored once per direction


def _assert_same_neighbours_up_to_rounding(q, x, got_i, want_i, want_s, ulps=2e-6):
    """got_i is want_i, except that two neighbours whose float32 scores agree to rounding may come in either order:
    a BLAS kernel may round equal dot products differently by their column (OpenBLAS's AMD kernels do, Intel's
    did not), so even float32 itself does not order an exact tie the same way everywhere."""
    for r, c in zip(*np.nonzero(got_i != want_i)):
        exact = float(q[r].astype(np.float64) @ x[got_i[r, c]].astype(np.float64))
        assert abs(exact - want_s[r, c]) <= ulps, (r, c, got_i[r, c], want_i[r, c])
    assert all(len(set(row)) == len(row) for row in got_i.tolist())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_products_give_the_float32_answer(precision):
    # The GPU kernel's arithmetic (torch, fp16 / bf16 inputs) run on the CPU: candidates found within the rounding
    # error bound and rescored in float32 give the float32 neighbours (an exact tie in either order).
    rng = np.random.default_rng(8)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[7] = x[3]  # an exact tie
    for kwargs in ({"exclude_self": True}, {"exclude": np.arange(100, 400)}):
        q = x if "exclude_self" in kwargs else x[100:400]
        want_s, want_i = topk(q, x, 15, block_size=128, **kwargs)
        got_s, got_i = topk(q, x, 15, block_size=128, precision=precision, **kwargs)
        np.testing.assert_allclose(got_s, want_s, rtol=0, atol=2e-6)
        _assert_same_neighbours_up_to_rounding(q, x, got_i, want_i, want_s)
    small_integers = rng.integers(0, 3, size=(300, 4)).astype(np.float32)  # runs of equal scores
    np.testing.assert_array_equal(topk(small_integers, small_integers, 9, block_size=64, exclude_self=True,
                                       precision=precision)[1], brute_force(small_integers, small_integers, 9, True))
    with pytest.raises(ValueError, match="precision must be"):
        topk(x, x, 3, precision="fp8")


@pytest.mark.parametrize("shape,k,axis", [((64, 2048), 20, 1), ((2048, 64), 20, 0), ((30, 100), 7, 1),
                                          ((37, 21), 21, 1), ((50, 40), 3, 0)])
def test_the_kth_score_bound_never_exceeds_the_kth_score_and_k_entries_reach_it(shape, k, axis):
    from matcher.steps.scoring import _kth_largest_bound

    sims = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
    sims[0, :] = -np.inf  # excluded entries (a product and itself) count for nothing
    bound = _kth_largest_bound(sims, k, axis)
    exact = -np.sort(-sims, axis=axis).take(k - 1, axis=axis)
    exact = np.where(np.isneginf(exact), np.finfo(np.float32).min, exact)
    assert (bound <= exact).all()
    reach = (sims >= np.expand_dims(bound, axis)).sum(axis=axis)
    assert (reach[np.isfinite(exact) & (exact > np.finfo(np.float32).min)] >= k).all()
    # Close: on these random scores it lets through few more than k entries per row.
    assert reach.mean() < 2 * k
