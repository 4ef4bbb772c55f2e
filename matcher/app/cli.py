"""matcher: match product photos with product texts, and publish a catalog's recommendations, search and category
tables every night (clean and validate, extract features, train, score, publish; Spark, Airflow, S3)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from jobs.submit import date_argument
from matcher.config import WORKSPACE_CONFIG, Config, ConfigError, load_config, undated_catalog_warning
from matcher.failures import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from matcher.interrupts import clear_interrupts, interrupted, note_interrupts
from matcher.io.s3server import storage_ready
from matcher.logs import LOG_FORMATS, configure_logging


def _user_errors() -> tuple[type[BaseException], ...]:
    from jobs.context import StageError
    from matcher.config import ConfigError
    from matcher.io.catalog import CatalogError
    from matcher.io.delta_tables import TableVersionError
    from matcher.io.locks import DateLockedError
    from matcher.io.published import NotPublishedError
    from matcher.io.s3server import S3ServerError
    from matcher.io.storage import StorageError
    from matcher.steps.encoders import EncoderError
    from matcher.steps.model import ModelError

    return (StageError, CatalogError, ConfigError, EncoderError, ModelError, NotPublishedError, S3ServerError,
            StorageError, TableVersionError, DateLockedError, ValueError, FileNotFoundError, OSError)


def resolve_config(path: str | None) -> Config:
    """--config FILE, else the workspace's .matcher/config.toml (written by `matcher demo`), else the defaults.
    Says which on stderr first, so a workspace config never applies silently."""
    if path:
        source, cfg = path, load_config(path)
    elif WORKSPACE_CONFIG.is_file():
        source = f"{WORKSPACE_CONFIG} (the workspace config `matcher demo` wrote; --config FILE to use another)"
        cfg = load_config(WORKSPACE_CONFIG)
    else:
        source, cfg = "embedded defaults (matcher/defaults.toml)", load_config()
    if not _quiet:
        print(f"matcher: config {source}", file=sys.stderr, flush=True)
    return cfg


_quiet = False  # -q: only warnings and errors on stderr (set once by main)


def _lake(cfg: Config, lake_uri: str | None):
    from matcher.io.lake import Lake

    return Lake(lake_uri or cfg.run.lake, cfg.storage)


def _run_dates(args: argparse.Namespace, dates: list[str]) -> int:
    """The pipeline's steps for each date in order (stopping at the first failure), one line per date done."""
    from jobs.context import RunContext
    from jobs.pipeline import parse_steps, run_pipeline
    from jobs.spark import stop_spark

    steps = parse_steps(args.steps)
    with storage_ready(resolve_config(args.config)) as cfg:
        catalog = args.catalog or cfg.run.catalog
        if len(dates) > 1 and "clean" in steps and (undated := undated_catalog_warning(catalog)):
            logging.getLogger("matcher").warning(undated)
        try:
            for date in dates:
                ctx = RunContext(cfg, date, catalog=args.catalog or "", lake_uri=args.lake or "",
                                 model_version=args.model or "")
                run_pipeline(ctx, steps)
                timings = ", ".join(f"{k} {v:.1f}s" for k, v in ctx.timings.items())
                print(f"matcher: {date} done ({timings}); lake {ctx.lake.display('')}", flush=True)
        finally:
            stop_spark()
    return 0


def _records(df) -> list[dict]:
    """A DataFrame's rows as JSON-ready dicts (numpy numbers, dates and arrays as JSON's own types); a float32 value
    as its shortest decimal (0.9, not 0.8999999762)."""
    import numpy as np

    shortest = {c: [None if np.isnan(v) else float(str(v)) for v in df[c].to_numpy()] for c in df.columns
                if df[c].dtype == np.float32}
    return json.loads(df.assign(**shortest).to_json(orient="records", date_format="iso", force_ascii=False,
                                                    double_precision=15))


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def cmd_run(args: argparse.Namespace) -> int:
    return _run_dates(args, [args.date])


def cmd_demo(args: argparse.Namespace) -> int:
    from matcher.app.demo import run_demo

    return run_demo(Path(args.workdir), products=args.products, date=args.date)


