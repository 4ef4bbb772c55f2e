"""The queryable tables (clean, quarantine and every published table) as Delta Lake tables, so that any Delta
reader (deltalake, Spark with Delta, DuckDB's delta extension, Polars, Trino) sees each one atomic and versioned.

Executors keep writing Parquet part files and publish keeps moving them into `<table>/dt=D/`; then the driver
commits each table's date to the table's log: one version that removes the date's previous files and adds the new
ones (no data is read or rewritten on the driver). The run manifest, written after, records each table's version
and stays the switch that moves all of a night's tables together for matcher's own readers. Commits go through the
lake's "tables" lock (dates publish in parallel during a backfill, and S3 has no atomic rename), with a retry when
another writer of the log commits first. A table version's files stay until the vacuum deletes the files publishes
replaced more than `tables.keep_nights` ago (the version before the newest is always kept)."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, create_table_with_add_actions

from matcher.io.lake import Lake
from matcher.io.locks import DateLockedError, waited_lock
from matcher.io.published import NotPublishedError, committed_dates
from matcher.io.tables import queryable_tables, table_schema

log = logging.getLogger("matcher")  # where the stages log (and Airflow task logs add their context)

T = TypeVar("T")
PARTITION = "dt"
TABLES_LOCK_KEY = "tables"  # the lock of every table's Delta log, under _locks/ beside the dates' and "models"
TABLES_LOCK_WAIT_SECONDS = 600.0
COMMIT_ATTEMPTS = 5


class TablesLockedError(DateLockedError):
    """Another publish held the tables' logs longer than a commit waits; a retry may find them free."""


class TableVersionError(LookupError):
    """A version or time a table's log cannot serve (before its first version, or its files vacuumed)."""


