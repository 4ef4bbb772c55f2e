"""The one vector-column conversion, and the score stage's batch kernels as pure functions."""
import numpy as np
import pyarrow as pa
import pytest

from matcher.steps.categories import category_centroids, category_sums, predict_categories
from matcher.steps.scoring import recommendation_table
from matcher.steps.vectors import vector_column, vector_matrix


def test_a_matrix_round_trips_through_a_list_column_in_chunks_or_whole():
    m = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    column = vector_column(m)
    assert column.type == pa.list_(pa.float32())
    assert np.array_equal(vector_matrix(column), m)
    assert np.array_equal(vector_matrix(pa.chunked_array([column[:3], column[3:]]), 5), m)
    assert vector_matrix(pa.array([], pa.list_(pa.float32())), 5).shape == (0, 5)


def test_a_matrix_from_arrow_is_writable_so_torch_takes_it_without_a_warning():
    import warnings

    import torch

    matrix = vector_matrix(vector_column(np.ones((4, 3), np.float32)))
    assert matrix.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable" would fail here
        torch.as_tensor(matrix)


def test_ragged_or_null_rows_are_refused_naming_the_column():
    with pytest.raises(ValueError, match="z of row 1 has 2 values, not 1"):
        vector_matrix(pa.array([[1.0], [1.0, 2.0]]), name="z")
    with pytest.raises(ValueError, match="v of row 0 has 2 values, not 3"):
        vector_matrix(pa.array([[1.0, 2.0]]), 3, name="v")
    with pytest.raises(ValueError, match="u is null in row 1"):
        vector_matrix(pa.array([[1.0], None]), name="u")
    # The score stage names rows by their idx.
    with pytest.raises(ValueError, match="v is null in idx 41"):
        vector_matrix(pa.array([[1.0], None]), name="v", row_ids=np.array([40, 41]))
    with pytest.raises(ValueError, match="v of idx 42 has 2 values, not 1"):
        vector_matrix(pa.array([[1.0], [1.0], [1.0, 2.0]]), name="v", row_ids=np.array([40, 41, 42]))


def test_categories_from_partition_sums_equal_the_whole_catalogs():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(40, 4)).astype(np.float32)
    cats = [["a", "b", "", None][i % 4] for i in range(40)]
    whole = category_sums(cats, v)
    acc: dict = {}
    for part in (slice(0, 13), slice(13, 40)):
        category_sums(cats[part], v[part], acc)
    assert whole.keys() == acc.keys() == {"a", "b"} and all(np.allclose(whole[c][0], acc[c][0]) for c in whole)
    names, centroids = category_centroids(acc, 1, 4)
    table, agreement = predict_categories(pa.array([f"p{i}" for i in range(40)]), cats, v, names, centroids, "m1")
    expected = np.array(names)[np.argmax(v @ centroids.T, axis=1)]
    assert table.column("predicted_category").to_pylist() == expected.tolist()
    labelled = [(c, p) for c, p in zip(cats, expected) if c]
    assert agreement == {"labelled": 20, "agree": sum(c == p for c, p in labelled)}
    assert table.column("agrees").to_pylist()[2:4] == [None, None]
    assert category_centroids(acc, 100, 4)[0] == []  # no category has 100 products: nothing is predicted
    none, agreement = predict_categories(pa.array(["p0", "p1"]), ["a", ""], v[:2], [], np.zeros((0, 4)), "m1")
    assert none.column("predicted_category").to_pylist() == none.column("score").to_pylist() == [None, None]
    assert none.column("agrees").to_pylist() == [None, None] and agreement == {"labelled": 0, "agree": 0}


def test_recommendation_rows_keep_the_best_k_by_the_blended_score():
    candidates = np.array([[3, 1, 2], [0, 2, 3]])
    ids = np.array([["d", "b", "c"], ["a", "c", "d"]], dtype=object)
    similarity = np.array([[0.9, 0.8, 0.7], [0.9, 0.5, 0.4]], np.float32)
    match = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    table = recommendation_table(np.array(["a", "b"], dtype=object), candidates, ids, similarity, match, 2, 0.5, "m")
    rows = table.to_pylist()
    assert [(r["product_id"], r["rank"], r["rec_product_id"]) for r in rows] == [
        ("a", 1, "b"), ("a", 2, "d"), ("b", 1, "d"), ("b", 2, "a")]
    assert rows[0]["score"] == pytest.approx(0.5 * 0.8 + 0.5 * 1.0) and rows[0]["similarity"] == pytest.approx(0.8)
