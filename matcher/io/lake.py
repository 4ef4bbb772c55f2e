"""The lake: Hive-partitioned Parquet tables, JSON documents and model files under one root (local or S3).

This module is the only one that spells the lake's layout:
  <table>/dt=YYYY-MM-DD/part-<attempt>-<n>.parquet  a partition's part files, written by executors
  <table>/dt=YYYY-MM-DD/_committed.json            an internal table's commit point (clean, quarantine,
                                                   features): the files and rows of the run's latest attempt,
                                                   what the later stages of the run read
  <table>/_delta_log/                              a queryable table's Delta Lake log: each publish of a date is
                                                   one version of the table (matcher.io.delta_tables)
  manifests/dt=YYYY-MM-DD/manifest.json            the run manifest: the commit point of a published partition,
                                                   naming the files readers see (clean and quarantine included)
                                                   and those of the generation it replaced
  _work/dt=YYYY-MM-DD/<attempt>/<table>/...        part files being written; moved in by the commit
  _staging/dt=YYYY-MM-DD/<table>.json              parts written by `score`, made visible by `publish`
  _runs/dt=YYYY-MM-DD/<stage>.json                 per-stage statistics of a run
  validation/dt=YYYY-MM-DD/, reports/dt=YYYY-MM-DD/ the validation result and the nightly report
  models/<version>/..., models/current.json        versioned models and the promoted one
  models/served.json                               every promotion and the best served model per encoder pair
  _locks/dt=YYYY-MM-DD/, _locks/dt=models/,        the date locks and run claims; the model registry's lock;
  _locks/dt=tables/                                the lock of the tables' Delta logs
Readers go through the commit point, so a partition is seen whole or not at all. A partition's files stay while
a commit point names them: the commit file, the manifest, the manifest's record of the generation it replaced (a
reader that opened the previous manifest can finish while the date is published again), or a table version its Delta
log still holds (the log's vacuum deletes those, after tables.keep_nights). Documents are replaced
whole: on S3 a PUT is atomic; on a local disk they are written aside, synced and renamed over the old one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import posixpath
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from matcher.config import StorageConfig
from matcher.io.storage import exists, read_bytes, resolve_uri, write_bytes
from matcher.io.tables import published_tables, table_schema

COMMIT_FILE = "_committed.json"
_PARTITION_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def partition_date(text: str) -> _dt.date:
    """A partition's date, written YYYY-MM-DD and nothing else: Python reads 20260101 and 2026-W01-4 as ISO dates
    too, and a partition named so would sort after every dashed one and pass for the latest."""
    if _PARTITION_DATE.fullmatch(text):
        try:
            return _dt.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"no such date: {text!r} (YYYY-MM-DD, a month and day that exist)") from None
    raise ValueError(f"date must be YYYY-MM-DD, got {text!r}")


def new_attempt_id() -> str:
    """A sortable, unique name for one write of a partition."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _empty(table_name: str, columns: list[str] | None) -> pa.Table:
    schema = table_schema(table_name)
    return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()


