"""clean: the raw catalog -> clean/ and quarantine/ partitions, on executors.

The driver reads the catalog's header or footer only (the plan); executors parse the rows, normalise the text,
gather each product's rows (a shuffle by product_id), fetch and canonicalise the images, keep one row a product and
write part files."""
from __future__ import annotations

import math
from functools import partial
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from jobs.context import RunContext, StageError, log
from jobs.spark import get_spark
from jobs.spark_lake import STATS, BatchMapper, PartMapper, Progress, spark_schema, write_parts
from matcher.config import CleanConfig
from matcher.failures import classify
from matcher.io.catalog import CatalogError, CatalogPlan, CatalogReader
from matcher.io.delta_tables import logged_columns
from matcher.io.lake import new_attempt_id
from matcher.steps.clean import (
    CORE_COLUMNS,
    QUARANTINE_COLUMNS,
    RowCountMismatch,
    bad_line_rows,
    check_row_counts,
    clean_images_one_per_product,
    clean_text_rows,
)

_TEXT_FIELDS = ["product_id", "reason", "detail", "raw", "title", "description", "category", "repairs", "image_ref"]
_BYTES_PER_TASK = 256 << 10  # catalog bytes per image task: about two thousand rows of a text file
_ROWS_PER_TASK = 2000        # where the file says how many rows it has (Parquet, whose rows may hold photos)
# Each chunk the reader parses adds one row of this kind, holding in `rows_read` how many catalog rows (parsed or
# not) it read; the writers add them up into the stat below, so the count comes back only from successful tasks
# (an accumulator would count a re-executed task twice) and is compared with what was written.
_ROWS_READ_KIND = "rows_read"
_ROWS_READ_STAT = "__rows_read__"


def _parsed_schema(plan: CatalogPlan) -> pa.Schema:
    passthrough = _passthrough(plan)
    return pa.schema([("_row", pa.int64()), ("kind", pa.string()), *[(c, pa.string()) for c in _TEXT_FIELDS],
                      ("text_truncated", pa.bool_()), ("image_data", pa.binary()), ("rows_read", pa.int64()),
                      *[(c, pa.string()) for c in passthrough]])


def _passthrough(plan: CatalogPlan) -> list[str]:
    return [c for c in plan.columns if c not in CORE_COLUMNS]


def _catalog_rows(batch: pa.RecordBatch) -> int:
    """The catalog rows in a batch of parsed rows: all but the readers' counts."""
    return batch.num_rows - (pc.sum(pc.equal(batch.column("kind"), _ROWS_READ_KIND)).as_py() or 0)


def make_split_parser(reader: CatalogReader, plan: CatalogPlan, cfg: CleanConfig) -> BatchMapper:
    """Executors: a split's raw rows -> candidates and rejected rows (text checks), one schema for both, and per
    chunk one count of the rows the reader read."""
    schema = _parsed_schema(plan)

    def parse(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for split_no in batch.column("split").to_pylist():
                for raw in reader.read_split(plan, plan.splits[split_no]):
                    yield pa.RecordBatch.from_pylist(
                        [{"kind": _ROWS_READ_KIND, "rows_read": len(raw.rows) + len(raw.bad_lines)}], schema=schema)
                    candidates, rejected = clean_text_rows(raw.rows, cfg)
                    bad = bad_line_rows(raw.bad_lines).assign(_row=None)
                    frames = [candidates.assign(kind="candidate"), rejected.assign(kind="rejected"),
                              bad.assign(kind="rejected")]
                    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) \
                        else pd.DataFrame(columns=schema.names)
                    for col in schema.names:
                        if col not in df.columns:
                            df[col] = None
                    yield from pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False).to_batches()

    return parse


def make_image_cleaner(reader: CatalogReader, cfg: CleanConfig) -> PartMapper:
    """Executors: candidates -> clean rows (canonical images, one row a product) and quarantined rows; rejected
    rows pass through."""

    def clean(batches: Iterator[pa.RecordBatch]):
        kept: set[str] = set()  # every row of a product comes to one task, in file order (run)
        failed: dict[str, int] = {}
        for batch in batches:
            df = batch.to_pandas()
            rows_read = int(df.loc[df["kind"] == _ROWS_READ_KIND, "rows_read"].sum())
            candidates = df[df["kind"] == "candidate"].drop(columns=["kind", "reason", "detail", "rows_read"])
            rejected = df.loc[df["kind"] == "rejected", QUARANTINE_COLUMNS]
            good, bad_images = clean_images_one_per_product(
                candidates, kept, partial(reader.read_image, max_bytes=cfg.max_image_bytes), cfg, failed)
            quarantine = pd.concat([rejected, bad_images], ignore_index=True).fillna({"product_id": "", "detail": ""})
            yield "clean", pa.Table.from_pandas(good, preserve_index=False)
            yield "quarantine", pa.Table.from_pandas(quarantine, preserve_index=False)
            yield STATS, {**quarantine["reason"].value_counts().to_dict(), _ROWS_READ_STAT: rows_read}

    return clean