def cmd_recommend(args: argparse.Namespace) -> int:
    from matcher.app.search import recommendations_for

    with storage_ready(resolve_config(args.config)) as cfg:
        recs = recommendations_for(_lake(cfg, args.lake), args.product_id, args.date, args.as_of)
    if args.json:
        _print_json({"product_id": args.product_id, "title": recs.attrs["query_title"], "date": recs.attrs["date"],
                     "recommendations": _records(recs)})
        return 0
    print(f"{args.product_id}  {recs.attrs['query_title']}  (published {recs.attrs['date']})")
    for row in recs.itertuples():
        print(f"  {row.rank:>2}. {row.rec_product_id:<12} {row.score:.3f}  {row.title}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from matcher.app.search import search_text

    with storage_ready(resolve_config(args.config)) as cfg:
        hits = search_text(_lake(cfg, args.lake), args.text, k=args.k, date=args.date, by=args.by, as_of=args.as_of)
    if args.json:
        _print_json(_records(hits))
        return 0
    for row in hits.itertuples():
        print(f"  {row.rank:>2}. {row.product_id:<12} {row.score:.3f}  {row.title}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from matcher.io.published import resolve_date
    from matcher.io.registry import SERVED_JUDGED_FIT, current_version

    with storage_ready(resolve_config(args.config)) as cfg:
        lake = _lake(cfg, args.lake)
        date = resolve_date(lake, args.date)
        manifest = lake.manifest(date)
        version = manifest["model_version"]
        train = lake.read_json(lake.stage_stats_file(date, "train")) or {}
        config = lake.read_json(lake.model_file(version, "config")) or {}
        report = {
            "date": date,
            "model_version": version,
            "current_model_version": current_version(lake),
            # The metrics are of the judged fit; the served model may be that recipe refit on every row.
            "served_fit": config.get("served_fit", SERVED_JUDGED_FIT),
            "metrics": lake.read_json(lake.model_file(version, "metrics")),
            "trained_this_date": train.get("model_version"),
            "promotion": train.get("decision"),
            "previous_model_metrics": train.get("previous_metrics"),
        }
    _print_json(report)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from matcher.io.registry import list_models, promote

    with storage_ready(resolve_config(args.config)) as cfg:
        lake = _lake(cfg, args.lake)
        if args.promote:
            warning = promote(lake, args.promote)  # refuses a version that is missing or unreadable
            if warning:
                print(f"matcher: warning: {warning}", file=sys.stderr)
            print(f"current model is now {args.promote}, and the best served model for its encoders: a later night "
                  f"promotes its new model only within train.promotion_tolerance of it. Dates keep the model they "
                  f"trained (or were first scored) with; to rescore one with it: matcher run --date DATE "
                  f"--steps score,publish --model {args.promote}")
            return 0
        models = list_models(lake)
        if args.json:
            _print_json(models)
            return 0
        for m in models:
            recall = f"{m['mean_recall_at_10']:.3f}" if m["mean_recall_at_10"] is not None else "-"
            print(f"{'*' if m['current'] else ' '}{'^' if m['best'] else ' '} {m['version']:<28} "
                  f"trained for {m['trained_for_date']}  mean R@10 {recall}")
        if models:
            print("(* current, ^ best served for its encoders: the model new ones are also compared with)")
        else:
            print(f"no models in {lake.display('')}: the train stage saves one each night", file=sys.stderr)
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    start, end = dt.date.fromisoformat(args.start), dt.date.fromisoformat(args.end)  # checked by date_argument
    if end < start:  # a wrong command line, exit 2, as every other
        args.usage_error(f"argument --to: {args.end} is before --from {args.start}")
    return _run_dates(args, [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)])


def cmd_report(args: argparse.Namespace) -> int:
    from matcher.io.published import resolve_date
    from matcher.io.run_report import render_run_report

    with storage_ready(resolve_config(args.config)) as cfg:
        lake = _lake(cfg, args.lake)
        date = resolve_date(lake, args.date)
        page = render_run_report(lake, date)
    out = Path(args.out or f"matcher-report-{date}.html")
    out.write_text(page, encoding="utf-8")
    print(f"report for {date}: {out.resolve()}")
    return 0


def _read_only(con) -> None:
    """Once the views exist, the SQL may read them and nothing else: no files, URLs, extensions or databases
    (COPY ... TO, read_text, httpfs, ATTACH), no Python variables by name, and no SET that turns any of it back on."""
    con.execute("SET python_enable_replacements = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


_QUERY_STATEMENTS = ("SELECT", "EXPLAIN")  # DESCRIBE, SUMMARIZE, SHOW and PRAGMA version parse as SELECT


def _refuse_non_queries(con, sql: str) -> None:
    """Every statement must be a query; checked before any runs, so `SELECT 1; CREATE ...` runs nothing."""
    statements = con.extract_statements(sql)
    if not statements:  # ";" or a comment alone would print nothing and exit 0, as if the tables were empty
        raise ValueError("matcher query: no statement to run (only semicolons or comments), e.g. "
                         "\"select count(*) from recommendations\"")
    for statement in statements:
        kind = statement.type.name
        if kind not in _QUERY_STATEMENTS:
            kind = "INSTALL or LOAD" if kind == "LOAD" else kind  # DuckDB parses INSTALL as a LOAD statement
            raise ValueError(f"matcher query is read-only: only SELECT (and EXPLAIN) statements run, got {kind}")


def _statement(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty statement: e.g. \"select count(*) from recommendations\"")
    return text


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb
    import pyarrow as pa

    from matcher.io.delta_tables import AsOf, TableVersionError, datasets_as_of, not_logged, version_gone
    from matcher.io.published import published_dataset
    from matcher.io.tables import queryable_tables, table_schema

    as_of = AsOf.parse(args.as_of) if args.as_of else None
    with storage_ready(resolve_config(args.config)) as cfg:
        lake = _lake(cfg, args.lake)
        con = duckdb.connect()
        # Without --as-of: the dates' newest manifests (a night's tables switch together); with it: each table's
        # Delta log at that version or time.
        refusals: dict[str, TableVersionError] = {}  # refused only if the query reads that table
        if as_of is None:
            datasets = {name: published_dataset(lake, name) for name in queryable_tables()}
        else:
            datasets, refusals = datasets_as_of(lake, queryable_tables(), as_of)
        if refusals and not any(d is not None for d in datasets.values()):
            named = [t for t in refusals if re.search(rf"\b{t}\b", args.sql, re.IGNORECASE)]
            raise refusals[(named or list(refusals))[0]]  # a table the query names, to say why
        if not any(d is not None for d in datasets.values()):
            if as_of is not None:
                raise not_logged(lake)
            raise FileNotFoundError(f"nothing published in {lake.display('')}")
        for name, dataset in datasets.items():
            # A table with no rows on any night (nothing quarantined, no search queries) is there with none; with
            # --as-of, a table without a version at that point stays missing, not shown empty.
            if dataset is None and as_of is None:
                dataset = table_schema(name).append(pa.field("dt", pa.string())).empty_table()
            if dataset is not None:
                con.register(name, dataset)
        _read_only(con)
        try:
            _refuse_non_queries(con, args.sql)
            rel = con.sql(args.sql)
            df = rel.fetchdf() if rel is not None else None
        except duckdb.Error as exc:  # the user's SQL: its message, not a traceback
            first_line = str(exc).splitlines()[0]
            missing = next((t for t in refusals if f"Table with name {t} does not exist" in first_line), None)
            if missing is not None:
                raise refusals[missing] from None
            if as_of is not None and isinstance(exc, (duckdb.IOException, duckdb.InvalidInputException)):
                raise version_gone(args.as_of) from None
            raise ValueError(f"query failed: {first_line}") from None
        if df is None:
            return 0
    if args.json:
        _print_json(_records(df))
        return 0
    import pandas as pd

    if df.empty:  # pandas would print "Empty DataFrame / Columns: [...] / Index: []"
        print("  ".join(map(str, df.columns)) + "\n(no rows)")
        return 0
    with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", 20, "display.width", 160,
                           "display.max_colwidth", 60):
        print(df.to_string(index=False, max_rows=args.max_rows))
    return 0


def _print_result(args: argparse.Namespace, summary: object, message: str) -> int:
    """A command's result: its summary as JSON with --json, else its message."""
    if args.json:
        _print_json(summary)
    else:
        print(message)
    return 0


def _describe_tables(names: list[str]) -> tuple[list[dict], str]:
    from matcher.io.tables import describe_table

    docs = [describe_table(name) for name in names]
    blocks = []
    for d in docs:
        kind = ", ".join(k for k in ("published", "queryable") if d[k])
        built = "by its query" if d["query"] else "by code"
        lines = [f"{d['table']}  (the {d['stage']} stage{', ' + kind if kind else ''}; built {built})",
                 f"  {d['description']}",
                 "  columns: " + ", ".join(f"{c} {t}" for c, t in d["columns"].items())]
        if d["query"]:
            lines += ["  query:"] + [f"    {line}" for line in d["query"].splitlines()]
        blocks.append("\n".join(lines))
    return docs, "\n\n".join(blocks)


def cmd_tables(args: argparse.Namespace) -> int:
    from matcher.io.delta_tables import history, migrate_tables, vacuum_tables
    from matcher.io.tables import queryable_tables, tables

    if args.action == "describe":  # the registry alone: no config, no lake
        return _print_result(args, *_describe_tables([args.table] if args.table else list(tables())))
    if args.table and args.table not in queryable_tables():
        raise ValueError(f"table {args.table} has no Delta log (not queryable); those that do: "
                         f"{', '.join(queryable_tables())}")
    with storage_ready(resolve_config(args.config)) as cfg:
        lake = _lake(cfg, args.lake)
        if args.action == "migrate":
            result = migrate_tables(lake, holder="matcher tables migrate")
            summary = {"versions_written": result}
            message = (f"Delta logs written for {', '.join(result)}" if result else
                       "every table with published dates already has a Delta log: nothing to migrate")
        elif args.action == "vacuum":
            keep = cfg.tables.keep_nights if args.keep_nights is None else args.keep_nights
            result = vacuum_tables(lake, keep, holder="matcher tables vacuum")
            summary = {"keep_nights": keep, "files_deleted": result}
            message = f"deleted {sum(result.values())} files replaced over {keep} nights ago: {result}"
        else:
            names = [args.table] if args.table else list(queryable_tables())
            summary = {name: history(lake, name) for name in names}
            message = "\n".join(f"{name}  v{h['version']}  {h['committed_at']}  {h['operation']}"
                                  f"{'  dates ' + h['dates'] if h['dates'] else ''}"
                                  f"{'  by ' + h['by'] if h['by'] else ''}"
                                  for name, versions in summary.items() for h in versions) or "no Delta logs yet"
    return _print_result(args, summary, message)


def cmd_config(args: argparse.Namespace) -> int:
    from matcher.config import config_json_schema, dump_toml, redacted

    if args.action == "schema":
        _print_json(config_json_schema())
        return 0
    try:
        cfg = resolve_config(args.config)  # a config that does not load is refused here, naming each wrong key
        if args.action == "check" and not args.no_files:
            from jobs.pipeline import STAGES
            from jobs.preflight import named_file_problems

            problems = [problem for _, problem in named_file_problems(cfg, STAGES)]
            if problems:  # the files it names: a weights file that does not load would fail the night at extract
                raise ConfigError("; ".join(problems), problems)
    except ConfigError as exc:
        if args.action == "check" and args.json:  # a check's answer on stdout too, for the program that asked
            _print_json({"valid": False, "problems": exc.problems})
        raise
    if args.action == "show":
        summary, message = redacted(cfg), dump_toml(redacted(cfg)).rstrip("\n")
    else:
        summary = {"valid": True, "profile": cfg.run.profile, "catalog": cfg.run.catalog, "lake": cfg.run.lake}
        message = (f"config valid: profile {cfg.run.profile or '(none)'}, catalog {cfg.run.catalog or '(none)'}, "
                   f"lake {cfg.run.lake}")
    return _print_result(args, summary, message)


EXIT_CODES = """exit codes:
  0    done
  1    a permanent failure: bad input, a failed validation or promotion gate, a config error, nothing published
  2    the command line itself is wrong (unknown command or option, a missing argument)
  75   worth retrying: a storage or network outage, a lost executor, the date held by another run (EX_TEMPFAIL)
  130  interrupted (Ctrl-C)
  141  stdout was closed by its reader (e.g. `| head`)"""


def _steps_argument(value: str) -> str:
    from jobs.pipeline import parse_steps
    from jobs.submit import checked_argument

    return checked_argument(parse_steps)(value)


def _whole_number(least: int):
    def parse(value: str) -> int:
        if not value.strip().lstrip("-").isdigit() or int(value) < least:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, got {value!r}")
        return int(value)
    return parse


def _keep_nights_argument(value: str) -> int:
    from matcher.config import MAX_KEEP_NIGHTS

    if not value.isdigit() or int(value) > MAX_KEEP_NIGHTS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_KEEP_NIGHTS} (a Delta log keeps its "
                                         f"versions 30 days), got {value!r}")
    return int(value)