class Lake:
    def __init__(self, uri: str, storage: StorageConfig):
        self.uri = uri
        self.storage = storage
        self.fs, self.root = resolve_uri(uri, storage)

    def __reduce__(self):
        # Executors rebuild the lake (and its filesystem) from the URI; a local one by its absolute path, since an
        # executor's working directory is not the driver's.
        uri = self.uri if self.uri.startswith(("s3://", "s3a://")) else "file://" + self.root
        return (Lake, (uri, self.storage))

    # paths (lake-relative unless named *_path) ---------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def partition_path(self, table: str, dt: str) -> str:
        return self.path(self.partition_dir(table, dt))

    @staticmethod
    def partition_dir(table: str, dt: str) -> str:
        return f"{table}/dt={dt}"

    MANIFESTS_DIR = "manifests"
    MANIFEST_NAME = "manifest.json"

    @staticmethod
    def manifest_file(dt: str) -> str:
        return f"{Lake.MANIFESTS_DIR}/dt={dt}/{Lake.MANIFEST_NAME}"

    @staticmethod
    def stage_stats_file(dt: str, stage: str) -> str:
        return f"_runs/dt={dt}/{stage}.json"

    @staticmethod
    def validation_dir(dt: str) -> str:
        return f"validation/dt={dt}"

    @staticmethod
    def validation_result_file(dt: str) -> str:
        return f"{Lake.validation_dir(dt)}/result.json"

    @staticmethod
    def validation_report_file(dt: str) -> str:
        return f"{Lake.validation_dir(dt)}/report.html"

    @staticmethod
    def report_file(dt: str) -> str:
        return f"reports/dt={dt}/report.html"

    MODELS_DIR = "models"
    CURRENT_MODEL_FILE = "models/current.json"
    SERVED_MODELS_FILE = "models/served.json"
    # A model's files: its weights, the spec and training settings, held-out metrics, training history, report.
    MODEL_FILES = {"weights": "model.safetensors", "judged_weights": "judged_model.safetensors",
                   "config": "config.json", "metrics": "metrics.json", "history": "history.json",
                   "report": "report.html"}

    @staticmethod
    def model_dir(version: str) -> str:
        return f"{Lake.MODELS_DIR}/{version}"

    @staticmethod
    def model_file(version: str, kind: str) -> str:
        """One of a model's files by kind (Lake.MODEL_FILES): `weights` (the model served), `judged_weights` (the
        fit its metrics are of, when the served model is a refit on every row), `config`, `metrics`, `history`,
        `report`."""
        return f"{Lake.model_dir(version)}/{Lake.MODEL_FILES[kind]}"

    @staticmethod
    def work_dir(table: str, dt: str, attempt: str) -> str:
        return f"_work/dt={dt}/{attempt}/{table}"

    @staticmethod
    def part_file(table: str, dt: str, attempt: str, tag: str) -> str:
        """A part file an executor writes for an attempt; moved into the partition by the commit."""
        return f"{Lake.work_dir(table, dt, attempt)}/part-{tag}.parquet"

    @staticmethod
    def lock_dir(dt: str) -> str:
        return f"_locks/dt={dt}"

    # A lock folder's files (matcher.io.locks holds the protocol): the lease of each holder or contender, the highest
    # token handed out, the run claim, and revoked leases kept for the record.
    LEASE_NAME = re.compile(r"^(\d+)-[^/]*\.json$")

    @staticmethod
    def lease_file(dt: str, token: int, nonce: str) -> str:
        return f"{Lake.lock_dir(dt)}/{token:012d}-{nonce}.json"

    @staticmethod
    def lock_token_file(dt: str) -> str:
        return f"{Lake.lock_dir(dt)}/_token.json"

    @staticmethod
    def run_claim_file(dt: str) -> str:
        return f"{Lake.lock_dir(dt)}/_run.json"

    @staticmethod
    def revoked_dir(dt: str) -> str:
        return f"{Lake.lock_dir(dt)}/_revoked"

    DELTA_LOG_DIR = "_delta_log"

    @staticmethod
    def delta_log_dir(table: str) -> str:
        return f"{table}/{Lake.DELTA_LOG_DIR}"

    SPARK_EVENTS_DIR = "_spark_events"  # Spark's event logs of the nights run in cluster mode (the history server)

    @staticmethod
    def staged_file(table: str, dt: str) -> str:
        return f"_staging/dt={dt}/{table}.json"

    def manifest(self, dt: str) -> dict | None:
        return self.read_json(self.manifest_file(dt))

    # partitions ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _part_names(table: str, dt: str, parts: list[str], attempt: str) -> list[tuple[str, str]]:
        """Each part file (lake-relative) and the name it takes in the partition folder."""
        return [(rel, posixpath.join(table, f"dt={dt}", f"part-{attempt}-{n:05d}.parquet"))
                for n, rel in enumerate(sorted(parts))]

    def _move_parts_in(self, table: str, dt: str, moves: list[tuple[str, str]]) -> list[str]:
        """Move part files (lake-relative) into the partition folder under the names _part_names gave them; returns
        their new paths."""
        self.fs.create_dir(self.partition_path(table, dt), recursive=True)
        for rel, final in moves:
            self.fs.move(self.path(rel), self.path(final))
        return [final for _, final in moves]

    def commit_parts(self, table: str, dt: str, parts: list[str], attempt: str) -> dict:
        """Commit an internal table's partition: the part files move in beside the previous ones, the commit file
        naming them is the switch for the run's later stages, then the files no commit point names go (those a
        published manifest names stay: readers of the date see them until publish names others). Returns the
        commit document."""
        files = self._move_parts_in(table, dt, self._part_names(table, dt, parts, attempt))
        rows = sum(pq.read_metadata(self.path(f), filesystem=self.fs).num_rows for f in files)
        doc = {"table": table, "dt": dt, "attempt": attempt, "files": files, "rows": rows}
        self.write_json(posixpath.join(table, f"dt={dt}", COMMIT_FILE), doc)
        self.remove_dead_files(table, dt)
        self._delete_quietly(self.path(self.work_dir(table, dt, attempt)))  # unlisted files of failed task attempts
        return doc

    def committed(self, table: str, dt: str) -> dict | None:
        return self.read_json(posixpath.join(table, f"dt={dt}", COMMIT_FILE))

    def committed_attempt(self, table: str, dt: str) -> dict | None:
        """The attempt a table's commit file names and a fingerprint of what it commits (attempt, files, rows):
        what the validation result records, and what later stages and publish compare with before using it."""
        doc = self.committed(table, dt)
        if doc is None:
            return None
        body = {k: doc.get(k) for k in ("table", "dt", "attempt", "rows")} | {"files": sorted(doc.get("files", []))}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
        return {"attempt": doc.get("attempt"), "fingerprint": digest}

    def live_files(self, table: str, dt: str) -> set[str]:
        """A partition's files (lake-relative) that a commit point names: its commit file (and the files it names),
        the date's manifest and the generation that manifest replaced."""
        live = {posixpath.join(table, f"dt={dt}", COMMIT_FILE)}
        live |= set((self.committed(table, dt) or {}).get("files", []))
        manifest = self.manifest(dt) or {}
        live |= set(((manifest.get("tables") or {}).get(table) or {}).get("files") or [])
        live |= set(((manifest.get("previous") or {}).get("tables") or {}).get(table) or [])
        return live | self.delta_logged_files(table, dt)

    def delta_logged_files(self, table: str, dt: str) -> set[str]:
        """A partition's files (lake-relative) that the table's Delta log adds or removes in any commit it still
        holds: the versions of the date that time travel can read until the vacuum deletes their files."""
        log_dir = self.path(self.delta_log_dir(table))
        if not exists(self.fs, log_dir):
            return set()
        prefix = f"dt={dt}/"
        named: set[str] = set()
        for info in self.fs.get_file_info(pafs.FileSelector(log_dir, recursive=False)):
            if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
                continue
            for line in read_bytes(self.fs, info.path).decode().splitlines():
                if prefix not in line:
                    continue
                action = json.loads(line)
                path = (action.get("add") or action.get("remove") or {}).get("path", "")
                if path.startswith(prefix):
                    named.add(posixpath.join(table, path))
        return named

    def remove_dead_files(self, table: str, dt: str) -> int:
        """Delete a partition's files that no commit point names: generations before the previous published one,
        attempts superseded before publish, parts of writes that never committed."""
        return self.remove_unlisted_files(table, dt, keep=self.live_files(table, dt))

    def write_partition(self, table_name: str, dt: str, table: pa.Table) -> dict:
        """Write a small table from this process as one part file and commit it (tests, tiny tables)."""
        attempt = new_attempt_id()
        part = posixpath.join(self.work_dir(table_name, dt, attempt), "part-0.parquet")
        self.fs.create_dir(self.path(posixpath.dirname(part)), recursive=True)
        pq.write_table(table, self.path(part), filesystem=self.fs, compression="zstd")
        return self.commit_parts(table_name, dt, [part], attempt)

    def partition_files(self, table_name: str, dt: str) -> list[str]:
        """A partition's files (full paths) as the run's stages see them: for a published table those its run
        manifest names, for an internal table those its commit file names (the run's latest attempt, which for
        clean and quarantine may not be published yet: readers of a published date use `published_files`); files
        of an unfinished write are never listed."""
        return [self.path(f) for f in (self._partition_doc(table_name, dt) or {}).get("files", [])]

    def _partition_doc(self, table_name: str, dt: str) -> dict | None:
        """What names a partition's files and rows: the manifest's entry of a published table, the commit file of
        an internal one."""
        if table_name in published_tables():
            return ((self.manifest(dt) or {}).get("tables") or {}).get(table_name)
        return self.committed(table_name, dt)

    @staticmethod
    def manifest_table_files(manifest: dict | None, table_name: str) -> list[str] | None:
        """The files (lake-relative) a manifest names for a table; None when it names none (a manifest written
        before clean and quarantine were published by name lists only their rows)."""
        files = (((manifest or {}).get("tables") or {}).get(table_name) or {}).get("files")
        return None if files is None else list(files)

    def published_files(self, table_name: str, dt: str, manifest: dict | None = None) -> list[str] | None:
        """The files (full paths) readers of a published date see for a table: those the date's manifest (given,
        or read now) names; None when the date or the table is not published. clean and quarantine of a manifest
        from before they were named fall back to their commit file."""
        manifest = self.manifest(dt) if manifest is None else manifest
        if manifest is None:
            return None
        files = self.manifest_table_files(manifest, table_name)
        if files is None and table_name not in published_tables() and table_name in (manifest.get("tables") or {}):
            files = (self.committed(table_name, dt) or {}).get("files")
        return None if files is None else [self.path(f) for f in files]

    def read_files(self, table_name: str, files: list[str], columns: list[str] | None = None,
                   filters: list[tuple] | None = None) -> pa.Table:
        """Parquet files (full paths) of one table read in this process, the rows `filters` keep (pyarrow's DNF;
        row groups whose footer bounds rule them out are not read); no files: the table's empty form."""
        if not files:
            return _empty(table_name, columns)
        tables = [pq.read_table(f, filesystem=self.fs, columns=columns, filters=filters) for f in files]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")

    def partition_rows(self, table_name: str, dt: str) -> int:
        """Rows of a committed partition: as its commit file or the date's manifest counted them from the files it
        names (one read, where a catalog of millions has a thousand files), else from the Parquet footers."""
        doc = self._partition_doc(table_name, dt) or {}
        rows = doc.get("rows")
        if isinstance(rows, int) and not isinstance(rows, bool) and "files" in doc:
            return rows
        return sum(pq.read_metadata(self.path(f), filesystem=self.fs).num_rows for f in doc.get("files", []))

    def read_partition(self, table_name: str, dt: str, columns: list[str] | None = None) -> pa.Table | None:
        """The whole partition in this process: for small tables and tests; stages read through Spark."""
        files = self.partition_files(table_name, dt)
        if not files:
            committed = self.committed(table_name, dt) if table_name not in published_tables() else self.manifest(dt)
            if committed is None:
                return None
        return self.read_files(table_name, files, columns)

    def partitions(self, table_name: str) -> list[str]:
        """Dates (YYYY-MM-DD) with a committed partition of an internal table, ascending."""
        return self.partitions_with_file(table_name, COMMIT_FILE)

    def partitions_with_file(self, prefix: str, file_name: str) -> list[str]:
        base = self.path(prefix)
        if not exists(self.fs, base):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        dates = [i.base_name[3:] for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("dt=")]
        return sorted(d for d in dates if exists(self.fs, posixpath.join(base, f"dt={d}", file_name)))

    def stage_parts(self, table_name: str, dt: str, parts: list[str]) -> None:
        """Record a published table's parts (written under _work) for publish to commit."""
        self.write_json(self.staged_file(table_name, dt), {"files": sorted(parts)})

    def staged_parts(self, table_name: str, dt: str) -> list[str] | None:
        doc = self.read_json(self.staged_file(table_name, dt))
        return None if doc is None else list(doc["files"])

    def commit_staged(self, table_name: str, dt: str, publish_id: str) -> list[str]:
        """Move the staged parts beside the partition's current files, under new names; returns their
        lake-relative paths. Readers do not see them until a manifest names them. A publish retried with the same
        `publish_id` finds the parts its first try moved already in place."""
        parts = self.staged_parts(table_name, dt)
        if parts is None:
            raise FileNotFoundError(f"nothing staged for {table_name} dt={dt}; run the score stage first")
        names = self._part_names(table_name, dt, parts, publish_id)
        waiting, missing = [], []  # to move; neither staged nor moved in by an earlier try of this publish
        for rel, final in names:
            if self.exists(rel):
                waiting.append((rel, final))
            elif not self.exists(final):
                missing.append(rel)
        if missing:
            raise FileNotFoundError(f"staged {table_name} part {missing[0]} is gone; run the score stage again")
        self._move_parts_in(table_name, dt, waiting)
        return [final for _, final in names]

    def remove_unlisted_files(self, table_name: str, dt: str, keep: set[str]) -> int:
        """Delete a partition's files other than `keep` (lake-relative): earlier writes, unfinished ones."""
        directory = self.partition_path(table_name, dt)
        if not exists(self.fs, directory):
            return 0
        removed = 0
        for info in self.fs.get_file_info(pafs.FileSelector(directory, recursive=False)):
            rel = posixpath.relpath(info.path, self.root)
            if info.type == pafs.FileType.File and rel not in keep:
                self.fs.delete_file(info.path)
                removed += 1
        return removed

    def clear_staging(self, dt: str) -> None:
        self._delete_quietly(self.path("_staging", f"dt={dt}"))

    def clear_work(self, dt: str, attempt: str | None = None) -> None:
        self._delete_quietly(self.path("_work", f"dt={dt}", *([attempt] if attempt else [])))

    def clear_work_table(self, table: str, dt: str, attempt: str) -> None:
        self._delete_quietly(self.path(self.work_dir(table, dt, attempt)))

    def delete_file_quietly(self, relpath: str) -> None:
        try:
            self.fs.delete_file(self.path(relpath))
        except (FileNotFoundError, OSError):
            pass

    def _delete_quietly(self, path: str) -> None:
        try:
            if exists(self.fs, path):
                self.fs.delete_dir(path)
        except OSError:
            pass

    # documents ---------------------------------------------------------------------------------------------------
    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_bytes(relpath, json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode())

    def read_json(self, relpath: str) -> Any | None:
        p = self.path(relpath)
        for attempt in range(3):
            if not exists(self.fs, p):
                return None
            try:
                return json.loads(read_bytes(self.fs, p))
            except json.JSONDecodeError:
                # pyarrow's S3 reader takes the size from a HEAD, then GETs that many bytes: a document replaced
                # (whole) in between reads as the new one cut at the old length. A fresh read sees one whole.
                if attempt == 2:
                    raise
        return None

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Replace a document whole: a reader sees the old bytes or the new, never part of them."""
        path = self.path(relpath)
        if isinstance(self.fs, pafs.LocalFileSystem):
            _replace_local_file(self.fs, path, data)
        else:  # an S3 PUT makes the whole object visible at once
            write_bytes(self.fs, path, data)

    def read_bytes(self, relpath: str) -> bytes | None:
        p = self.path(relpath)
        if not exists(self.fs, p):
            return None
        return read_bytes(self.fs, p)

    def exists(self, relpath: str) -> bool:
        return exists(self.fs, self.path(relpath))

    def display(self, relpath: str) -> str:
        """A human-readable location for a lake path (URI form)."""
        if self.uri.startswith("s3"):
            return "s3://" + self.path(relpath)
        return "file://" + self.path(relpath)


def _replace_local_file(fs: pafs.LocalFileSystem, path: str, data: bytes) -> None:
    """Write beside the target under a temporary name (no .json or .parquet suffix, so no listing takes it for a
    document or a part), sync it, rename it over the target, and sync the folder so the rename survives a crash."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fs.move(temporary, path)  # rename(2): atomic, replaces the old file
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
