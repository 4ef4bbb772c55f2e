"""ANN candidates through the score stage on Spark: the sampled recall reaches the stats, the manifest and the
report, and a night under the configured recall floor fails before anything is staged."""
import duckdb
import pytest

from jobs.context import RunContext, StageError
from jobs.pipeline import run_stage
from matcher.config import load_config
from matcher.io.run_report import _summary
from tests.synthetic import write_synthetic_partition

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

DATE = "2026-02-01"
N = 150


def _ctx(tmp_path, **score):
    cfg = load_config(overrides={
        "run": {"lake": f"file://{tmp_path}/lake"},
        "train": {"epochs": 3, "batch_size": 64, "dim": 16, "hidden": 32, "min_steps": 0},
        "score": {"top_k": 5, "rerank_candidates": 10, "block_size": 64, "candidates": "ann", "ann_lists": 12,
                  **score}})
    return RunContext(cfg, DATE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ann")
    ctx = _ctx(tmp_path)
    write_synthetic_partition(ctx.lake, DATE, n=N)
    run_stage("train", ctx)
    return tmp_path


def test_an_ann_night_publishes_full_lists_and_records_its_recall(trained):
    ctx = _ctx(trained, ann_query_probes=2, ann_max_query_probes=2, ann_recall_floor=0.0)
    stats = run_stage("score", ctx)
    assert stats["candidates"] == "ann" and stats["ann_lists"] == 12 and stats["ann_query_probes"] == 2
    assert 0.0 < stats["ann_recall_at_k"] <= 1.0 and stats["ann_recall_queries"] == N
    run_stage("publish", ctx)
    manifest = ctx.lake.manifest(DATE)
    assert manifest["candidates"]["ann_recall_at_k"] == stats["ann_recall_at_k"]
    recs = ctx.lake.read_partition("recommendations", DATE).to_pandas()
    assert len(recs) == N * 5 and (recs["product_id"] != recs["rec_product_id"]).all()
    assert recs.groupby("product_id")["rec_product_id"].nunique().eq(5).all()
    # The part files the executors wrote read the same through DuckDB as through pyarrow.
    files = [ctx.lake.path(f) for f in ctx.lake.partition_files("recommendations", DATE)]
    via_duckdb = duckdb.sql(f"select * from read_parquet({files!r}) order by product_id, rank").df()  # noqa: S608 (test's own files)
    via_arrow = recs.sort_values(["product_id", "rank"]).reset_index(drop=True)
    assert via_duckdb[list(via_arrow.columns)].equals(via_arrow)
    # The report's summary (the synthetic catalog's images are not pictures, so the whole page is not drawn here).
    assert f"data-manifest='ann_recall_at_k'>{stats['ann_recall_at_k']}</b>" in _summary(manifest)


def test_a_night_under_the_recall_floor_fails_before_staging_anything(trained):
    ctx = _ctx(trained, ann_query_probes=0, ann_max_query_probes=0, ann_recall_floor=1.0)
    with pytest.raises(StageError, match=r"ANN recall@5 0\.\d+ on 150 sampled products \(with 0 query probes\) "
                                         r"is below score.ann_recall_floor 1.0"):
        run_stage("score", ctx)
    # The same night passes with exact candidates.
    assert run_stage("score", _ctx(trained, candidates="exact"))["candidates"] == "exact"


def test_query_probes_grow_until_the_sampled_recall_reaches_the_target(trained):
    # From no query probes, as the night above that failed: the probes double (1, 2, 4, ...) until the recall
    # on the sampled products reaches the target, here all of them.
    ctx = _ctx(trained, ann_query_probes=0, ann_target_recall=1.0, ann_recall_floor=1.0)
    stats = run_stage("score", ctx)
    assert stats["ann_recall_at_k"] == 1.0 and stats["ann_target_recall"] == 1.0
    assert 1 <= stats["ann_query_probes"] <= 12
    run_stage("publish", ctx)
    assert ctx.lake.manifest(DATE)["candidates"]["ann_query_probes"] == stats["ann_query_probes"]
