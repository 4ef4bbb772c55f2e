"""validate: the Great Expectations gate; a failure stops the night before any model or table changes.

The result names the clean attempt it judged (its id and a fingerprint of the files and rows committed), and every
later stage and publish refuse a clean table that is not that attempt."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from jobs.context import RunContext, StageError, log
from jobs.spark import get_spark
from jobs.spark_lake import read_partition
from matcher.io.lake import Lake
from matcher.io.tables import table_schema
from matcher.steps.quarantine import Reason
from matcher.steps.validate import HEAVY_COLUMNS, FrameToValidate, render_html, validate_night

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def run(ctx: RunContext) -> dict:
    clean_stats = ctx.stage_stats("clean")
    files = ctx.lake.partition_files("clean", ctx.date)
    judged = judged_attempt(ctx.lake, ctx.date)
    if judged is None or clean_stats is None:
        raise StageError("validate", f"no clean partition for {ctx.date}: run the clean stage first")
    if clean_stats.get("attempt") not in (None, judged["attempt"]):  # the run suite judges these statistics
        raise StageError("validate", f"the clean statistics are for attempt {clean_stats['attempt']} but the clean "
                                     f"table is attempt {judged['attempt']}: rerun clean")
    # Executors read the clean parts without the image bytes; the suites see those columns as stand-ins.
    schema = pq.read_schema(files[0], filesystem=ctx.lake.fs) if files else table_schema("clean")
    light = [c for c in schema.names if c not in HEAVY_COLUMNS]
    clean = read_partition(get_spark(ctx.config.spark, ctx.lake), ctx.lake, "clean", ctx.date, columns=light,
                           schema=schema)
    heavy = [c for c in HEAVY_COLUMNS if c in schema.names]
    cfg = ctx.config.validate
    outcome = validate_night(spark_frame_to_validate(clean, heavy), clean_stats, cfg.clean_suite, cfg.run_suite,
                             cfg.max_quarantine_rate,
                             max_title_chars=ctx.config.clean.max_title_chars,
                             image_size=ctx.config.clean.image_size)
    report = Lake.validation_report_file(ctx.date)
    ctx.lake.write_json(Lake.validation_result_file(ctx.date), {**outcome.to_json(), "clean_attempt": judged})
    ctx.lake.write_bytes(report, render_html(outcome, f"matcher validation {ctx.date}").encode())
    if not outcome.success:
        raise StageError("validate", "; ".join(outcome.failures())[:1000] + _quarantine_causes(clean_stats)
                         + f" (report: {ctx.lake.display(report)})")
    log.info("validate: passed")
    return {"success": True, "report": ctx.lake.display(report)}


def spark_frame_to_validate(clean: DataFrame, heavy: list[str] | None = None) -> FrameToValidate:
    """A Spark clean table as the suites read it on the executors: without its heavy columns (`heavy`: those the
    table has, read or not; by default those of `clean`), each stood in for by a literal (the table is never
    collected), through GE's Spark data source, which persists the frame on the executors for its several metric
    passes: released once the suite ran."""
    heavy = [c for c in HEAVY_COLUMNS if c in clean.columns] if heavy is None else heavy
    light = clean.selectExpr(*[f"`{c}`" for c in clean.columns if c not in HEAVY_COLUMNS],
                             *[f"1 AS `{c}`" for c in heavy])
    return FrameToValidate(light, lambda gx_context: gx_context.data_sources.add_spark("frames", persist=True),
                           light.unpersist)


# Reasons a setting, not the catalog, may explain: a whole night quarantined for one of them is most often the config.
_REMEDIES = {Reason.IMAGE_SOURCE_NOT_ALLOWED: "photos outside the catalog folder need catalog.image_sources",
             Reason.IMAGE_PATH_ESCAPES_ROOT: "a photo path leads out of the catalog folder (a symlink or ..)"}


def _quarantine_causes(clean_stats: dict) -> str:
    """The clean stage's most frequent quarantine reasons, so a failed gate names its cause beside the figures."""
    reasons = sorted((clean_stats.get("quarantine_by_reason") or {}).items(), key=lambda r: (-r[1], r[0]))[:3]
    if not reasons:
        return ""
    named = ", ".join(f"{reason} {count:,}" + (f" ({_REMEDIES[reason]})" if reason in _REMEDIES else "")
                      for reason, count in reasons)
    return f"; quarantined by the clean stage: {named}"


def judged_attempt(lake: Lake, date: str) -> dict | None:
    """The clean attempt a validation of `date` judges now: the clean and quarantine commits' attempt id and one
    fingerprint of both; None when clean has not committed."""
    clean = lake.committed_attempt("clean", date)
    if clean is None:
        return None
    quarantine = lake.committed_attempt("quarantine", date) or {}
    digest = hashlib.sha256(f"{clean['fingerprint']}:{quarantine.get('fingerprint')}".encode()).hexdigest()[:32]
    return {"attempt": clean["attempt"], "fingerprint": digest}


def require_passed(ctx: RunContext, stage: str) -> None:
    """Later stages and publish refuse to touch anything unless this date's validation passed, and passed on the
    clean attempt they are about to use (a clean rerun since then needs validate again)."""
    result = ctx.lake.read_json(Lake.validation_result_file(ctx.date))
    if result is None:
        raise StageError(stage, f"no validation result for {ctx.date}: run the validate stage first")
    current = judged_attempt(ctx.lake, ctx.date)
    if current is None:
        raise StageError(stage, f"no clean partition for {ctx.date}: run the clean and validate stages first")
    judged = result.get("clean_attempt") or {}
    if judged.get("attempt") != current["attempt"] or judged.get("fingerprint") != current["fingerprint"]:
        named = judged.get("attempt") or "unnamed (a result written before results named their attempt)"
        if judged.get("attempt") == current["attempt"]:
            named += f" with fingerprint {judged.get('fingerprint')}"
            current = {**current, "attempt": f"{current['attempt']} with fingerprint {current['fingerprint']}"}
        raise StageError(stage, f"validation result for {ctx.date} is for clean attempt {named} but the clean "
                                f"table is attempt {current['attempt']}: rerun validate")
    if not result.get("success"):
        raise StageError(stage, f"validation failed for {ctx.date}; fix the catalog and rerun clean and validate")
