"""The lake: Hive-partitioned Parquet tables, JSON documents and model files under one root (local or S3).

This module is the only one that spells the lake's layout:
  <table>/dt=YYYY-MM-DD/part-<attempt>-<n>.parquet  a partition's part files, written by executors
  <table>/dt=YYYY-MM-DD/_committed.json            an internal table's commit point (clean, quarantine,
                                                   features): the files and rows of the partition
  manifests/dt=YYYY-MM-DD/manifest.json            the run manifest: the commit point of a published partition
  _work/dt=YYYY-MM-DD/<attempt>/<table>/...        part files being written; moved in by the commit
  _staging/dt=YYYY-MM-DD/<table>.json              parts written by `score`, made visible by `publish`
  _runs/dt=YYYY-MM-DD/<stage>.json                 per-stage statistics of a run
  validation/dt=YYYY-MM-DD/, reports/dt=YYYY-MM-DD/ the validation result and the nightly report
  models/<version>/..., models/current.json        versioned models and the promoted one
Readers go through the commit point, so a partition is seen whole or not at all.
"""
from __future__ import annotations

import datetime as _dt
import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from matcher.config import StorageConfig
from matcher.storage import exists, read_bytes, resolve_uri, write_bytes

COMMIT_FILE = "_committed.json"
PUBLISHED_TABLES = ("embeddings", "recommendations", "categories", "mismatches", "search")


def new_attempt_id() -> str:
    """A sortable, unique name for one write of a partition."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _empty(table_name: str, columns: list[str] | None) -> pa.Table:
    from matcher.tables import table_schema

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
        return self.path(table, f"dt={dt}")

    @staticmethod
    def manifest_file(dt: str) -> str:
        return f"manifests/dt={dt}/manifest.json"

    @staticmethod
    def stage_stats_file(dt: str, stage: str) -> str:
        return f"_runs/dt={dt}/{stage}.json"

    @staticmethod
    def validation_dir(dt: str) -> str:
        return f"validation/dt={dt}"

    @staticmethod
    def report_file(dt: str) -> str:
        return f"reports/dt={dt}/report.html"

    @staticmethod
    def model_dir(version: str) -> str:
        return f"models/{version}"

    MODELS_DIR = "models"
    CURRENT_MODEL_FILE = "models/current.json"
    MANIFESTS_DIR = "manifests"

    @staticmethod
    def work_dir(table: str, dt: str, attempt: str) -> str:
        return f"_work/dt={dt}/{attempt}/{table}"

    @staticmethod
    def lock_dir(dt: str) -> str:
        return f"_locks/dt={dt}"

    @staticmethod
    def staged_file(table: str, dt: str) -> str:
        return f"_staging/dt={dt}/{table}.json"

    def manifest(self, dt: str) -> dict | None:
        return self.read_json(self.manifest_file(dt))

    # partitions ----------------------------------------------------------------------------------------------------
    def _move_parts_in(self, table: str, dt: str, parts: list[str], attempt: str) -> list[str]:
        """Move part files (lake-relative) into the partition folder under new names; returns their new paths."""
        self.fs.create_dir(self.partition_path(table, dt), recursive=True)
        moved = []
        for n, rel in enumerate(sorted(parts)):
            final = posixpath.join(table, f"dt={dt}", f"part-{attempt}-{n:05d}.parquet")
            self.fs.move(self.path(rel), self.path(final))
            moved.append(final)
        return moved

    def commit_parts(self, table: str, dt: str, parts: list[str], attempt: str) -> dict:
        """Commit an internal table's partition: the part files move in beside the previous ones, the commit file
        naming them is the switch, then the previous files go. Returns the commit document."""
        files = self._move_parts_in(table, dt, parts, attempt)
        rows = sum(pq.read_metadata(self.path(f), filesystem=self.fs).num_rows for f in files)
        doc = {"table": table, "dt": dt, "attempt": attempt, "files": files, "rows": rows}
        self.write_json(posixpath.join(table, f"dt={dt}", COMMIT_FILE), doc)
        self.remove_unlisted_files(table, dt, keep=set(files) | {posixpath.join(table, f"dt={dt}", COMMIT_FILE)})
        self._delete_quietly(self.path(self.work_dir(table, dt, attempt)))  # unlisted files of failed task attempts
        return doc

    def committed(self, table: str, dt: str) -> dict | None:
        return self.read_json(posixpath.join(table, f"dt={dt}", COMMIT_FILE))

    def write_partition(self, table_name: str, dt: str, table: pa.Table) -> dict:
        """Write a small table from this process as one part file and commit it (tests, tiny tables)."""
        attempt = new_attempt_id()
        part = posixpath.join(self.work_dir(table_name, dt, attempt), "part-0.parquet")
        self.fs.create_dir(self.path(posixpath.dirname(part)), recursive=True)
        pq.write_table(table, self.path(part), filesystem=self.fs, compression="zstd")
        return self.commit_parts(table_name, dt, [part], attempt)

    def partition_files(self, table_name: str, dt: str) -> list[str]:
        """A partition's files (full paths): for a published table those its run manifest names, for an internal
        table those its commit file names; files of an unfinished write are never listed."""
        if table_name in PUBLISHED_TABLES:
            doc = ((self.manifest(dt) or {}).get("tables") or {}).get(table_name)
        else:
            doc = self.committed(table_name, dt)
        return [self.path(f) for f in (doc or {}).get("files", [])]

    def partition_rows(self, table_name: str, dt: str) -> int:
        """Rows of a committed partition, from the Parquet footers."""
        return sum(pq.read_metadata(f, filesystem=self.fs).num_rows for f in self.partition_files(table_name, dt))

    def read_partition(self, table_name: str, dt: str, columns: list[str] | None = None) -> pa.Table | None:
        """The whole partition in this process: for small tables and tests; stages read through Spark."""
        files = self.partition_files(table_name, dt)
        if not files:
            committed = self.committed(table_name, dt) if table_name not in PUBLISHED_TABLES else self.manifest(dt)
            return None if committed is None else _empty(table_name, columns)
        tables = [pq.read_table(f, filesystem=self.fs, columns=columns) for f in files]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")

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
        lake-relative paths. Readers do not see them until a manifest names them."""
        parts = self.staged_parts(table_name, dt)
        if parts is None:
            raise FileNotFoundError(f"nothing staged for {table_name} dt={dt}; run the score stage first")
        missing = [p for p in parts if not self.exists(p)]
        if missing:
            raise FileNotFoundError(f"staged {table_name} part {missing[0]} is gone; run the score stage again")
        return self._move_parts_in(table_name, dt, parts, publish_id)

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
        write_bytes(self.fs, self.path(relpath), json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode())

    def read_json(self, relpath: str) -> Any | None:
        p = self.path(relpath)
        if not exists(self.fs, p):
            return None
        return json.loads(read_bytes(self.fs, p))

    def write_bytes(self, relpath: str, data: bytes) -> None:
        write_bytes(self.fs, self.path(relpath), data)

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

