"""A whole night on a real Spark standalone cluster (Master and Worker from the pyspark package, on 127.0.0.1) with
a result-size cap small enough that collecting any catalog-sized table fails: the same tables as in local[2], and
a second night with 5% of the products changed embeds exactly those."""
from __future__ import annotations

import csv

import numpy as np
import pyarrow.compute as pc
import pytest

from jobs.context import RunContext
from jobs.pipeline import STAGES, run_pipeline
from jobs.spark import stop_spark
from jobs.standalone_cluster import StandaloneCluster
from matcher.config import load_config
from tests.conftest import make_fashion_slice

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

PRODUCTS = 400
CAP = "512k"  # the catalog's clean table (JPEG bytes, which do not compress) is larger; the training sample is not


def _config(master: str, lake: str, catalog: str):
    return load_config(overrides={
        "run": {"lake": lake, "catalog": catalog},
        "clean": {"image_size": 64},
        "spark": {"master": master, "max_result_size": CAP},
        "extract": {"image_encoder": "thumbnail-8x8", "text_encoder": "hashing-384", "second_title_encoder": ""},
        "train": {"epochs": 3, "min_steps": 40, "dim": 32, "hidden": 64, "max_products": 100},
        # The driver's bounded samples (training, the mismatch scorers' fit, the hubness bank) sized below the cap,
        # as the config check requires (matcher.config.driver_receipts).
        "score": {"top_k": 5, "rerank_candidates": 10, "block_size": 128, "search_queries": ["red dress"],
                  "mismatch_fit_products": 100, "hubness_bank": 128, "max_categories": 100, "candidates": "exact"},
    })


def _tables(lake, date: str) -> dict:
    out = {}
    for name in ("recommendations", "categories", "mismatches", "search", "embeddings", "quarantine"):
        t = lake.read_partition(name, date)
        keys = [c for c in ("query", "product_id", "rank") if c in t.column_names]
        out[name] = t.sort_by([(k, "ascending") for k in keys]).to_pandas()
    return out


def test_a_night_on_a_standalone_cluster_equals_local_and_a_second_night_embeds_only_changes(fashion_dir, tmp_path):
    catalog = make_fashion_slice(tmp_path / "catalog", PRODUCTS, start=2000)
    date, next_date = "2026-05-01", "2026-05-02"
    stop_spark()
    with StandaloneCluster(tmp_path / "cluster", workers=1, cores_per_worker=2, memory_per_worker="2g") as cluster:
        cfg = _config(cluster.master_url, f"file://{tmp_path}/cluster-lake", str(catalog)).with_overrides(
            {"spark": cluster.spark_overrides()})  # and the secret the cluster requires
        on_cluster = RunContext(cfg, date)
        run_pipeline(on_cluster, list(STAGES))
        clean_files = on_cluster.lake.partition_files("clean", date)
        assert len(clean_files) >= 2  # written in parts by executors
        # The night's Spark event log, in the lake by default on a cluster, for the history server.
        assert [p for p in (tmp_path / "cluster-lake" / "_spark_events").iterdir() if "app-" in p.name]

        # A stray collect of a catalog-sized table fails under this cap: the stages above never did one.
        from jobs.spark import get_spark
        from jobs.spark_lake import read_partition
        with pytest.raises(Exception, match="maxResultSize"):
            read_partition(get_spark(cfg.spark, on_cluster.lake), on_cluster.lake, "clean", date).collect()

        # Night 2: 5% of the titles change; exactly those products are embedded again, on the cluster.
        rows = list(csv.DictReader(open(catalog / "products.csv", encoding="utf-8")))
        changed = {r["product_id"] for r in rows[::20]}
        for r in rows[::20]:
            r["title"] += " new season"
        with open(catalog / "products.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        second = run_pipeline(RunContext(cfg, next_date), ["clean", "validate", "extract"])["extract"]
        assert second["embedded"] == len(changed) and second["reused"] == PRODUCTS - len(changed)
    stop_spark()

    # The same first night in local[2] (the catalog as it was that night) gives the same tables.
    for r in rows[::20]:
        r["title"] = r["title"].removesuffix(" new season")
    with open(catalog / "products.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    local = RunContext(_config("local[2]", f"file://{tmp_path}/local-lake", str(catalog)), date)
    run_pipeline(local, list(STAGES))
    stop_spark()
    a, b = _tables(on_cluster.lake, date), _tables(local.lake, date)
    for name in a:
        assert len(a[name]) == len(b[name]) > 0 or name in ("quarantine", "mismatches"), name
        for col in a[name].columns:
            if col == "model_version":
                continue
            left, right = a[name][col].to_numpy(), b[name][col].to_numpy()
            if left.dtype.kind == "f" or col.endswith("_vec"):
                np.testing.assert_allclose(np.stack(left) if col.endswith("_vec") else left,
                                           np.stack(right) if col.endswith("_vec") else right, atol=1e-5)
            else:
                assert list(left) == list(right), (name, col)
    assert a["recommendations"]["product_id"].nunique() == PRODUCTS
    assert pc.max(local.lake.read_partition("recommendations", date)["rank"]).as_py() == 5
