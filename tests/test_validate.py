import subprocess
import sys

import pandas as pd
import pytest

from matcher.steps.validate import render_html, validate_night


def clean_frame(n=5, **overrides):
    df = pd.DataFrame({
        "product_id": [f"p{i}" for i in range(n)], "title": [f"title {i}" for i in range(n)], "description": "",
        "category": "Shirts", "tokens": [["title"]] * n, "text_truncated": False, "image_bytes": [b"x" * 500] * n,
        "image_nbytes": 500, "image_width": 224, "image_height": 224, "content_hash": ["a" * 64] * n,
    })
    for col, values in overrides.items():
        df[col] = values
    return df


STATS = {"input_rows": 5, "clean_rows": 5, "quarantine_rate": 0.0}


@pytest.fixture(scope="module")
def spark():
    from jobs.spark import get_spark
    from matcher.config import load_config

    return get_spark(load_config().spark)


@pytest.fixture(params=["pandas", pytest.param("spark", marks=pytest.mark.integration)])
def engine(request):
    """A function turning a pandas clean table into the frame this engine validates."""
    if request.param == "pandas":
        return lambda df: df
    from jobs.validate import spark_frame_to_validate

    session = request.getfixturevalue("spark")
    return lambda df: spark_frame_to_validate(session.createDataFrame(df))


