"""publish: make the staged tables of the partition visible, then write the run manifest."""
from __future__ import annotations

import datetime as dt
import uuid

from jobs.context import RunContext, StageError, log
from matcher.run_report import render_run_report
from matcher.tables import table_schema

PUBLISHED_TABLES = ("embeddings", "recommendations", "categories", "mismatches", "search")
STAGE_NAMES = ("clean", "validate", "extract", "train", "score")


def run(ctx: RunContext) -> dict:
    lake = ctx.lake
    staged = {name: lake.read_staged(name, ctx.date) for name in PUBLISHED_TABLES}
    missing = [name for name, table in staged.items() if table is None]
    if missing:
        raise StageError("publish", f"nothing staged for {missing} on {ctx.date}: run the score stage first")
    for name, table in staged.items():
        if not table.schema.equals(table_schema(name), check_metadata=False):
            raise StageError("publish", f"staged {name} does not match schemas/tables.json")
    # New files go in beside the current ones; the manifest naming them is the single atomic switch; only then
    # are the previous files removed. A crash before the switch leaves the previous partition as it was.
    publish_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    tables = {}
    for name, table in staged.items():
        relpath = lake.commit_staged(name, ctx.date, publish_id)
        tables[name] = {"rows": table.num_rows, "path": lake.display(f"{name}/dt={ctx.date}"), "files": [relpath],
                        "schema": [f"{f.name}: {f.type}" for f in table.schema]}
    for name in ("clean", "quarantine", "features"):
        t = lake.read_partition(name, ctx.date)
        tables[name] = {"rows": t.num_rows if t is not None else 0, "path": lake.display(f"{name}/dt={ctx.date}")}
    stages = {s: ctx.stage_stats(s) for s in STAGE_NAMES}
    manifest = {
        "date": ctx.date,
        "catalog": ctx.catalog,
        "model_version": (stages.get("score") or {}).get("model_version"),
        "input_fingerprint": (stages.get("score") or {}).get("input_fingerprint"),
        "counts": {k: (stages.get("clean") or {}).get(k) for k in
                   ("input_rows", "clean_rows", "quarantined_rows", "quarantine_by_reason")},
        "features": {k: (stages.get("extract") or {}).get(k) for k in ("embedded", "reused")},
        "metrics": (stages.get("train") or {}).get("metrics"),
        "promotion": (stages.get("train") or {}).get("decision"),
        "stage_seconds": {s: (stats or {}).get("seconds") for s, stats in stages.items()},
        "tables": tables,
        "publish_id": publish_id,
        "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    lake.write_json(f"manifests/dt={ctx.date}/manifest.json", manifest)
    for name in PUBLISHED_TABLES:
        lake.remove_unlisted_files(name, ctx.date, keep=set(tables[name]["files"]))
    lake.clear_staging(ctx.date)
    log.info("publish: %s", {k: v["rows"] for k, v in tables.items()})
    report = f"reports/dt={ctx.date}/report.html"
    try:
        lake.write_bytes(report, render_run_report(lake, ctx.date).encode())
    except Exception as exc:  # the tables are committed; a report that cannot be drawn must not undo the night
        log.warning("publish: report not written: %s", exc)
        return {"tables": tables, "report": None, "report_error": str(exc)}
    return {"tables": tables, "report": lake.display(report)}
