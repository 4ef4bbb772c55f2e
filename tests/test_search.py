"""Search over published embeddings a batch at a time: the same hits as over the whole matrix, in one batch's memory."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matcher.steps.scoring import topk
from matcher.steps.search import NearestProducts


@pytest.mark.parametrize("cuts", [[], [1], [7, 8, 30], list(range(1, 60))])
@pytest.mark.parametrize("k", [1, 5, 60, 100])
def test_nearest_products_over_any_batches_are_topk_over_all(cuts, k):
    rng = np.random.default_rng(len(cuts) + k)
    items = rng.normal(size=(60, 8)).astype(np.float32)
    items[40:50] = items[3]  # ties: the product read first wins, in every batch cut
    queries = np.vstack([rng.normal(size=(2, 8)), items[3:4]]).astype(np.float32)
    ids = np.array([f"p{i:02d}" for i in range(60)], dtype=object)
    found = NearestProducts(["a", "b", "c"], queries, k)
    for lo, hi in zip([0, *cuts], [*cuts, 60]):
        found.add(ids[lo:hi], items[lo:hi])
    hits = found.hits()
    scores, idx = topk(queries, items, k)
    assert hits["product_id"].tolist() == ids[idx.ravel()].tolist()
    np.testing.assert_allclose(hits["score"], scores.ravel(), rtol=1e-6, atol=1e-6)
    assert hits["rank"].tolist() == list(range(1, min(k, 60) + 1)) * 3
    assert hits["query"].tolist() == [q for q in "abc" for _ in range(min(k, 60))]


def test_no_products_no_hits():
    assert NearestProducts(["a"], np.zeros((1, 4), np.float32), 3).hits().empty


def test_a_published_table_is_scanned_one_batch_at_a_time(tmp_path):
    """A million products' embeddings are about 1 GB: `matcher search` reads them a batch at a time, so what it holds
    is a batch (and the row group being read), not the table."""
    from matcher.config import load_config
    from matcher.io.lake import Lake
    from matcher.io.published import NewestManifests, read_published

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    dt, rows, width = "2026-01-01", 60_000, 64
    rng = np.random.default_rng(0)
    files = []
    for n in range(3):
        rel = f"{Lake.work_dir('embeddings', dt, 's1')}/part-{n}.parquet"
        lake.fs.create_dir(lake.path(Lake.work_dir("embeddings", dt, "s1")), recursive=True)
        flat = pa.array(rng.normal(size=rows * width).astype(np.float32))
        vec = pa.FixedSizeListArray.from_arrays(flat, width).cast(pa.list_(pa.float32()))
        pq.write_table(pa.table({"product_id": [f"{n}-{i}" for i in range(rows)], "fused_vec": vec}),
                       lake.path(rel), filesystem=lake.fs, row_group_size=5_000)
        files.append(rel)
    lake.stage_parts("embeddings", dt, files)
    lake.write_json(Lake.manifest_file(dt), {"publish_id": "p1", "tables": {
        "embeddings": {"files": lake.commit_staged("embeddings", dt, "p1")}}})
    whole_bytes = 3 * rows * width * 4

    def consume(batches):
        base, seen, peak, ids = pa.total_allocated_bytes(), [], 0, []
        for batch in batches:
            seen.append(batch.num_rows)
            ids.extend(batch["product_id"].to_pylist())
            peak = max(peak, pa.total_allocated_bytes() - base)
        return seen, peak, ids

    seen, peak, ids = NewestManifests(lake).scan("embeddings", dt, ["product_id", "fused_vec"], consume, 1_000)
    assert sum(seen) == 3 * rows and max(seen) <= 1_000
    assert ids == read_published(lake, "embeddings", dt, ["product_id"])["product_id"].to_pylist()
    assert peak < whole_bytes / 5, (peak, whole_bytes)  # pyarrow's default read-ahead held 26 MB of the 46