def storage_options(lake: Lake) -> dict[str, str] | None:
    """deltalake's options for the lake's store: None for a local lake, the S3 endpoint and keys of the config."""
    if isinstance(lake.fs, pafs.LocalFileSystem):
        return None
    storage = lake.storage
    # Renames on S3 are not atomic: two commits of one version are kept apart by the tables lock instead.
    options = {"AWS_REGION": storage.s3_region, "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    if storage.s3_endpoint:
        options["AWS_ENDPOINT_URL"] = storage.s3_endpoint
        if storage.s3_endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if storage.s3_access_key:
        options.update(AWS_ACCESS_KEY_ID=storage.s3_access_key, AWS_SECRET_ACCESS_KEY=storage.s3_secret_key)
    return options


def table_uri(lake: Lake, table: str) -> str:
    """The table's location as Delta readers name it: a local path, or s3://bucket/prefix/table."""
    path = lake.path(table)
    return path if isinstance(lake.fs, pafs.LocalFileSystem) else "s3://" + path


def delta_schema(table: str, others: list[pa.Field] = ()) -> pa.Schema:
    """The table's columns, then `others` (a catalog's pass-through columns in the clean table), then its
    partition column."""
    return pa.schema([*table_schema(table), *others, pa.field(PARTITION, pa.string())])


def _columns_beyond_registry(table: str, schemas: list[pa.Schema]) -> list[pa.Field]:
    """The columns these schemas hold that the table's registry entry does not name (the partition column aside),
    each once, in the order first seen: in the clean table, the catalog's other columns, which pass through."""
    named = set(delta_schema(table).names)
    out: dict[str, pa.Field] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in named and f.name not in out:
                out[f.name] = f
    return list(out.values())


def _logged_schemas(delta: DeltaTable | None) -> list[pa.Schema]:
    """The schema the log holds, as a list to add the new files' to (empty without a log)."""
    return [] if delta is None else [pa.schema(delta.schema().to_arrow())]


def logged_columns(lake: Lake, table: str) -> list[str]:
    """The columns the table's log holds (none without a log): a night's pass-through columns take their spelling."""
    return [name for schema in _logged_schemas(open_table(lake, table)) for name in schema.names]


def _case_clashes(table: str, schemas: list[pa.Schema]) -> list[tuple[str, str]]:
    """Pairs of the table's columns that differ only in case: Delta Lake (and Spark) hold names without case."""
    seen: dict[str, str] = {}
    clashes = []
    for name in delta_schema(table, _columns_beyond_registry(table, schemas)).names:
        if name.lower() in seen:
            clashes.append((seen[name.lower()], name))
        seen.setdefault(name.lower(), name)
    return clashes


def open_table(lake: Lake, table: str, version: int | None = None) -> DeltaTable | None:
    """The table's log at its newest version (or `version`); None when the table has no log yet."""
    if not lake.exists(Lake.delta_log_dir(table)):
        return None
    try:
        return DeltaTable(table_uri(lake, table), version=version, storage_options=storage_options(lake))
    except TableNotFoundError:
        return None


class FileRecord(NamedTuple):
    """One part file as the log records it, and the columns its footer holds."""
    add: AddAction
    schema: pa.Schema


def _file_record(lake: Lake, table: str, dt: str, file: str) -> FileRecord:
    """The log's record of one part file (lake-relative path): size, time and row count from the store and the
    file's footer (one read), and the footer's columns."""
    info = lake.fs.get_file_info(lake.path(file))
    meta = pq.read_metadata(lake.path(file), filesystem=lake.fs)
    mtime = info.mtime or _dt.datetime.now(_dt.timezone.utc)
    return FileRecord(AddAction(file[len(table) + 1:], info.size, {PARTITION: dt}, int(mtime.timestamp() * 1000),
                                True, json.dumps(file_statistics(meta))), meta.schema.to_arrow_schema())


# Columns whose bounds the log records, so Delta readers skip files on a filter (product_id = 'X'): whole numbers
# and strings of at most this many characters (a longer bound would need rounding to stay a bound), not floats,
# whose NaN the footers' bounds leave out.
_BOUND_STRING_CHARS = 64


def file_statistics(meta: pq.FileMetaData) -> dict:
    """A part file's Delta statistics from its Parquet footer: its rows, and per top-level column its nulls and,
    for whole numbers and short strings, its smallest and largest value over every row group."""
    stats: dict = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}  # the footer indexes leaf columns
    for field in meta.schema.to_arrow_schema():
        if pa.types.is_nested(field.type) or field.name not in leaves:
            continue
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        chunks = [(g.column(leaves[field.name]).statistics, g.num_rows) for g in groups]
        if any(c is None for c, _ in chunks):
            continue
        if all(c.has_null_count for c, _ in chunks):
            stats["nullCount"][field.name] = sum(c.null_count for c, _ in chunks)
        # A row group without bounds (a value too long for the writer to keep them) leaves the file unbounded,
        # unless it holds nulls alone.
        if not all(c.has_min_max or (c.has_null_count and c.null_count == rows) for c, rows in chunks):
            continue
        bounded = [c for c, _ in chunks if c.has_min_max]
        if not (pa.types.is_integer(field.type) or pa.types.is_string(field.type)) or not bounded:
            continue
        low, high = min(c.min for c in bounded), max(c.max for c in bounded)
        if pa.types.is_string(field.type) and max(len(low), len(high)) > _BOUND_STRING_CHARS:
            continue
        stats["minValues"][field.name], stats["maxValues"][field.name] = low, high
    return stats


class Logged(NamedTuple):
    """A table's date as its log now holds it: the version committed, the rows it added and the columns of its
    first file's footer (None: no files)."""
    version: int
    rows: int
    schema: pa.Schema | None


