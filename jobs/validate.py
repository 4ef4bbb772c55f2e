"""validate: the Great Expectations gate; a failure stops the night before any model or table changes."""
from __future__ import annotations

import pyarrow.parquet as pq

from jobs.context import RunContext, StageError, log
from jobs.spark import get_spark
from jobs.spark_lake import read_partition
from matcher.lake import Lake
from matcher.tables import table_schema
from matcher.validate import HEAVY_COLUMNS, render_html, validate_night


def run(ctx: RunContext) -> dict:
    clean_stats = ctx.stage_stats("clean")
    files = ctx.lake.partition_files("clean", ctx.date)
    if ctx.lake.committed("clean", ctx.date) is None or clean_stats is None:
        raise StageError("validate", f"no clean partition for {ctx.date}: run the clean stage first")
    from pyspark.sql import functions as F

    # Executors read the clean parts without the image bytes; the suites see those columns as typed stand-ins.
    schema = pq.read_schema(files[0], filesystem=ctx.lake.fs) if files else table_schema("clean")
    light = [c for c in schema.names if c not in HEAVY_COLUMNS]
    clean = read_partition(get_spark(ctx.config.extract), ctx.lake, "clean", ctx.date, columns=light, schema=schema)
    for column in HEAVY_COLUMNS:
        if column in schema.names:
            clean = clean.withColumn(column, F.lit(None).cast("binary" if column == "image_bytes" else "array<string>"))
    cfg = ctx.config.validate
    outcome = validate_night(clean, clean_stats, cfg.clean_suite, cfg.run_suite, cfg.max_quarantine_rate)
    base = Lake.validation_dir(ctx.date)
    ctx.lake.write_json(f"{base}/result.json", outcome.to_json())
    ctx.lake.write_bytes(f"{base}/report.html", render_html(outcome, f"matcher validation {ctx.date}").encode())
    if not outcome.success:
        raise StageError("validate", "; ".join(outcome.failures())[:1000]
                         + f" (report: {ctx.lake.display(base + '/report.html')})")
    log.info("validate: passed")
    return {"success": True, "report": ctx.lake.display(f"{base}/report.html")}


def require_passed(ctx: RunContext, stage: str) -> None:
    """Later stages refuse to touch anything unless this date's validation passed."""
    result = ctx.lake.read_json(f"{Lake.validation_dir(ctx.date)}/result.json")
    if result is None:
        raise StageError(stage, f"no validation result for {ctx.date}: run the validate stage first")
    if not result.get("success"):
        raise StageError(stage, f"validation failed for {ctx.date}; fix the catalog and rerun clean and validate")