def _check_counts(rows_read: int, clean_rows: int, quarantined: int, outcome: str) -> None:
    try:
        check_row_counts(rows_read, clean_rows, quarantined, outcome)
    except RowCountMismatch as exc:  # a fault in the stage, not the input: a rerun would repeat it
        raise StageError("clean", str(exc)) from None


def run(ctx: RunContext) -> dict:
    if not ctx.catalog:
        raise ValueError("no catalog given (--catalog or run.catalog in the config)")
    from pyspark.sql import functions as F

    reader = CatalogReader(ctx.catalog, ctx.config.storage, ctx.config.catalog)
    try:
        plan = reader.plan()
    except CatalogError as exc:  # a backfilled date without its snapshot fails here, naming the date
        # The catalog may be missing (permanent) or its store unreachable (retryable): judged by the cause.
        raise StageError("clean", f"catalog for {ctx.date}: {exc}", retryable=classify(exc).retryable) from None
    plan = plan.spelled_as(logged_columns(ctx.lake, "clean"))  # Delta Lake holds names without case
    for note in plan.notes:
        log.warning("clean: catalog %s", note)
    renamed = plan.renamed_columns()
    if renamed:
        log.warning("clean: catalog columns renamed in the clean table (a name Spark or Delta Lake cannot hold, "
                    "one of the stage's own, one another column has in another case, or the spelling the table "
                    "already has): %s", renamed)
    spark = get_spark(ctx.config.spark, ctx.lake)
    splits = spark.createDataFrame([(i,) for i in range(len(plan.splits))], "split int").repartition(
        max(1, len(plan.splits)))
    parsed = splits.mapInArrow(make_split_parser(reader, plan, ctx.config.clean),
                               spark_schema(_parsed_schema(plan)))
    if plan.rows is not None:
        wanted = math.ceil(plan.rows / _ROWS_PER_TASK)
    else:
        wanted = math.ceil((reader.fs.get_file_info(plan.path).size or 0) / _BYTES_PER_TASK)
    tasks = max(spark.sparkContext.defaultParallelism, wanted)
    # Every row of a product_id to one task, in file order: there its first row with a good photo is kept and the
    # later ones are quarantined as duplicates (make_image_cleaner). Other rows are spread by their content.
    spread = F.when(F.col("kind") == "candidate", F.col("product_id")).otherwise(
        F.xxhash64("_row", "raw", "detail", "rows_read").cast("string"))
    by_product = parsed.repartition(tasks, spread).sortWithinPartitions("_row")
    attempt = new_attempt_id()
    written = write_parts(by_product, make_image_cleaner(reader, ctx.config.clean), ctx.lake, ctx.date,
                          attempt, ["clean", "quarantine"], Progress(spark, "clean", 0, rows_of=_catalog_rows))
    rows_read = int(written.stats.pop(_ROWS_READ_STAT, 0))
    _check_counts(rows_read, written.rows["clean"], written.rows["quarantine"], "written")  # before any commit
    clean_doc = ctx.lake.commit_parts("clean", ctx.date, written.parts["clean"], attempt)
    quarantine_doc = ctx.lake.commit_parts("quarantine", ctx.date, written.parts["quarantine"], attempt)
    clean_rows, quarantined = int(clean_doc["rows"]), int(quarantine_doc["rows"])
    _check_counts(rows_read, clean_rows, quarantined, "committed")  # by the footers of the files readers will see
    stats = {
        "input_rows": rows_read,  # counted by the reader on executors, not derived from the outputs
        "clean_rows": clean_rows,
        "quarantined_rows": quarantined,
        "quarantine_by_reason": {k: int(v) for k, v in sorted(written.stats.items())},
        "quarantine_rate": quarantined / (clean_rows + quarantined) if clean_rows + quarantined else 0.0,
        "clean_parts": len(clean_doc["files"]),
        "attempt": attempt,  # validate checks that these statistics describe the committed clean table
        "catalog": ctx.catalog,
    }
    log.info("clean: %d rows in, %d clean, %d quarantined %s", stats["input_rows"], clean_rows, quarantined,
             stats["quarantine_by_reason"])
    return stats
