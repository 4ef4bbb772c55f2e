"""A whole night of 40,000 synthetic products (run.profile = "scale") with spark.driver.maxResultSize at 16 MB, far
below the catalog's features (40,000 x 2,304 bytes: 88 MiB) and its clean table (the photos' bytes): any
catalog-sized collect that a change brings back to the driver fails this test."""
from __future__ import annotations

import pyarrow.compute as pc
import pytest

from jobs.context import RunContext
from jobs.pipeline import STAGES, run_pipeline
from jobs.spark import get_spark, stop_spark
from jobs.spark_lake import read_partition
from matcher.app.synthetic_catalog import ensure_catalog
from matcher.config import load_config

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

PRODUCTS = 40_000
CAP = "16m"
DATE = "2026-03-01"


def test_a_40000_product_night_runs_with_a_16_mb_driver_result_cap(tmp_path):
    catalog = ensure_catalog(tmp_path / "synthetic", PRODUCTS, seed=0)
    cfg = load_config(overrides={
        "run": {"profile": "scale", "lake": f"file://{tmp_path}/lake", "catalog": str(catalog)},
        "spark": {"master": "local[2]", "max_result_size": CAP},
        # The driver's samples within the cap (the config check refuses more): 5,000 x 2,304 bytes each.
        "train": {"max_products": 5000, "epochs": 3, "min_steps": 100},
        "score": {"mismatch_fit_products": 5000, "search_queries": ["red dress", "blue wool coat"]},
    })
    stop_spark()
    ctx = RunContext(cfg, DATE)
    try:
        stats = run_pipeline(ctx, list(STAGES))
        # The cap is live in this session: a collect of the catalog's features fails under it.
        with pytest.raises(Exception, match="maxResultSize"):
            read_partition(get_spark(cfg.spark), ctx.lake, "features", DATE).collect()
    finally:
        stop_spark()
    assert (stats["clean"]["clean_rows"], stats["clean"]["quarantined_rows"]) == (PRODUCTS, 0)
    recs = ctx.lake.read_partition("recommendations", DATE)
    assert recs.num_rows == PRODUCTS * 10
    per_product = recs.group_by("product_id").aggregate([("rank", "count"), ("rank", "max")])
    assert per_product.num_rows == PRODUCTS
    assert pc.all(pc.equal(per_product["rank_count"], 10)).as_py()
    assert pc.all(pc.equal(per_product["rank_max"], 10)).as_py()
    assert ctx.lake.read_partition("embeddings", DATE).num_rows == PRODUCTS
    assert ctx.lake.read_partition("categories", DATE).num_rows == PRODUCTS
    assert ctx.lake.read_partition("search", DATE).num_rows == 2 * 10
    exposure = ctx.lake.read_partition("exposure", DATE)  # a table defined by its registry query
    assert exposure.num_rows == PRODUCTS and pc.sum(exposure["times_recommended"]).as_py() == PRODUCTS * 10