def failed_expectations(outcome):
    """(expectation type, column) of every failed expectation, over both suites."""
    return {(r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column"))
            for suite in outcome.results for r in suite["result"]["results"] if not r["success"]}


def _int32(df):
    return df.astype({"image_width": "int32", "image_height": "int32"})


def _one_row(df):
    return df.head(1)


def _without_content_hash(df):
    return df.drop(columns=["content_hash"])


# name -> (clean table, the expectations that must fail: the same on pandas and on Spark)
CASES = {
    "good night": (clean_frame(), set()),
    "int32 image sizes (the lake's schema)": (_int32(clean_frame()), set()),
    "duplicate id": (clean_frame(product_id=["p0", "p0", "p1", "p2", "p3"]),
                     {("expect_column_values_to_be_unique", "product_id")}),
    "null id": (clean_frame(product_id=["p0", None, "p1", "p2", "p3"]),
                {("expect_column_values_to_not_be_null", "product_id")}),
    "title over 300 chars": (clean_frame(title=["t"] * 4 + ["x" * 301]),
                             {("expect_column_value_lengths_to_be_between", "title")}),
    "empty title": (clean_frame(title=["t"] * 4 + [""]), {("expect_column_value_lengths_to_be_between", "title")}),
    "null title": (clean_frame(title=["t"] * 4 + [None]), {("expect_column_values_to_not_be_null", "title")}),
    "image width 10": (clean_frame(image_width=[224] * 4 + [10]),
                       {("expect_column_values_to_be_between", "image_width")}),
    "image height 2000": (clean_frame(image_height=[224] * 4 + [2000]),
                          {("expect_column_values_to_be_between", "image_height")}),
    "image 10 bytes": (clean_frame(image_nbytes=[10] * 5), {("expect_column_values_to_be_between", "image_nbytes")}),
    "a photo not of the clean stage's side": (clean_frame(image_width=[224] * 4 + [256]),
                                              {("expect_column_values_to_be_between", "image_width")}),
    "image larger than a JPEG of its side": (clean_frame(image_nbytes=[500] * 4 + [4 * 224 * 224 + 65_537]),
                                             {("expect_column_values_to_be_between", "image_nbytes")}),
    "short content hash": (clean_frame(content_hash=["a" * 64] * 4 + ["a" * 63]),
                           {("expect_column_value_lengths_to_equal", "content_hash")}),
    "width as text": (clean_frame(image_width=["224"] * 5), {("expect_column_values_to_be_in_type_list", "image_width"),
                                                        ("expect_column_values_to_be_between", "image_width")}),
    "title as numbers": (clean_frame(title=list(range(5))), {("expect_column_values_to_be_in_type_list", "title")}),
    "id as numbers": (clean_frame(product_id=list(range(5))),
                      {("expect_column_values_to_be_in_type_list", "product_id")}),
    "truncated flag as text": (clean_frame(text_truncated=["no"] * 5),
                               {("expect_column_values_to_be_in_type_list", "text_truncated")}),
    "one row": (_one_row(clean_frame()), {("expect_table_row_count_to_be_between", None)}),
    "missing column": (_without_content_hash(clean_frame()),
                       {("expect_table_columns_to_match_set", None),
                        ("expect_column_value_lengths_to_equal", "content_hash")}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_good_and_bad_nights_pass_and_fail_identically_on_pandas_and_spark(engine, case):
    df, expected_failures = CASES[case]
    outcome = validate_night(engine(df.copy()), STATS, "clean_products", "run_stats", 0.2)
    assert failed_expectations(outcome) == expected_failures, outcome.failures()
    assert outcome.success == (not expected_failures)
    failures = " ".join(outcome.failures())
    for kind, column in expected_failures:
        assert f"clean_products: {kind}" in failures and (column is None or f"'column': '{column}'" in failures)
    assert ("PASSED" if outcome.success else "FAILED") in render_html(outcome, "t")


def test_duplicate_ids_wrong_types_and_bad_sizes_fail_the_gate(engine):
    df = clean_frame(product_id=["p0", "p0", "p1", "p2", "p3"], image_width=["224"] * 5, image_nbytes=[10] * 5)
    outcome = validate_night(engine(df), STATS, "clean_products", "run_stats", 0.2)
    failures = " ".join(outcome.failures())
    assert not outcome.success
    assert "expect_column_values_to_be_unique" in failures
    assert "image_width" in failures and "image_nbytes" in failures
    assert "FAILED" in render_html(outcome, "t")


def test_the_quarantine_ceiling_comes_from_config(engine):
    stats = {"input_rows": 10, "clean_rows": 5, "quarantine_rate": 0.5}
    outcome = validate_night(engine(clean_frame()), stats, "clean_products", "run_stats", 0.2)
    assert not outcome.success
    assert failed_expectations(outcome) == {("expect_column_values_to_be_between", "quarantine_rate")}
    # The message and the page show the rate, not how many rows failed ("observed 1" read as a rate of 1).
    assert outcome.failures()[0].endswith("(observed 1 row outside: 0.5)"), outcome.failures()
    assert "1 row outside: 0.5" in render_html(outcome, "t")
    assert validate_night(engine(clean_frame()), stats, "clean_products", "run_stats", 0.6).success


def test_the_title_length_bound_is_the_clean_stages_cut(engine):
    """clean.max_title_chars above the shipped 300 must not fail the gate on the titles the clean stage kept."""
    long = clean_frame(title=["t" * 800] + ["short title"] * 4)
    outcome = validate_night(engine(long.copy()), STATS, "clean_products", "run_stats", 0.2)
    assert failed_expectations(outcome) == {("expect_column_value_lengths_to_be_between", "title")}
    assert validate_night(engine(long), STATS, "clean_products", "run_stats", 0.2, max_title_chars=1000).success


@pytest.mark.parametrize("side", [16, 1024])
def test_the_photo_bounds_are_the_clean_stages_side(engine, side):
    """clean.image_size 16 or 1024 passed the config check, then every night failed the gate (it checked 32-1024
    pixels and 2 MB whatever the side)."""
    from matcher.steps.validate import max_image_nbytes_for

    photos = clean_frame(image_width=side, image_height=side, image_nbytes=min(900_000, max_image_nbytes_for(side)))
    assert not validate_night(engine(photos.copy()), STATS, "clean_products", "run_stats", 0.2).success
    assert validate_night(engine(photos), STATS, "clean_products", "run_stats", 0.2, image_size=side).success


@pytest.mark.integration
def test_spark_validation_never_reads_the_heavy_columns_nor_collects_the_table(spark, monkeypatch, tmp_path):
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    from jobs.validate import spark_frame_to_validate

    # Read on the executors like the lake's table; evaluating either heavy column fails the Spark job, so passing
    # proves they were pruned away.
    spark.createDataFrame(clean_frame(50).drop(columns=["image_bytes", "tokens"])).write.parquet(str(tmp_path / "c"))
    read = spark.read.parquet(str(tmp_path / "c"))
    sdf = (read.withColumn("image_bytes", F.when(F.col("image_nbytes") > 0, F.raise_error("image_bytes was read"))
                           .cast("binary"))
           .withColumn("tokens", F.when(F.col("image_nbytes") > 0, F.raise_error("tokens was read"))
                       .cast("array<string>")))
    with pytest.raises(Exception, match="image_bytes was read"):
        sdf.select("image_bytes").collect()

    def no_to_pandas(self, *a, **k):
        raise AssertionError("the clean table was collected to the driver")

    monkeypatch.setattr(DataFrame, "toPandas", no_to_pandas)
    cached_before = spark.sparkContext._jsc.getPersistentRDDs().size()
    outcome = validate_night(spark_frame_to_validate(sdf), {**STATS, "clean_rows": 50, "input_rows": 50},
                             "clean_products", "run_stats", 0.2)
    assert outcome.success, outcome.failures()
    # GE's persisted copy of the slimmed table is released afterwards.
    assert spark.sparkContext._jsc.getPersistentRDDs().size() == cached_before


def test_validate_night_rejects_other_inputs():
    with pytest.raises(TypeError, match="a pandas DataFrame or a FrameToValidate, not list"):
        validate_night([{"product_id": "p0"}], STATS, "clean_products", "run_stats", 0.2)


@pytest.mark.integration
def test_the_validate_module_imports_neither_spark_nor_the_jobs():
    # Great Expectations (which itself may import pyspark) is loaded only when a suite runs.
    code = ("import sys, matcher.steps.validate; "
            "bad = {m.split('.')[0] for m in sys.modules} & {'pyspark', 'jobs', 'airflow', 'great_expectations'}; "
            "assert not bad, sorted(bad)")
    subprocess.run([sys.executable, "-c", code], check=True)