def _commit(lake: Lake, table: str, records_by_date: dict[str, list[FileRecord]], by: str,
            current: DeltaTable | None = None) -> int:
    """One version of the table that replaces the given dates' files by `records_by_date`; returns the version.
    Its schema: the registry's columns, then every other column the log already shows (other dates' files still
    hold them) and those the new files hold, so that a catalog's pass-through columns are seen by every Delta
    reader. The commit's metadata names the dates and the writer (`matcher tables history` shows them).
    `current`: the log as the caller has just loaded it (None: loaded here)."""
    uri, options = table_uri(lake, table), storage_options(lake)
    records = [r for rs in records_by_date.values() for r in rs]
    adds = [r.add for r in records]
    dates = sorted(records_by_date)
    about = CommitProperties(custom_metadata={"matcher.dates": ",".join(dates), "matcher.by": by})
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            if current is None or attempt > 0:  # a retry reads the log the other writer committed to
                current = open_table(lake, table)
            logged = _logged_schemas(current)
            schema = delta_schema(table, _columns_beyond_registry(table, [*logged, *(r.schema for r in records)]))
            if current is None:
                create_table_with_add_actions(uri, Schema.from_arrow(schema), adds, mode="append",
                                              partition_by=[PARTITION], name=table, storage_options=options,
                                              commit_properties=about)
                return open_table(lake, table).version()
            if _logged_paths(current, dates) == {a.path for a in adds}:
                # The dates' files as logged (a rescore publishing the clean stage's files again): an overwrite
                # would add and remove each path in one commit, which readers replaying actions in order (Spark)
                # read as removed. A commit of no files keeps the version numbers of every table in step.
                current.create_write_transaction([], mode="append", schema=schema, partition_by=[PARTITION],
                                                 commit_properties=about)
            else:
                current.create_write_transaction(adds, mode="overwrite", schema=schema, partition_by=[PARTITION],
                                                 partition_filters=[(PARTITION, "in", dates)],
                                                 commit_properties=about)
            current.update_incremental()  # reads only the commit just made
            return current.version()
        except CommitFailedError:
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2 ** attempt * (0.5 + random.random()))  # noqa: S311 (jitter)
    raise AssertionError("unreachable")


def _logged_paths(delta: DeltaTable, dates: list[str]) -> set[str]:
    """The paths (relative to the table) of the files the log holds for these dates."""
    actions = delta.get_add_actions(flatten=True)
    in_dates = set(dates)
    return {path for path, dt in zip(actions.column("path").to_pylist(),
                                     actions.column(f"partition.{PARTITION}").to_pylist()) if dt in in_dates}


def commit_night(lake: Lake, dt: str, files: dict[str, list[str]], holder: str) -> dict[str, Logged]:
    """Commit each table's files (lake-relative, already in the date's folder) as the date's whole partition of that
    table: one version per table, under the tables lock. Returns each table's new version and rows (from the
    footers the log's records are made of). A lake published before its tables had logs is migrated first, so a
    table's log never lacks a published date."""
    records = {table: [_file_record(lake, table, dt, f) for f in table_files] for table, table_files in files.items()}
    with waited_lock(lake, TABLES_LOCK_KEY, holder, TABLES_LOCK_WAIT_SECONDS, TablesLockedError, "the tables' logs"):
        opened = {table: open_table(lake, table) for table in queryable_tables()}
        for table, table_records in records.items():  # every table checked before any commits: none or all
            clashes = _case_clashes(table, [*_logged_schemas(opened.get(table)), *(r.schema for r in table_records)])
            if clashes:
                raise ValueError(f"table {table}: the night's columns clash with the logged ones but for case "
                                 f"({', '.join(f'{a!r} and {b!r}' for a, b in clashes)}); Delta Lake holds names "
                                 "without case: rename the catalog's column, or rerun the stages from clean (it "
                                 "takes the logged spelling)")
            if opened.get(table) is not None:
                logged, night = _logged_paths(opened[table], [dt]), {r.add.path for r in table_records}
                if logged & night and logged != night:  # an overwrite would add and remove a path in one commit
                    raise ValueError(f"table {table}: the night keeps {sorted(logged & night)[0]} of {dt}'s logged "
                                     "files and replaces others; a date's files are published whole")
        migrated = _migrate(lake, [table for table, delta in opened.items() if delta is None], holder)

        def version(table: str, table_records: list[FileRecord]) -> int:
            delta = None if table in migrated else opened.get(table)
            if delta is not None and _newest_commit_is(delta, holder, dt):
                return delta.version()  # a retry of this publish: committed by its first try, not again
            return _commit(lake, table, {dt: table_records}, holder, delta)

        return {table: Logged(version(table, table_records),
                              sum(json.loads(r.add.stats)["numRecords"] for r in table_records),
                              table_records[0].schema if table_records else None)
                for table, table_records in records.items()}


