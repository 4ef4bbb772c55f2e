import numpy as np
import pytest

from matcher.scoring import assign_categories, topk


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


def test_empty_and_degenerate_inputs():
    x = np.eye(3, dtype=np.float32)
    s, i = topk(x[:0], x, 2)
    assert s.shape == (0, 2)
    s, i = topk(x[:1], x[:1], 3, exclude_self=True)
    assert s.shape == (1, 0)


def test_assign_categories_nearest_centroid():
    v = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    cats = np.array(["a", "a", "b", "b", ""], dtype=object)
    pred, score = assign_categories(v, cats)
    assert list(pred) == ["a", "a", "b", "b", "a"]
    assert score.shape == (5,)


def test_rerank_orders_by_the_blended_score_and_keeps_similarity():
    from matcher.scoring import rerank

    sim = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    cand = np.array([[5, 6, 7]])
    match = {5: 0.0, 6: 1.0, 7: 0.5}
    scores, sims, idx = rerank(sim, cand, lambda p, q: np.array([match[j] for j in q], np.float32), 2, 0.5)
    assert idx.tolist() == [[6, 7]]
    np.testing.assert_allclose(sims, [[0.8, 0.7]])
    np.testing.assert_allclose(scores, [[0.9, 0.6]])
    _, _, plain = rerank(sim, cand, lambda p, q: np.zeros(len(q), np.float32), 3, 0.0)
    assert plain.tolist() == [[5, 6, 7]]
