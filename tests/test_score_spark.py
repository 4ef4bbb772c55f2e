"""Distributed all-pairs scoring (query-block tasks streaming item blocks from the lake) against the single-machine
functions, on local[2] with a small spark.driver.maxResultSize so that a stray collect of vectors or results would
fail."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.score_spark import VECTORS_TABLE, make_recommender, recommendations_frame, vector_parts
from jobs.spark import get_spark
from jobs.spark_lake import write_parts
from matcher.config import load_config
from matcher.io.lake import Lake, new_attempt_id
from matcher.steps.ann import assign_lists, build_index, search_lists, train_centroids
from matcher.steps.evaluate import model_pair_scorer
from matcher.steps.model import MatcherModel, ModelSpec, model_to_bytes
from matcher.steps.scoring import rerank, topk, topk_over_blocks
from tests.conftest import SMALL_DRIVER_SAMPLES
from tests.reference import cross_match_scorer

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

DATE = "2026-01-01"


@pytest.fixture(scope="module")
def spark():
    session = get_spark(load_config(overrides={**SMALL_DRIVER_SAMPLES, "spark": {
        "master": "local[2]", "max_result_size": "1m"}}).spark)
    assert session.sparkContext.getConf().get("spark.driver.maxResultSize") == "1m"  # the cap these tests rely on
    return session


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, d)).astype(np.float32)
    v[6] = v[5]  # exact ties inside a block
    if n > 200:
        v[200] = v[10]  # and across blocks
        v[150] = v[10]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def spread_model(d: int, seed: int = 11) -> tuple[MatcherModel, ModelSpec]:
    spec = ModelSpec(image_dim=8, text_dim=8, dim=d, hidden=16, fusion="weighted", fusion_alpha=0.5,
                     image_encoder="img@1", text_encoder="txt@1")
    torch.manual_seed(0)
    model = MatcherModel(spec).eval()
    with torch.no_grad():  # a random network scores near 0.5 everywhere; spread it so the re-rank moves things
        model.matcher.net[-1].weight.mul_(20)
        model.matcher.net[-1].bias.copy_(torch.as_tensor(np.random.default_rng(seed).normal(), dtype=torch.float32))
    return model, spec


def write_vector_parts(lake: Lake, attempt: str, z, u, v, sizes: list[int]) -> list[str]:
    paths, start = [], 0
    for n, rows in enumerate(sizes):
        sl = slice(start, start + rows)
        table = pa.table({"idx": pa.array(np.arange(start, start + rows), pa.int64()),
                          "product_id": [f"p{i:05d}" for i in range(start, start + rows)],
                          **{name: pa.array(list(m[sl]), pa.list_(pa.float32())) for name, m in
                             (("z", z), ("u", u), ("v", v))}})
        rel = f"{Lake.work_dir(VECTORS_TABLE, DATE, attempt)}/part-{n:05d}.parquet"
        lake.fs.create_dir(lake.path(Lake.work_dir(VECTORS_TABLE, DATE, attempt)), recursive=True)
        pq.write_table(table, lake.path(rel), filesystem=lake.fs, row_group_size=max(1, rows // 2))
        paths.append(rel)
        start += rows
    return paths[::-1]  # any listing order: the parts are put in idx order from their footers


def distributed(spark, lake, z, u, v, sizes, model, spec, k, m, weight, index=None):
    attempt = new_attempt_id()
    parts = vector_parts(lake, write_vector_parts(lake, attempt, z, u, v, sizes))
    weights = spark.sparkContext.broadcast(model_to_bytes(model))
    written = write_parts(recommendations_frame(spark, parts),
                          make_recommender(lake, parts, weights, spec, k, m, weight, "m1", index),
                          lake, DATE, attempt, ["recommendations"])
    files = written.parts["recommendations"]
    assert len(files) == len(parts)  # one part file per query block
    tables = [pq.read_table(lake.path(f), filesystem=lake.fs) for f in files]
    for t in tables:  # each part is already in (product_id, rank) order
        keys = list(zip(t.column("product_id").to_pylist(), t.column("rank").to_pylist()))
        assert keys == sorted(keys)
    return pa.concat_tables(tables).to_pandas().sort_values(["product_id", "rank"])


@pytest.mark.parametrize("n, d, sizes, k, m, integer", [
    (300, 16, [64] * 4 + [44], 10, 20, False),  # 5 blocks, the last one ragged
    (40, 4, [40], 10, 50, False),               # one block, M > N - 1
    (300, 4, [100, 7, 93, 100], 10, 15, True),  # small-integer vectors: runs of equal scores cross M everywhere
])
def test_distributed_recommendations_equal_single_machine_topk_and_rerank(spark, tmp_path, n, d, sizes, k, m,
                                                                          integer):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    if integer:
        v = np.random.default_rng(3).integers(0, 3, size=(n, d)).astype(np.float32)
    else:
        v = unit_vectors(n, d, seed=n + d)
    z, u = unit_vectors(n, d, seed=1), unit_vectors(n, d, seed=2)
    model, spec = spread_model(d)
    weight = 0.3
    recs = distributed(spark, lake, z, u, v, sizes, model, spec, k, m, weight)

    sims, cands = topk(v, v, m, block_size=64, exclude_self=True)
    scores, similarity, idx = rerank(sims, cands, cross_match_scorer(model_pair_scorer(model, z, u)), k, weight)
    kk = min(k, m, n - 1)
    assert len(recs) == n * kk and recs["rank"].tolist() == list(range(1, kk + 1)) * n
    assert recs["product_id"].tolist() == [f"p{i:05d}" for i in np.repeat(np.arange(n), kk)]
    assert recs["rec_product_id"].tolist() == [f"p{i:05d}" for i in idx.ravel()]
    # The same dot products, summed by the BLAS in blocks of another shape: equal to float32 rounding.
    np.testing.assert_allclose(recs["similarity"].to_numpy(), similarity.ravel(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(recs["score"].to_numpy(), scores.ravel(), rtol=0, atol=1e-6)
    if not integer:
        assert (idx != cands[:, :kk]).any()  # the network did re-order some lists
    assert lake.partition_files("recommendations", DATE) == []  # written to the work folder, nothing committed


def test_distributed_ann_recommendations_equal_single_machine_search_lists_and_rerank(spark, tmp_path):
    # The catalog numbered list by list; parts cut across lists (a list runs into the next part).
    n, d, k, m, weight = 400, 8, 10, 20, 0.3
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    v = unit_vectors(n, d, seed=5)
    centroids = train_centroids(v, 12, seed=0)
    assigned = assign_lists(v, centroids)
    v = v[np.argsort(assigned, kind="stable")]
    index = build_index(centroids, np.bincount(assigned, minlength=12), probes=1, min_items=m + 1, query_probes=2)
    z, u = unit_vectors(n, d, seed=1), unit_vectors(n, d, seed=2)
    model, spec = spread_model(d)
    recs = distributed(spark, lake, z, u, v, [64] * 6 + [16], model, spec, k, m, weight, index)

    sims, cands = search_lists(index, v, np.arange(n), lambda a, b: v[a:b], m)
    assert (cands != topk(v, v, m, exclude_self=True)[1]).any()  # approximate: some lists differ from exact
    scores, similarity, idx = rerank(sims, cands, cross_match_scorer(model_pair_scorer(model, z, u)), k, weight)
    assert recs["rec_product_id"].tolist() == [f"p{i:05d}" for i in idx.ravel()]
    np.testing.assert_allclose(recs["similarity"].to_numpy(), similarity.ravel(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(recs["score"].to_numpy(), scores.ravel(), rtol=0, atol=1e-6)


def test_a_query_block_task_holds_its_block_not_the_catalog(tmp_path):
    # The executor's function for one query block, in this process so its numpy memory can be traced: the
    # catalog's vectors are 32 MB, a part 0.5 MB; the task's peak (a few block-sized score matrices) stays far
    # under the catalog.
    import tracemalloc

    from jobs.score_spark import _recommend_block

    n, d, rows = 64_000, 128, 1000
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    v = unit_vectors(n, d, seed=4)
    small = unit_vectors(n, 8, seed=5)
    model, spec = spread_model(8)
    parts = vector_parts(lake, write_vector_parts(lake, new_attempt_id(), small, small, v, [rows] * (n // rows)))
    tracemalloc.start()
    try:
        table = _recommend_block(lake, parts, parts[3], model, 10, 20, 0.3, "m1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert table.num_rows == rows * 10
    assert peak < v.nbytes / 2.5, f"peak {peak / 2**20:.1f} MB against a catalog of {v.nbytes / 2**20:.0f} MB"


def test_topk_over_blocks_equals_topk_for_any_block_cut():
    v = unit_vectors(250, 8, seed=9)
    expected = topk(v, v, 12, exclude_self=True)
    for cuts in ([0, 250], [0, 1, 2, 100, 250], [0, 13, 26, 39, 200, 250]):
        blocks = [(a, v[a:b]) for a, b in zip(cuts, cuts[1:])]
        for qa, qb in zip(cuts, cuts[1:]):
            got = topk_over_blocks(v[qa:qb], np.arange(qa, qb), iter(blocks), 12)
            np.testing.assert_array_equal(got[1], expected[1][qa:qb])
            np.testing.assert_allclose(got[0], expected[0][qa:qb], rtol=0, atol=1e-6)


def test_topk_over_blocks_is_the_same_in_any_block_order():
    # Small-integer vectors: runs of equal scores cross the k boundary, so the merge must settle them by index
    # whichever block arrives first.
    v = np.random.default_rng(1).integers(0, 3, size=(300, 3)).astype(np.float32)
    blocks = [(a, v[a:a + 40]) for a in range(0, 300, 40)]
    expected = topk(v, v, 9, exclude_self=True)
    for order in (blocks, blocks[::-1], blocks[3:] + blocks[:3]):
        got = topk_over_blocks(v[100:200], np.arange(100, 200), iter(order), 9)
        np.testing.assert_array_equal(got[1], expected[1][100:200])
        np.testing.assert_array_equal(got[0], expected[0][100:200])


def test_vector_parts_must_tile_the_index_range(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    v = unit_vectors(30, 4, seed=2)
    paths = write_vector_parts(lake, "a1", v, v, v, [10, 10, 10])
    assert [(p.first, p.rows) for p in vector_parts(lake, paths)] == [(0, 10), (10, 10), (20, 10)]
    with pytest.raises(ValueError, match="do not tile"):
        vector_parts(lake, paths[:1] + paths[2:])  # the middle part (listed second) is missing


def test_a_nan_vector_is_a_clear_error(spark, tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    v = unit_vectors(50, 4, seed=4)
    v[17, 2] = np.nan
    model, spec = spread_model(4)
    with pytest.raises(Exception, match="NaN or infinite values .* idx 17"):
        distributed(spark, lake, v, v, v, [25, 25], model, spec, 5, 10, 0.3)


def test_exclude_names_one_item_per_query():
    x = np.eye(4, dtype=np.float32)
    _, idx = topk(x[[2, 3]], x, 4, exclude=np.array([2, 3]))
    assert idx.shape == (2, 3) and 2 not in idx[0] and 3 not in idx[1]


def test_the_search_table_by_photo_equals_cosine_less_hubness_over_the_whole_catalog(spark):
    """score.search_by = "photo" on Spark: each partition's top-k by the photos' cosine less their hubness against
    the broadcast bank, merged per query, equals the same ranking computed in one piece."""
    from jobs.score import _search
    from matcher.steps.encoders import load_text_encoder
    from matcher.steps.hubness import hubness
    from matcher.steps.search import query_vectors

    version = load_text_encoder("hashing-384", "cpu", "joined", "").version
    spec = ModelSpec(image_dim=8, text_dim=384, dim=16, hidden=16, fusion="weighted", fusion_alpha=0.5,
                     image_encoder="img@1", text_encoder=version)
    torch.manual_seed(0)
    model = MatcherModel(spec).eval()
    z, v = unit_vectors(90, 16, 1), unit_vectors(90, 16, 2)
    bank_texts = unit_vectors(20, 16, 3)
    frame = spark.createDataFrame(
        [(i, f"p{i:03d}", z[i].tolist(), v[i].tolist()) for i in range(90)],
        "idx long, product_id string, z array<float>, v array<float>").repartition(4)
    queries = ["red dress", "leather wallet", "running shoes"]
    sc = load_config(overrides={"score": {"search_queries": queries, "search_top_k": 5,
                                          "search_by": "photo"}}).score
    bank = spark.sparkContext.broadcast((np.zeros_like(bank_texts), bank_texts))
    got = _search(sc, model, {"spec": {"text_encoder": version}}, frame, "v1", bank).toPandas()
    q = query_vectors(model, version, queries, space="text")
    want = q @ z.T - hubness(z, bank_texts, sc.hubness_temperature)[None, :]
    for n, query in enumerate(queries):
        hits = got[got["query"] == query]
        assert hits["rank"].tolist() == [1, 2, 3, 4, 5]
        assert hits["product_id"].tolist() == [f"p{i:03d}" for i in np.argsort(-want[n], kind="stable")[:5]]
        np.testing.assert_allclose(hits["score"], np.sort(want[n])[::-1][:5], atol=1e-5)


def test_refining_the_lists_on_executors_equals_the_single_machine_refinement(spark):
    """k-means passes over the whole catalog on Spark (per-task sums added up on executors, under a 1 MB
    maxResultSize) give the centroids of matcher.steps.ann.refine_centroids over the same vectors."""
    from jobs.score_ann import refine_lists
    from matcher.steps.ann import refine_centroids

    v = unit_vectors(600, 16, 4)
    start = train_centroids(v[:60], 12, seed=2)  # trained on a tenth: the whole catalog moves them
    frame = spark.createDataFrame([(i, v[i].tolist()) for i in range(600)], "idx long, v array<float>").repartition(5)
    got = refine_lists(frame, start, 2, 16)
    want = refine_centroids(v, start, 2)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(want, start, atol=1e-3)
    np.testing.assert_array_equal(refine_lists(frame, start, 0, 16), start)


def test_the_lists_are_trained_on_executors_and_the_driver_never_holds_the_sample(spark):
    """train_lists is k-means (matcher.steps.ann) from k-means++ seeds on the first 8 rows per list by md5, over the
    sample, with the steps on executors: the driver receives the seeds and one sum per list and step, so this
    session's 1 MB cap passes a 5 MB sample (20,000 x 64 floats), which the earlier collect of the sample exceeded."""
    from jobs.score_ann import train_lists
    from matcher.steps.ann import SEEDS_PER_LIST, TRAIN_ITERATIONS, refine_centroids, seed_centroids
    from matcher.steps.hubness import bank_order_key, bank_rows

    n, d, lists = 20000, 64, 16
    rng = np.random.default_rng(4)
    v = unit_vectors(lists, d, 3)[rng.integers(lists, size=n)] + 0.05 * rng.normal(size=(n, d)).astype(np.float32)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"P{i:05d}" for i in range(n)]
    frame = spark.createDataFrame(pa.table({
        "product_id": ids, "v": pa.array(list(v), pa.list_(pa.float32()))}).to_pandas()).repartition(8)
    got = train_lists(frame, n, lists, n, d)
    first = sorted(bank_rows(ids, SEEDS_PER_LIST * lists), key=lambda i: (bank_order_key(ids[i]), ids[i]))
    want = refine_centroids(v, seed_centroids(v[first], lists), TRAIN_ITERATIONS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # A sample of a quarter of the catalog (a filter on executors) gives lists as good: each product's list
    # centroid is about as near as with the whole catalog's.
    quarter = train_lists(frame, n, lists, n // 4, d)
    nearest = lambda c: float(np.mean(np.max(v @ c.T, axis=1)))  # noqa: E731
    assert quarter.shape == (lists, d) and nearest(quarter) > nearest(want) - 0.01


@pytest.mark.parametrize("min_products", [1, 3])
def test_categories_are_not_taken_by_a_mislabeled_row(spark, min_products):
    """Three categories a, b, c of 20 products each, in groups of 5 alike (a colour, a brand); one product of
    category a labelled "zz" by mistake. As its own centroid it is nearer its group than category a's mean is, so
    without a minimum it takes their predictions."""
    from jobs.score import _category_centroids, make_categoriser

    rng = np.random.default_rng(0)
    centres, groups = rng.normal(size=(3, 16)), rng.normal(size=(12, 16))
    labels = np.repeat(["a", "b", "c"], 20).astype(object)
    v = centres[np.repeat(np.arange(3), 20)] + groups[np.repeat(np.arange(12), 5)] + 0.3 * rng.normal(size=(60, 16))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    labels[0] = "zz"
    frame = spark.createDataFrame(pa.table({
        "product_id": [f"P{i:02d}" for i in range(60)], "category": list(labels),
        "v": pa.array(list(v), pa.list_(pa.float32()))}).to_pandas()).repartition(3)
    names, centroids = _category_centroids(frame, 16, min_products, 10_000)
    assert names == (["a", "b", "c", "zz"] if min_products == 1 else ["a", "b", "c"])
    predicted = {}
    for batch in frame.toArrow().to_batches():
        for name, out in make_categoriser(names, centroids, "v1")([batch]):
            if name == "categories":
                predicted |= dict(zip(out.column("product_id").to_pylist(),
                                      out.column("predicted_category").to_pylist()))
    taken = [p for p, c in predicted.items() if c == "zz"]
    if min_products == 1:
        assert len(taken) > 1  # the failure the minimum prevents: "zz" wins some of cluster a
    else:
        assert not taken and predicted["P00"] == "a"
        assert sum(predicted[f"P{i:02d}"] == "a" for i in range(20)) == 20


def test_the_hubness_bank_is_the_first_products_by_md5_and_reaches_the_driver_bounded(spark):
    """The bank is exactly matcher.steps.hubness's (the first `size` products by md5), and the driver receives
    `size` rows, as Arrow: this session's 1 MB result cap is far below what every partition's best `size` rows (an
    ordered limit alone) would send, and below the twice `size` rows a collect of the filtered rows sent."""
    from jobs.score import _hubness_bank
    from matcher.steps.hubness import bank_order_key, bank_rows

    n, d, size = 4000, 256, 100
    z, u = unit_vectors(n, d, 1), unit_vectors(n, d, 2)
    ids = [f"P{i:05d}" for i in range(n)]
    frame = spark.createDataFrame(pa.table({
        "product_id": ids, "z": pa.array(list(z), pa.list_(pa.float32())),
        "u": pa.array(list(u), pa.list_(pa.float32()))}).to_pandas()).repartition(16)
    bank_z, bank_u = _hubness_bank(frame, size, d, n)
    want = bank_rows(ids, size)
    order = sorted(want, key=lambda i: (bank_order_key(ids[i]), ids[i]))
    np.testing.assert_array_equal(bank_z, z[order])
    np.testing.assert_array_equal(bank_u, u[order])
    big_z, big_u = _hubness_bank(frame, 400, d, n)  # 0.8 MB of vectors: twice that is over the cap
    big = sorted(bank_rows(ids, 400), key=lambda i: (bank_order_key(ids[i]), ids[i]))
    np.testing.assert_array_equal(big_z, z[big])
    np.testing.assert_array_equal(big_u, u[big])
    small = frame.filter(frame.product_id < "P00050")  # a bank of most of the catalog: no filter is needed
    bank_z, _ = _hubness_bank(small, 40, d, 50)
    np.testing.assert_array_equal(bank_z, z[sorted(bank_rows(ids[:50], 40), key=lambda i: bank_order_key(ids[i]))])


def test_category_centroids_are_summed_on_executors_and_reach_the_driver_bounded(spark):
    """The driver receives categories x dim sums, not each partition's: 16 partitions each holding all 100
    categories would send 16 x 100 x 256 doubles, over this session's 1 MB result cap."""
    from jobs.score import _category_centroids

    n, d, categories = 3200, 256, 100
    v = unit_vectors(n, d, 5)
    labels = [f"c{i % categories:03d}" for i in range(n)]
    frame = spark.createDataFrame(pa.table({
        "product_id": [f"P{i:05d}" for i in range(n)], "category": labels,
        "v": pa.array(list(v), pa.list_(pa.float32()))}).to_pandas()).repartition(16)
    names, centroids = _category_centroids(frame, d, 1, 10_000)
    assert names == sorted(set(labels))
    want = np.stack([v[np.asarray(labels) == c].astype(np.float64).mean(0) for c in names])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(centroids, want, atol=1e-5)


def test_a_catalog_of_one_off_labels_sends_the_driver_at_most_max_categories_centroids(spark, caplog):
    """A hostile catalog labels each of 3,000 products with a category of its own (the automatic minimum is then
    1): every category's sums (3,000 x 256 doubles, 6 MB) would exceed this session's 1 MB result cap. The driver
    receives score.max_categories of them, the largest first and ties by name, and the night says so."""
    from jobs.score import _category_centroids

    n, d, cap = 3000, 256, 40
    v = unit_vectors(n, d, 6)
    labels = [f"one-off {i:05d}" for i in range(n)]
    labels[:30] = ["shirts"] * 20 + ["shoes"] * 10
    frame = spark.createDataFrame(pa.table({
        "product_id": [f"P{i:05d}" for i in range(n)], "category": labels,
        "v": pa.array(list(v), pa.list_(pa.float32()))}).to_pandas()).repartition(8)
    with caplog.at_level("WARNING", logger="matcher"):
        names, centroids = _category_centroids(frame, d, 0, cap)
    assert names == sorted(["shirts", "shoes", *[f"one-off {i:05d}" for i in range(30, 30 + cap - 2)]])
    shirts = v[:20].astype(np.float64).mean(0)
    np.testing.assert_allclose(centroids[names.index("shirts")], shirts / np.linalg.norm(shirts), atol=1e-5)
    assert centroids.shape == (cap, d)
    assert "2972 categories qualify (1 or more labelled products each); the categories table predicts the 40 largest" \
        in caplog.text