def _newest_commit_is(delta: DeltaTable, holder: str, dt: str) -> bool:
    newest = delta.history(limit=1)
    return bool(newest) and newest[0].get("matcher.by") == holder and newest[0].get("matcher.dates") == dt


def migrate_tables(lake: Lake, holder: str) -> dict[str, int]:
    """Give every queryable table that has published dates but no log one: a first version holding the files each
    date's manifest names. Tables that have a log are left as they are. Returns the versions written."""
    with waited_lock(lake, TABLES_LOCK_KEY, holder, TABLES_LOCK_WAIT_SECONDS, TablesLockedError, "the tables' logs"):
        return _migrate(lake, [t for t in queryable_tables() if open_table(lake, t) is None], holder)


def _migrate(lake: Lake, pending: list[str], holder: str) -> dict[str, int]:
    """migrate_tables for these tables (without a log), under the tables lock the caller holds."""
    written = {}
    dates = committed_dates(lake) if pending else []
    for table in pending:
        adds = {}
        for dt in dates:
            published = lake.published_files(table, dt)
            if published is not None:
                adds[dt] = [_file_record(lake, table, dt, lake.relative(f)) for f in published]
        if adds:
            written[table] = _commit(lake, table, adds, f"{holder} (migration)")
            log.info("tables: %s now has a Delta log (%d published dates, version %d)", table, len(adds),
                     written[table])
    return written


def vacuum_tables(lake: Lake, keep_nights: int, holder: str) -> dict[str, int]:
    """Delete the files that publishes replaced more than `keep_nights` nights ago, except those of each table's
    version before its newest (a reader that opened it finishes). Returns the files deleted per table."""
    if keep_nights < 0:
        raise ValueError(f"keep_nights must be >= 0, got {keep_nights}")
    deleted = {}
    with waited_lock(lake, TABLES_LOCK_KEY, holder, TABLES_LOCK_WAIT_SECONDS, TablesLockedError, "the tables' logs"):
        for table in queryable_tables():
            delta = open_table(lake, table)
            if delta is None:
                continue
            keep = [delta.version() - 1] if delta.version() > 0 else []
            # deltalake lists the files and matcher deletes them: its own vacuum commits VACUUM START and END to
            # each table it cleans, which would put the tables' version numbers out of step (--as-of VERSION
            # reads every table at one number).
            files = delta.vacuum(retention_hours=24 * keep_nights, dry_run=True, enforce_retention_duration=False,
                                 keep_versions=keep)
            for file in files:
                lake.delete_file_quietly(f"{table}/{file}")
            deleted[table] = len(files)
    return deleted


@dataclass(frozen=True)
class AsOf:
    """A point in a table's history: a version of its log, or a time (the newest version committed by then)."""
    version: int | None = None
    time: _dt.datetime | None = None

    @staticmethod
    def parse(text: str) -> "AsOf":
        """A version number, an ISO date (its end, UTC) or an ISO date and time (UTC unless it names a zone)."""
        text = text.strip()
        if text.isdigit():
            return AsOf(version=int(text))
        try:
            if len(text) == 10:
                when = _dt.datetime.fromisoformat(text) + _dt.timedelta(days=1, microseconds=-1)
            else:
                when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"--as-of takes a table version (e.g. 3), a date (2026-01-02) or a time "
                             f"(2026-01-02T06:00:00Z), got {text!r}") from None
        return AsOf(time=when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc))


