"""The lake: Hive-partitioned Parquet tables, JSON documents and model files under one root (local or S3).

Layout (see docs in README):
  <table>/dt=YYYY-MM-DD/part-00000.parquet   an internal table's partition (clean, quarantine, features), one
                                             file, swapped in whole on rerun
  <table>/dt=YYYY-MM-DD/part-<publish>.parquet  a published table's partition: the file the manifest names
  _staging/dt=YYYY-MM-DD/<table>/...         output of `score`, made visible by `publish`
  _runs/dt=YYYY-MM-DD/<stage>.json           per-stage statistics of a run
  manifests/dt=YYYY-MM-DD/manifest.json      the published run manifest: the commit point of a partition
  models/<version>/..., models/current.json  versioned models and the promoted one
"""
from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from matcher.config import StorageConfig
from matcher.storage import exists, read_bytes, resolve_uri, write_bytes

PART_FILE = "part-00000.parquet"


class Lake:
    def __init__(self, uri: str, storage: StorageConfig):
        self.uri = uri
        self.fs, self.root = resolve_uri(uri, storage)

    # paths -------------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def partition_path(self, table: str, dt: str) -> str:
        return self.path(table, f"dt={dt}")

    def staging_path(self, table: str, dt: str) -> str:
        return self.path("_staging", f"dt={dt}", table)

    # tables ------------------------------------------------------------------------------------------------------
    def _write_file_atomically(self, final_dir: str, table: pa.Table) -> None:
        """Write to a temporary object, then swap it in, so the partition holds exactly one complete file."""
        tmp = self.path("_tmp", uuid.uuid4().hex, PART_FILE)
        self.fs.create_dir(posixpath.dirname(tmp), recursive=True)
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        if exists(self.fs, final_dir):
            self.fs.delete_dir(final_dir)
        self.fs.create_dir(final_dir, recursive=True)
        self.fs.move(tmp, posixpath.join(final_dir, PART_FILE))
        self._delete_quietly(posixpath.dirname(tmp))

    def _delete_quietly(self, path: str) -> None:
        try:
            if exists(self.fs, path):
                self.fs.delete_dir(path)
        except OSError:
            pass

    def write_partition(self, table_name: str, dt: str, table: pa.Table) -> str:
        final_dir = self.partition_path(table_name, dt)
        self._write_file_atomically(final_dir, table)
        return final_dir

    def read_partition(self, table_name: str, dt: str) -> pa.Table | None:
        files = self.partition_files(table_name, dt)
        if not files:
            return None
        tables = [pq.read_table(f, filesystem=self.fs) for f in files]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def partition_files(self, table_name: str, dt: str) -> list[str]:
        """A partition's files: for a published table exactly those its run manifest names (so files of an
        unfinished publish are never read); for an internal table its one part file."""
        manifest = self.read_json(f"manifests/dt={dt}/manifest.json")
        listed = ((manifest or {}).get("tables") or {}).get(table_name, {}).get("files")
        if listed:
            return [self.path(f) for f in listed]
        part = posixpath.join(self.partition_path(table_name, dt), PART_FILE)
        return [part] if exists(self.fs, part) else []

    def _read_dir(self, directory: str) -> pa.Table | None:
        file_path = posixpath.join(directory, PART_FILE)
        if not exists(self.fs, file_path):
            return None
        return pq.read_table(file_path, filesystem=self.fs)

    def partitions(self, table_name: str) -> list[str]:
        """Dates (YYYY-MM-DD) that have a complete partition of the table, ascending."""
        return self.partitions_with_file(table_name, PART_FILE)

    def partitions_with_file(self, prefix: str, file_name: str) -> list[str]:
        base = self.path(prefix)
        if not exists(self.fs, base):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        dates = [i.base_name[3:] for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("dt=")]
        return sorted(d for d in dates if exists(self.fs, posixpath.join(base, f"dt={d}", file_name)))

    def stage_partition(self, table_name: str, dt: str, table: pa.Table) -> None:
        self._write_file_atomically(self.staging_path(table_name, dt), table)

    def read_staged(self, table_name: str, dt: str) -> pa.Table | None:
        return self._read_dir(self.staging_path(table_name, dt))

    def commit_staged(self, table_name: str, dt: str, publish_id: str) -> str:
        """Move the staged file beside the partition's current file, under a new name; returns its lake-relative
        path. Readers do not see it until a manifest names it."""
        staged = posixpath.join(self.staging_path(table_name, dt), PART_FILE)
        if not exists(self.fs, staged):
            raise FileNotFoundError(f"nothing staged for {table_name} dt={dt}; run the score stage first")
        relpath = posixpath.join(table_name, f"dt={dt}", f"part-{publish_id}.parquet")
        self.fs.create_dir(self.partition_path(table_name, dt), recursive=True)
        self.fs.move(staged, self.path(relpath))
        return relpath

    def remove_unlisted_files(self, table_name: str, dt: str, keep: set[str]) -> int:
        """Delete a partition's files other than `keep` (lake-relative): earlier publishes, unfinished ones."""
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

