"""Tables that schemas/tables.json defines by a query: checked against their inputs' schemas before a night's
scoring (a wrong entry fails in one line naming the table), and built by Spark SQL from the night's tables."""
import json

import pandas as pd
import pyarrow as pa
import pytest

from jobs.context import StageError
from jobs.score_queries import check_table_queries, input_schemas, table_from_query
from jobs.spark import get_spark
from jobs.spark_lake import spark_schema
from matcher.config import SCHEMAS_DIR, load_config
from matcher.io.tables import parse_registry, table_schema

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

# What a query sees of the clean table: no photo bytes, a catalog's pass-through column kept.
CLEAN = pa.schema([f for f in table_schema("clean") if not pa.types.is_binary(f.type)] + [("brand", pa.string())])


@pytest.fixture(scope="module")
def spark():
    return get_spark(load_config(overrides={"spark": {"master": "local[2]"}}).spark)


def plant(monkeypatch, query: str, columns: dict[str, str]) -> None:
    """The shipped registry with one more query table, `probe`, after the others."""
    doc = json.loads((SCHEMAS_DIR / "tables.json").read_text(encoding="utf-8"))
    doc["tables"]["probe"] = {"stage": "score", "published": True, "queryable": True, "description": "a probe",
                              "columns": columns, "query": query}
    registry = parse_registry(doc)
    monkeypatch.setattr("matcher.io.tables.tables", lambda: registry)
    monkeypatch.setattr("jobs.score_queries.tables", lambda: registry)


def test_a_planted_query_table_over_an_earlier_query_table_passes_the_check(spark, monkeypatch):
    plant(monkeypatch, "SELECT c.brand, CAST(COUNT(*) AS INT) AS n FROM {clean} c JOIN {exposure} x "
                       "ON x.product_id = c.product_id GROUP BY c.brand", {"brand": "string", "n": "int32"})
    check_table_queries(spark, CLEAN)
    with pytest.raises(StageError, match="reads {brands}"):  # the check does run the planted entry
        plant(monkeypatch, "SELECT brand, CAST(1 AS INT) AS n FROM {brands}", {"brand": "string", "n": "int32"})
        check_table_queries(spark, CLEAN)


@pytest.mark.parametrize("query, columns, says", [
    ("SELEC product_id FROM {embeddings}", {"product_id": "string"}, "fails: [PARSE_SYNTAX_ERROR]"),
    ("SELECT nope FROM {embeddings}", {"nope": "string"}, "fails: [UNRESOLVED_COLUMN"),
    ("SELECT product_id FROM {features}", {"product_id": "string"}, "reads {features}, not among its inputs"),
    ("SELECT product_id FROM {embeddings.x}", {"product_id": "string"}, "plain input names"),
    ("SELECT e.product_id, r.product_id FROM {embeddings} e JOIN {recommendations} r USING (product_id)",
     {"product_id": "string"}, "returns columns ['product_id'] more than once"),
    ("SELECT product_id, nope FROM {embeddings}", {"product_id": "string", "nope": "string"},
     "(its inputs: {embeddings} as input_embeddings_"),
    ("SELECT product_id FROM {embeddings}", {"product_id": "string", "n": "int32"},
     "returns columns ['product_id']; its entry declares ['product_id', 'n']"),
    ("SELECT product_id, COUNT(*) AS n FROM {recommendations} GROUP BY product_id",
     {"product_id": "string", "n": "int32"}, "n is bigint, declared int (CAST it in the query)"),
])
def test_a_wrong_query_table_fails_the_check_in_one_line_naming_it(spark, monkeypatch, query, columns, says):
    plant(monkeypatch, query, columns)
    with pytest.raises(StageError) as err:
        check_table_queries(spark, CLEAN)
    message = str(err.value)
    assert message.startswith("stage score failed: the query of table probe ") and says in message, message
    assert "\n" not in message


def test_exposure_counts_each_products_appearances_in_the_others_top_k(spark):
    """The shipped exposure table against pandas on a small night: a product nobody recommends has 0 and no rank;
    every product of the night is there (from the categories table, one row each), with its label."""
    def frame(name, rows):
        schema = table_schema(name)
        return spark.createDataFrame(pd.DataFrame(rows, columns=schema.names), spark_schema(schema))

    ids = ["A", "B", "C", "D"]
    cats = frame("categories", [(p, cat, "bags", 0.9, cat == "bags" if cat else None, "v1")
                                for p, cat in zip(ids, ["bags", "bags", "shoes", None])])
    recs_rows = [("A", 1, "B", .9, .9, "v1"), ("A", 2, "C", .8, .8, "v1"), ("B", 1, "A", .9, .9, "v1"),
                 ("B", 2, "C", .7, .7, "v1"), ("C", 1, "B", .6, .6, "v1"), ("C", 2, "A", .5, .5, "v1"),
                 ("D", 1, "C", .4, .4, "v1"), ("D", 2, "B", .3, .3, "v1")]
    recs = frame("recommendations", recs_rows)
    read = input_schemas("exposure", CLEAN)  # the columns the night reads of each input
    inputs = {i: f.select(*read[i].names) for i, f in {"categories": cats, "recommendations": recs}.items()}
    assert "score" not in read["categories"].names and "similarity" not in read["recommendations"].names
    got = (table_from_query(spark, "exposure", inputs).toPandas().sort_values("product_id").reset_index(drop=True))
    r = pd.DataFrame(recs_rows, columns=table_schema("recommendations").names)
    by = r.groupby("rec_product_id")["rank"]
    assert got["product_id"].tolist() == ids
    assert got["times_recommended"].tolist() == [by.size().get(p, 0) for p in ids] == [2, 3, 3, 0]
    assert got["best_rank"].tolist()[:3] == [by.min()[p] for p in ids[:3]] and pd.isna(got["best_rank"][3])
    assert got["category"].tolist()[:3] == ["bags", "bags", "shoes"] and got["model_version"].eq("v1").all()
    assert got.columns.tolist() == table_schema("exposure").names


def test_a_wrong_query_table_fails_the_score_stage_before_scoring_and_without_a_retry(tmp_path, monkeypatch):
    """The stage runs the check before anything is scored: the night fails in one line, as not retryable, and
    stages no table for publish."""
    from jobs.context import RunContext
    from jobs.pipeline import run_stage
    from matcher.io.tables import published_tables
    from tests.synthetic import write_synthetic_partition

    date = "2026-02-01"
    ctx = RunContext(load_config(overrides={
        "run": {"lake": f"file://{tmp_path}/lake"},
        "train": {"epochs": 2, "batch_size": 64, "dim": 16, "hidden": 32, "min_steps": 0},
        "score": {"top_k": 5, "rerank_candidates": 10, "block_size": 64}}), date)
    write_synthetic_partition(ctx.lake, date, n=120)
    run_stage("train", ctx)
    plant(monkeypatch, "SELECT nope FROM {embeddings}", {"nope": "string"})
    monkeypatch.setattr("jobs.score.make_embedder", lambda *a, **k: pytest.fail("the night was scored first"))
    with pytest.raises(StageError) as err:
        run_stage("score", ctx)
    message = str(err.value)
    assert message.startswith("stage score failed: the query of table probe ") and "\n" not in message, message
    assert not err.value.retryable
    assert all(ctx.lake.staged_parts(t, date) is None for t in published_tables())