def table_as_of(lake: Lake, table: str, as_of: AsOf) -> DeltaTable | None:
    """The table's log loaded at `as_of`; None when the table has no log. Raises TableVersionError for a point
    before its first version."""
    delta = open_table(lake, table)
    if delta is None:
        return None
    point = as_of.version if as_of.version is not None else as_of.time.isoformat()
    newest = delta.version()

    def first_commit() -> dict:  # the whole history is read only for a time, or to explain a refusal
        return min(delta.history(), key=lambda h: h["version"])

    def refused(why: str, first: dict) -> TableVersionError:
        return TableVersionError(f"table {table} has no version as of {point} (its log holds versions "
                                 f"{first['version']} to {newest}): {why}")

    if as_of.time is not None:
        first = first_commit()
        if as_of.time.timestamp() * 1000 < first["timestamp"]:  # deltalake would load its first version instead
            created = _dt.datetime.fromtimestamp(first["timestamp"] / 1000, _dt.timezone.utc)
            raise refused(f"its first version was committed at {created:%Y-%m-%dT%H:%M:%SZ}", first)
    if as_of.version is not None and as_of.version > newest:
        raise refused("no publish has made that version yet", first_commit())
    try:
        delta.load_as_version(as_of.version if as_of.version is not None else as_of.time)
    except Exception as exc:  # deltalake raises its generic error for a version it does not have
        raise refused(str(exc).splitlines()[0], first_commit()) from None
    return delta


# The table whose commit a version number names: every publish commits each table once, so the tables' versions
# agree, except in a table a later release added (its log began later) or a lake an earlier release vacuumed (its
# vacuum committed to some tables only).
REFERENCE_TABLE = "recommendations"


def _visible_commit(lake: Lake, table: str, version: int) -> tuple[str, str] | None:
    """(writer, dates) of the newest of matcher's commits at or before `version`: the publish (or migration) whose
    data that version shows (a vacuum's commits change none). From the newest log: deltalake numbers the history of
    a table loaded at an older version its own way."""
    delta = open_table(lake, table)
    for limit in (delta.version() - version + 16, None):  # most often a few commits back; else the whole log
        for h in sorted(delta.history(limit=limit), key=lambda h: -h["version"]):
            if h["version"] <= version and h.get("matcher.by"):
                return h["matcher.by"], h.get("matcher.dates")
    return None


def datasets_as_of(lake: Lake, tables: list[str], as_of: AsOf
                   ) -> tuple[dict[str, ds.Dataset | None], dict[str, TableVersionError]]:
    """Each table as it was at `as_of` (None: no log), as an Arrow dataset over that version's files with its `dt`
    column (DuckDB, pandas and Polars read it as is), and the tables refused with why: a point before a table's
    log, or a version number whose data in that table is another night's than in the reference table, so that a
    query over several tables never mixes two nights."""
    loaded: dict[str, DeltaTable | None] = {}
    refused: dict[str, TableVersionError] = {}
    for table in tables:
        try:
            loaded[table] = table_as_of(lake, table, as_of)
        except TableVersionError as exc:
            refused[table] = exc
    present = [t for t in loaded if loaded[t] is not None]
    if present:
        # A version number, or a time inside a publish (it commits the tables in turn, milliseconds apart).
        reference = REFERENCE_TABLE if REFERENCE_TABLE in present else present[0]
        want = _visible_commit(lake, reference, loaded[reference].version())
        for table in (t for t in present if t != reference):
            got = _visible_commit(lake, table, loaded[table].version())
            if got is None or want is None or got != want:
                why = ("the tables' version numbers differ there; read it --as-of a date or time (the same moment "
                       "in every table)" if as_of.version is not None else
                       "a publish was committing the tables at that time; read it --as-of a moment before or after")
                refused[table] = TableVersionError(
                    f"as of {as_of.version if as_of.version is not None else as_of.time.isoformat()} table {table} "
                    f"shows another publish than {reference} (their data was last written by {got!r} and "
                    f"{want!r}): {why}")
    return {t: (None if d is None else d.to_pyarrow_dataset()) for t, d in loaded.items() if t not in refused}, refused