def as_of_argument(p: argparse.ArgumentParser) -> None:
    from jobs.submit import checked_argument
    from matcher.io.delta_tables import AsOf

    p.add_argument("--as-of", metavar="VERSION|DATE|TIME", type=checked_argument(AsOf.parse),
                   help="read each table as its Delta log held it: at that table version (a number, see `matcher "
                        "tables history`), or at a date's end or an ISO time (UTC unless it names a zone); default: "
                        "the newest publish of each date")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("matcher")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from matcher.io.tables import queryable_tables, tables

    parser = argparse.ArgumentParser(prog="matcher", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"matcher {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="log lines as text (default) or as JSON objects with stage, date and run_id fields")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file (default: .matcher/config.toml if present, else defaults)")

    def common(p: argparse.ArgumentParser, with_date: bool = True) -> None:
        config_option(p)
        p.add_argument("--lake", help="lake URI: file:///path or s3://bucket/prefix (default: run.lake of the config)")
        if with_date:
            p.add_argument("--date", type=date_argument, help="published partition YYYY-MM-DD (default: the latest)")

    p = sub.add_parser("run", help="run pipeline stages for one partition date")
    common(p, with_date=False)
    p.add_argument("--catalog", help="catalog folder or s3:// prefix (default: run.catalog of the config); "
                   "{ds} stands for the date, e.g. s3://bucket/catalog/dt={ds}")
    p.add_argument("--date", required=True, type=date_argument, help="partition date YYYY-MM-DD")
    p.add_argument("--steps", type=_steps_argument,
                   help="comma-separated subset of clean,validate,extract,train,score,publish")
    p.add_argument("--model", help="score with this model version instead of the one the date is pinned to")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("demo", help="embedded S3 + demo catalog + the Airflow DAG, then print recommendations")
    p.add_argument("--workdir", default=".matcher", help="where the demo keeps its catalog, S3 data and Airflow home")
    p.add_argument("--products", type=int, default=300, help="products in the drawn demo catalog (default 300)")
    p.add_argument("--date", type=date_argument, default=dt.date.today().isoformat(),
                   help="the demo night's date (default: today)")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("recommend", help="a product's published recommendations")
    common(p)
    p.add_argument("product_id", help="the product whose recommendations to print")
    p.add_argument("--json", action="store_true", help="print JSON (the product, its title, the date and its ranked "
                   "recommendations) instead of lines")
    as_of_argument(p)
    p.set_defaults(handler=cmd_recommend)

    p = sub.add_parser("search", help="text search (English or Chinese) over the published products")
    common(p)
    p.add_argument("text", help="the query, in any language the text encoder reads")
    p.add_argument("-k", type=_whole_number(1), default=10, help="how many products to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the hits as a JSON array instead of lines")
    p.add_argument("--by", choices=("product", "photo"), default="product",
                   help="product: photo and text together (fused vectors); photo: the photos alone, normalised by "
                        "their hubness")
    as_of_argument(p)
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("evaluate", help="held-out metrics of the model behind a published partition, as JSON")
    common(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("models", help="list model versions (* = current), or --promote VERSION to roll back")
    common(p, with_date=False)
    p.add_argument("--promote", metavar="VERSION", help="make VERSION the current model and the one later nights' "
                   "models are compared with (a rollback); dates already scored keep their model (rescore with "
                   "run --steps score,publish --model VERSION)")
    p.add_argument("--json", action="store_true", help="print the models as a JSON array instead of lines")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("backfill", help="run the pipeline for each date of a range, in order, without Airflow")
    common(p, with_date=False)
    p.add_argument("--catalog", help="the dates' catalog; {ds} stands for each date (its own snapshot)")
    p.add_argument("--from", dest="start", required=True, type=date_argument, help="first date YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, type=date_argument, help="last date YYYY-MM-DD (inclusive)")
    p.add_argument("--steps", type=_steps_argument,
                   help="comma-separated subset of clean,validate,extract,train,score,publish")
    p.add_argument("--model", help="score every date with this model version")
    p.set_defaults(handler=cmd_backfill, usage_error=p.error)

    p = sub.add_parser("report", help="write the nightly HTML report of a published partition")
    common(p)
    p.add_argument("--out", help="output HTML file (default matcher-report-DATE.html)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("query", help="SQL (DuckDB) over the published tables: " + ", ".join(queryable_tables())
                       + " (each with a dt column); read-only")
    common(p, with_date=False)
    p.add_argument("sql", type=_statement, help="one or more SELECT (or EXPLAIN) statements")
    p.add_argument("--max-rows", type=_whole_number(1), default=50,
                   help="rows printed at most (default 50; not with --json)")
    p.add_argument("--json", action="store_true", help="print every result row as a JSON array instead of a table")
    as_of_argument(p)
    p.set_defaults(handler=cmd_query)

    p = sub.add_parser("tables", help="the lake's tables: describe each (columns, meaning, query), or their Delta "
                       "Lake logs: migrate a lake published before they had them, vacuum old versions' files, or list "
                       "each table's versions")
    common(p, with_date=False)
    p.add_argument("action", choices=("describe", "history", "migrate", "vacuum"),
                   help="describe: each table's stage, description, columns and types, and the query of a table "
                        "defined by one (schemas/tables.json); history: each table's versions (newest first); "
                        "migrate: give tables with published dates and no log one; vacuum: delete files publishes "
                        "replaced over --keep-nights ago")
    p.add_argument("--table", choices=list(tables()), help="describe or history of this table only")
    p.add_argument("--keep-nights", type=_keep_nights_argument,
                   help="vacuum: nights replaced files stay, 0 to 30 (default: tables.keep_nights)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_tables)
    p = sub.add_parser("config", help="check a config file, show the effective config (secrets hidden), or print "
                       "the JSON Schema of a config file for editors")
    p.add_argument("action", choices=("check", "show", "schema"),
                   help="check: load the config and name every wrong key and every file it names that is missing "
                        "or does not load (exit 1), or say it is valid; show: the effective config, defaults filled "
                        "in, as TOML; schema: the JSON Schema of a config file (types, ranges, choices, defaults, "
                        "each key's comment)")
    config_option(p)
    p.add_argument("--json", action="store_true", help="check and show: print the result as JSON")
    p.add_argument("--no-files", action="store_true",
                   help="check: the keys only, not the files they name (where the check runs on another machine "
                        "than the night, e.g. a CI lint step)")
    p.set_defaults(handler=cmd_config)
    for command in sub.choices.values():  # `matcher run -q` as well as `matcher -q run`
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="only warnings and errors on stderr")
    return parser


_interrupt_said = False


def _interrupted() -> int:
    global _interrupt_said
    if not _interrupt_said:
        print("matcher: interrupted", file=sys.stderr)
        _interrupt_said = True
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """The command line's answer (exit status). A Ctrl-C noted below Python's handlers (matcher.interrupts) may have
    its Python handler (PySpark's, which raises KeyboardInterrupt) run only as the command answers: that late
    KeyboardInterrupt is the same interrupt, 130, not an exit by the signal."""
    global _interrupt_said
    _interrupt_said = False
    try:
        code = _command(argv)
    except KeyboardInterrupt:
        code = _interrupted()
    if code == EXIT_INTERRUPTED and argv is None and threading.current_thread() is threading.main_thread():
        _ignore_further_interrupts()
    return code


def _ignore_further_interrupts() -> None:
    """The process ends now, having answered the interrupt. CPython runs a handler still pending before it replaces
    it, so the handler's KeyboardInterrupt (PySpark's) may come out of signal.signal itself: the same interrupt,
    answered already (uncaught, the process died by the signal, status -2, after saying "interrupted")."""
    for _ in range(3):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


def _command(argv: list[str] | None) -> int:
    global _quiet
    args = build_parser().parse_args(argv)
    _quiet = args.quiet
    configure_logging(logging.WARNING if args.quiet else logging.INFO, args.log_format)
    note_interrupts()
    clear_interrupts()
    try:
        return args.handler(args)
    except BrokenPipeError:  # stdout's reader is gone (`| head`): nothing to say, and nothing to retry
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail too
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        if interrupted():  # whatever the interrupt broke on its way (a Py4J call to a JVM it ended)
            return _interrupted()
        if not isinstance(exc, _user_errors()):
            raise
        from matcher.failures import EXIT_PERMANENT, EXIT_RETRYABLE, classify

        message = " ".join(str(exc).split())
        print(f"matcher: error: {message}", file=sys.stderr)
        # A storage or network outage, or a date another run holds, is worth retrying: say so to a scheduler.
        return EXIT_RETRYABLE if classify(exc).retryable else EXIT_PERMANENT


if __name__ == "__main__":
    sys.exit(main())
