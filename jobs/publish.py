"""publish: make the staged tables of the partition visible, then write the run manifest."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.context import RunContext, StageError, log
from jobs.pipeline import STAGES
from jobs.validate import judged_attempt, require_passed
from matcher.io.delta_tables import commit_night, vacuum_tables
from matcher.io.lake import Lake, new_attempt_id
from matcher.io.run_report import render_run_report
from matcher.io.tables import published_tables, run_tables, table_schema, type_name

PUBLISHING = "_publish"  # the staged document naming the publish in progress (not a table)


def run(ctx: RunContext) -> dict:
    lake = ctx.lake
    require_passed(ctx, "publish")  # the clean attempt about to be named is the one validation passed
    scored = ctx.stage_stats("score") or {}
    if not scored:
        raise StageError("publish", f"nothing staged for {ctx.date}: run the score stage first")
    current = judged_attempt(lake, ctx.date)
    if scored.get("clean_attempt") != current:
        named = (scored.get("clean_attempt") or {}).get("attempt") or "unknown"
        raise StageError("publish", f"the staged tables of {ctx.date} were scored from clean attempt {named} but "
                                    f"the clean table is attempt {current['attempt']}: rerun extract, train and "
                                    "score")
    staged = {name: lake.staged_parts(name, ctx.date) for name in published_tables()}
    missing = [name for name, parts in staged.items() if parts is None]
    published = lake.manifest(ctx.date) or {}
    if len(missing) == len(staged) and scored.get("attempt") and published.get("score_attempt") == scored["attempt"]:
        # This score's tables are already published (a retry after the commit, e.g. the lock was lost after it).
        log.info("publish: %s already published (score attempt %s)", ctx.date, scored["attempt"])
        return {"tables": published.get("tables"), "report": lake.display(Lake.report_file(ctx.date)),
                "already_published": True}
    if missing:
        raise StageError("publish", f"nothing staged for {missing} on {ctx.date}: run the score stage first")
    if ctx.lock is not None:  # fence before moving anything in: a retry can still find the staged parts
        ctx.lock.assert_held()
    for name, parts in staged.items():
        for part in parts[:1]:  # the writers cast every part to the same schema
            if not lake.exists(part):  # moved in by an earlier try of this publish, which checked it
                continue
            schema = pq.read_schema(lake.path(part), filesystem=lake.fs)
            if not schema.equals(table_schema(name), check_metadata=False):
                raise StageError("publish", f"staged {name} does not match schemas/tables.json")
    # New files go in beside the current ones; the manifest naming them is the single atomic switch; only then
    # are files removed, those of the generation before the one replaced: a reader that opened the previous
    # manifest finishes on its files. A crash before the switch leaves the previous partition as it was.
    # The publish id is staged before anything moves: a retry of a publish that stopped part way (after some
    # moves, or after the tables' logs committed but before the manifest) finishes the same publish.
    pending = lake.read_json(Lake.staged_file(PUBLISHING, ctx.date)) or {}
    publish_id = pending.get("publish_id") or new_attempt_id()
    if pending.get("publish_id") != publish_id:
        lake.write_json(Lake.staged_file(PUBLISHING, ctx.date), {"publish_id": publish_id})
    previous = lake.manifest(ctx.date)
    replaced = (previous.get("previous") if previous is not None and previous.get("publish_id") == publish_id
                else _generation(lake, previous))  # a retry after its own manifest: that manifest's previous
    moved = {name: lake.commit_staged(name, ctx.date, publish_id) for name in published_tables()}
    run_commits = {name: lake.committed(name, ctx.date) or {} for name in run_tables()}
    if ctx.lock is not None:  # fence: the tables' logs are a commit point for every other reader
        ctx.lock.assert_held()
    holder = f"publish {ctx.date} {publish_id}"
    logged = commit_night(lake, ctx.date, moved | {name: list(doc.get("files", [])) for name, doc in
                                                   run_commits.items()}, holder)
    tables = {}
    built_in = (ctx.stage_stats("score") or {}).get("table_seconds") or {}
    for name, files in moved.items():
        tables[name] = {"rows": logged[name].rows, "path": lake.display(Lake.partition_dir(name, ctx.date)),
                        "files": files, "schema": _schema_entry(name),
                        "delta_version": logged[name].version, "score_seconds": built_in.get(name)}
    for name, committed in run_commits.items():
        tables[name] = {"rows": committed.get("rows", 0), "path": lake.display(Lake.partition_dir(name, ctx.date)),
                        "files": list(committed.get("files", [])), "attempt": committed.get("attempt"),
                        "schema": _schema_entry(name, logged[name].schema),
                        "delta_version": logged[name].version}
    tables["features"] = {"rows": lake.partition_rows("features", ctx.date),
                          "path": lake.display(Lake.partition_dir("features", ctx.date))}
    stages = {s: ctx.stage_stats(s) for s in STAGES[:STAGES.index("publish")]}
    manifest = {
        "date": ctx.date,
        "catalog": (stages.get("clean") or {}).get("catalog") or ctx.catalog,  # what clean read, not today's config
        "model_version": (stages.get("score") or {}).get("model_version"),
        "model_source": (stages.get("score") or {}).get("model_source"),
        "input_fingerprint": (stages.get("score") or {}).get("input_fingerprint"),
        "candidates": {k: v for k, v in (stages.get("score") or {}).items()
                       if k == "candidates" or k.startswith("ann_")},
        "counts": {k: (stages.get("clean") or {}).get(k) for k in
                   ("input_rows", "clean_rows", "quarantined_rows", "quarantine_by_reason")},
        "features": {k: (stages.get("extract") or {}).get(k) for k in ("embedded", "reused")},
        # This date's training, which need not be the model that scored it (a refused model, a rescore):
        "trained_model_version": (stages.get("train") or {}).get("model_version"),
        "metrics": (stages.get("train") or {}).get("metrics"),
        "promotion": (stages.get("train") or {}).get("decision"),
        "mismatch_scorer": (stages.get("score") or {}).get("mismatch_scorer"),  # its AUC; why none was flagged
        "stage_seconds": {s: (stats or {}).get("seconds") for s, stats in stages.items()},
        "tables": tables,
        "publish_id": publish_id,
        "score_attempt": (stages.get("score") or {}).get("attempt"),
        "previous": replaced,
        "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if ctx.lock is not None:  # fence: still the date's newest holder, right before the commit point
        ctx.lock.assert_held()
    lake.write_json(Lake.manifest_file(ctx.date), manifest)
    for name in published_tables() + run_tables():
        lake.remove_dead_files(name, ctx.date)
    lake.clear_staging(ctx.date)
    lake.clear_work(ctx.date)
    log.info("publish: %s", {k: v["rows"] for k, v in tables.items()})
    try:
        vacuumed = vacuum_tables(lake, ctx.config.tables.keep_nights, holder)
        log.info("publish: vacuum deleted %s files replaced over %d nights ago", sum(vacuumed.values()),
                 ctx.config.tables.keep_nights)
    except Exception as exc:  # the night is committed; files a vacuum left are deleted by the next one
        log.warning("publish: vacuum of the tables' logs failed: %s", exc)
    report = Lake.report_file(ctx.date)
    try:
        lake.write_bytes(report, render_run_report(lake, ctx.date).encode())
    except Exception as exc:  # the tables are committed; a report that cannot be drawn must not undo the night
        log.warning("publish: report not written: %s", exc)
        return {"tables": tables, "report": None, "report_error": str(exc)}
    return {"tables": tables, "report": lake.display(report)}


def _schema_entry(table: str, files_schema: pa.Schema | None = None) -> list[str]:
    """The table's columns as schemas/tables.json spells their types ("score: float32"): the registry's, or those of
    its files as the log read them (clean: the registry's, then the catalog's pass-through columns)."""
    return [f"{f.name}: {type_name(f.type)}" for f in (files_schema or table_schema(table))]


def _generation(lake: Lake, manifest: dict | None) -> dict | None:
    """The files a replaced manifest named, kept (with its publish id) until the next publish of the date."""
    if manifest is None:
        return None
    return {"publish_id": manifest.get("publish_id"),
            "tables": {name: files for name in published_tables() + run_tables()
                       if (files := lake.manifest_table_files(manifest, name)) is not None}}