def not_logged(lake: Lake) -> LookupError:
    """Why a table has no log to read --as-of: a lake published before the tables had logs, or nothing published."""
    if committed_dates(lake):
        return TableVersionError(f"the tables in {lake.display('')} have no Delta logs yet (published before they "
                                 "had them): run `matcher tables migrate`, then --as-of")
    return NotPublishedError(f"nothing published in {lake.display('')}: run the pipeline first")


def version_gone(point: str) -> TableVersionError:
    return TableVersionError(f"--as-of {point}: a file of that version is gone; `matcher tables vacuum` deletes the "
                             "files of versions replaced more than tables.keep_nights nights ago")


class TablesAsOf:
    """The published tables as they were at `as_of` (datasets_as_of), read a date at a time as
    published.NewestManifests reads the dates' newest manifests: what `matcher recommend` and `search` read with
    --as-of. A refused table raises its refusal when it is read."""

    def __init__(self, lake: Lake, tables: list[str], as_of: AsOf, point: str):
        self.lake, self.point = lake, point
        self.datasets, self.refused = datasets_as_of(lake, tables, as_of)

    def _dataset(self, table: str) -> ds.Dataset:
        if table in self.refused:
            raise self.refused[table]
        dataset = self.datasets.get(table)
        if dataset is None:
            raise not_logged(self.lake)
        return dataset

    def resolve_date(self, date: str | None) -> str:
        """`date`, or the newest date, of the reference table's partitions at that version."""
        dates = sorted({ds.get_partition_keys(f.partition_expression).get("dt")
                        for f in self._dataset(REFERENCE_TABLE).get_fragments()} - {None})
        if not dates:
            raise NotPublishedError(f"nothing was published as of {self.point}")
        if date is None:
            return dates[-1]
        if date not in dates:
            raise NotPublishedError(f"no published partition for {date} as of {self.point}; published then: "
                                    f"{', '.join(dates[-5:])}")
        return date

    def read(self, table: str, date: str, columns: list[str] | None = None,
             filters: list[tuple] | None = None) -> pa.Table:
        where = ds.field("dt") == date
        if filters:
            where = where & pq.filters_to_expression(filters)
        dataset = self._dataset(table)
        if columns is None:  # the files' columns, as read_published reads them: dt is the date asked for
            columns = [n for n in dataset.schema.names if n != "dt"]
        try:
            return dataset.to_table(columns=columns, filter=where)
        except FileNotFoundError:
            raise version_gone(self.point) from None

    def scan(self, table: str, date: str, columns: list[str], consume: Callable[[Iterator[pa.RecordBatch]], T],
             batch_rows: int) -> T:
        """consume(the date's rows of `table` at that version in batches of at most `batch_rows`), as
        published.NewestManifests.scan."""
        # One file, one batch ahead, not pre-buffered: by default pyarrow holds several files' row groups.
        batches = self._dataset(table).to_batches(
            columns=columns, filter=ds.field("dt") == date, batch_size=batch_rows, batch_readahead=1,
            fragment_readahead=1, fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False))
        try:
            return consume(batches)
        except FileNotFoundError:
            raise version_gone(self.point) from None


def history(lake: Lake, table: str) -> list[dict]:
    """The table's versions, newest first: version, commit time (UTC), operation, the dates it replaced and by
    whom (for commits matcher made)."""
    delta = open_table(lake, table)
    if delta is None:
        return []
    return [{"version": h["version"],
             "committed_at": _dt.datetime.fromtimestamp(h["timestamp"] / 1000, _dt.timezone.utc)
             .isoformat(timespec="seconds"),
             "operation": h.get("operation"), "dates": h.get("matcher.dates"), "by": h.get("matcher.by")}
            for h in delta.history()]
