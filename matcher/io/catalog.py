"""Read a catalog (products.csv | .parquet | .jsonl, local or S3) and the image bytes it references."""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
import posixpath
import re
import stat
import urllib.parse
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from matcher.config import CatalogConfig, StorageConfig, load_config
from matcher.failures import classify
from matcher.io.http_images import AddressPolicy, fetch_image
from matcher.io.storage import exists, is_s3, resolve_uri
from matcher.steps.clean import CORE_COLUMNS, IMAGE_DATA, passthrough_names, repaired_product_id
from matcher.steps.images import ImageRejected
from matcher.steps.quarantine import Reason

_HEAD_BYTES = 1 << 16
# A Parquet catalog's rows become Python rows in batches of about this many bytes (decoded), its pages read through
# a buffer of PARQUET_READ_BUFFER bytes (pyarrow still decodes a row group's column chunk whole).
PARQUET_BATCH_BYTES, PARQUET_READ_BUFFER = 64 << 20, 8 << 20
_MAX_IMAGE_REF_CHARS = 2048
_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
CATALOG_FILES = ("products.csv", "products.parquet", "products.jsonl", "products.csv.gz", "products.jsonl.gz")
_TEXT_SUFFIXES = (".csv", ".jsonl", ".csv.gz", ".jsonl.gz")  # .gz: pyarrow's streams decompress by the file name
# Delimiters tried in order: the first whose header row holds the required columns reads the file (Excel writes ";"
# where the decimal mark is a comma, and tabs in its "Unicode Text" export).
_CSV_DELIMITERS = (",", ";", "\t", "|")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
REQUIRED_COLUMNS = ("product_id", "title")
_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")  # C:\x, C:/x, \\server\share
# Columns that may hold an absent optional field under another name: read as nothing unless mapped, so say so.
_FIELD_COLUMN_WORDS = {"description": re.compile(r"desc|detail|summary|about|body|long.?text", re.I),
                       "category": re.compile(r"categ|class|department|taxonomy|breadcrumb|genre|product.?type", re.I)}
_PHOTO_COLUMN_WORDS = (re.compile(r"image|img|photo|picture|pic|thumbnail", re.I), re.compile(r"url|link", re.I))
OPTIONAL_COLUMNS = ("description", "category", "image")


class CatalogError(ValueError):
    """The input is not a catalog at all: the run stops with this message."""


class CatalogMisconfigured(CatalogError):
    """The catalog location or settings cannot name a products file however long one waits: a sensor fails."""


class AmbiguousCatalog(CatalogMisconfigured):
    """Two products files in one catalog folder and none named: waiting will not tell which to read."""


class CatalogNotReady(CatalogError):
    """The snapshot's ready marker is not there yet: its producer is still writing it; a retry may find it."""


@dataclass(frozen=True)
class CatalogSplit:
    row_group: int | None      # a Parquet row group; None: the whole (text) file
    row_offset: int            # rows before this split, so `_row` numbers rows in file order


@dataclass(frozen=True)
class CatalogPlan:
    path: str
    format: str                # csv | parquet | jsonl
    columns: list[str]         # after column mapping; required and optional columns always present
    splits: list[CatalogSplit]
    mapping: dict[str, str] = field(default_factory=dict)  # matcher's column -> the file's: catalog.columns, plus
                                                           # required/optional columns named in another case, plus
                                                           # other columns renamed (clean.passthrough_names)
    delimiter: str = ","       # csv only
    encoding: str = "utf-8-sig"  # csv only: "utf-16" for a file that starts with a UTF-16 byte-order mark
    rows: int | None = None    # parquet only: the row count in the footer
    notes: tuple[str, ...] = ()  # what the driver should warn of: columns not read, look-alikes of absent fields

    def renamed_columns(self) -> dict[str, str]:
        """The file's columns that the clean table names otherwise: {the file's name: the table's}."""
        return {src: dst for dst, src in self.mapping.items() if dst not in CORE_COLUMNS}

    def spelled_as(self, known: list[str]) -> "CatalogPlan":
        """This plan with each pass-through column that a `known` column (the clean table's log) names in another
        case renamed to that spelling: "Colour" one night after "colour" before is one column, not a clash."""
        spelling = {k.lower(): k for k in known}
        columns, mapping = list(self.columns), dict(self.mapping)
        for i, name in enumerate(self.columns):
            logged = spelling.get(name.lower())
            if name in CORE_COLUMNS or logged is None or logged == name or logged in self.columns:
                continue
            mapping[logged] = mapping.pop(name, name)
            columns[i] = logged
        return replace(self, columns=columns, mapping=mapping)


@dataclass
class RawCatalog:
    rows: pd.DataFrame                       # every parsed row, all columns as strings, plus `_row`
    bad_lines: list[dict] = field(default_factory=list)  # rows that could not be parsed: {"raw", "reason", "detail"}
    source: str = ""


class CatalogReader:
    """Opens the catalog root once; reads the product table and image bytes relative to it."""

    def __init__(self, uri: str, storage: StorageConfig, options: CatalogConfig | None = None):
        self.uri = uri
        self.storage = storage
        self.options = options or load_config().catalog  # the embedded defaults, not a copy of them
        self.fs, self.root = resolve_uri(uri, storage)
        self.sources = ImageSources.of(self.root if is_s3(uri) else None,
                                       None if is_s3(uri) else self.root, self.options.image_sources)
        self.http_policy = AddressPolicy.from_settings(self.options.http_allow_hosts,
                                                       self.options.http_allow_networks)

    def __reduce__(self):
        # Executors rebuild the reader; a local catalog by its absolute path (their working directory differs).
        uri = self.uri if self.uri.startswith(("s3://", "s3a://")) else "file://" + self.root
        return (CatalogReader, (uri, self.storage, self.options))

    def ready(self) -> bool:
        """Has the catalog fully arrived: its products file, and the ready marker when one is configured?"""
        try:
            self.require_ready()
        except CatalogMisconfigured:
            raise  # a sensor would wait for nothing: only a config change settles it
        except CatalogError:
            return False
        return True

    def require_ready(self) -> str:
        """The products file of a complete snapshot; else one line naming what is missing."""
        path = self.find_products_file()
        marker = self.options.ready_marker
        if marker and not exists(self.fs, posixpath.join(self.root, marker)):
            raise CatalogNotReady(f"catalog at {self.uri} is not complete: no {marker} marker yet")
        return path

    def find_products_file(self) -> str:
        info = self.fs.get_file_info(self.root)
        # (on S3 an empty object at the prefix's own key is a "folder" marker some tools write, not a products file)
        if info.type == pafs.FileType.File and not (is_s3(self.uri) and not info.size):
            name = posixpath.basename(self.root)
            raise CatalogMisconfigured(
                f"catalog {self.uri} is a file: give its folder (photo paths are read relative to it)"
                + ("" if name in CATALOG_FILES else f" and name the file with catalog.file = {name!r}"))
        if self.options.file:
            p = posixpath.join(self.root, self.options.file)
            if not exists(self.fs, p):
                raise CatalogError(f"no catalog file {self.options.file} at {self.uri}")
            if not p.endswith((".parquet", *_TEXT_SUFFIXES)):
                raise CatalogError(f"catalog file {self.options.file} must end in .csv, .parquet or .jsonl "
                                   "(.csv.gz and .jsonl.gz compressed)")
            return p
        found = [name for name in CATALOG_FILES if exists(self.fs, posixpath.join(self.root, name))]
        if len(found) > 1:  # e.g. an exporter that moved to JSON Lines and left last month's CSV: which is today's?
            raise AmbiguousCatalog(f"{' and '.join(found)} are both at {self.uri}: name the one to read with "
                                   "catalog.file (or remove the other)")
        if found:
            return posixpath.join(self.root, found[0])
        raise CatalogError(f"no catalog at {self.uri}: expected one of {', '.join(CATALOG_FILES)}")

    def plan(self) -> CatalogPlan:
        """What executors need to read the catalog, from its header or footer only: the file, its format, the
        columns (after mapping) and the splits. A file that is not a catalog fails here, at once."""
        path = self.require_ready()
        fmt = _format_of(path)
        delimiter, encoding, rows = ",", "utf-8-sig", None
        if fmt == "parquet":
            try:
                with self.fs.open_input_file(path) as fh:
                    parquet = pq.ParquetFile(fh)
                    meta, columns = parquet.metadata, list(parquet.schema_arrow.names)  # top-level, not leaves
            except Exception as exc:
                raise CatalogError(f"catalog file {path} is not readable Parquet: {exc}") from None
            twice = sorted({c for c in columns if columns.count(c) > 1})
            if twice:  # the reader cannot select either of them (and one of two titles would silently win)
                raise CatalogError(f"catalog file {path} has columns named more than once: {', '.join(twice)}; "
                                   "each column of a Parquet catalog needs a name of its own")
            rows = meta.num_rows
            offsets = [0]
            for g in range(meta.num_row_groups):
                offsets.append(offsets[-1] + meta.row_group(g).num_rows)
            splits = [CatalogSplit(g, offsets[g]) for g in range(meta.num_row_groups)]
            mapping = self._mapping(columns, path)
        else:
            try:
                with self.fs.open_input_stream(path) as fh:
                    head = fh.read(_HEAD_BYTES)
            except OSError as exc:  # e.g. a .gz that is not gzip
                raise CatalogError(f"catalog file {path} cannot be read: {exc}") from None
            if not head.strip():
                raise CatalogError(f"catalog file {path} is empty")
            if fmt == "csv":
                if head.startswith(_UTF16_BOMS):
                    encoding = "utf-16"
                text = head.decode(encoding, errors=_ESCAPE)
                sample = text[:4096]
                if _looks_binary(sample):
                    raise CatalogError("catalog CSV looks binary (NUL bytes); UTF-16 text needs its byte-order "
                                       "mark (or save the file as UTF-8)")
                columns, delimiter, mapping = self._csv_layout(text, path)
            else:
                try:
                    with self.fs.open_input_stream(path) as fh:
                        columns = _jsonl_columns(fh)
                except _DECODING_ERRORS as exc:
                    raise _damaged_or_unreachable(exc, f"catalog file {path}") from None
                mapping = self._mapping(columns, path)
            splits = [CatalogSplit(None, 0)]  # one streaming task per text file: its rows may span lines
        return CatalogPlan(path=path, format=fmt, columns=self._mapped_columns(columns, mapping), splits=splits,
                           mapping=mapping, delimiter=delimiter, encoding=encoding, rows=rows,
                           notes=column_notes(columns, mapping))

    def read_split(self, plan: CatalogPlan, split: CatalogSplit, chunk_rows: int = 5000) -> Iterator[RawCatalog]:
        """The rows of one split, in chunks of about `chunk_rows`; `_row` numbers rows in file order."""
        if plan.format == "parquet":
            yield from self._parquet_split(plan, split, chunk_rows)
            return
        with self.fs.open_input_stream(plan.path) as raw:
            if plan.format == "csv":
                text = io.TextIOWrapper(raw, encoding=plan.encoding, errors=_ESCAPE, newline="")
                chunks = _csv_chunks(text, chunk_rows, plan.delimiter)
            else:
                chunks = _jsonl_chunks(io.BufferedReader(raw), chunk_rows)
            offset = split.row_offset
            while True:
                try:
                    df, bad = next(chunks)
                except StopIteration:
                    break
                except CatalogError:
                    raise
                except _DECODING_ERRORS as exc:  # the stream's: a truncated .gz, a read that failed
                    raise _damaged_or_unreachable(exc, f"catalog file {plan.path} after row {offset}") from None
                yield self._finish(df, bad, plan, offset)
                offset += len(df)

    def _parquet_split(self, plan: CatalogPlan, split: CatalogSplit, chunk_rows: int) -> Iterator[RawCatalog]:
        """A row group's rows in batches of at most `chunk_rows` rows and about PARQUET_BATCH_BYTES (as the footer
        sizes its rows): a writer's default row group holds up to a million rows, photos embedded too, which as
        Python rows at once would be the whole catalog in one executor's memory beside pyarrow's copy of it."""
        image_source = plan.mapping.get("image", "image")
        offset, where = split.row_offset, f"catalog file {plan.path}, row group {split.row_group}"
        try:
            fh = self.fs.open_input_file(plan.path)
        except _DECODING_ERRORS as exc:
            raise _damaged_or_unreachable(exc, where) from None
        with fh:
            try:
                parquet = pq.ParquetFile(fh, buffer_size=PARQUET_READ_BUFFER, pre_buffer=False)
                group = parquet.metadata.row_group(split.row_group)
                # The largest of the footer's sizes: a writer may leave the row group's own total at 0.
                sized = max(group.total_byte_size, sum(group.column(c).total_uncompressed_size
                                                       for c in range(group.num_columns)))
                row_bytes = sized / max(group.num_rows, 1)
                batch_rows = max(1, min(chunk_rows, int(PARQUET_BATCH_BYTES // max(row_bytes, 1.0))))
                batches = parquet.iter_batches(batch_size=batch_rows, row_groups=[split.row_group],
                                               use_threads=False)
            except _DECODING_ERRORS as exc:
                raise _damaged_or_unreachable(exc, where) from None
            while True:
                try:
                    batch = next(batches, None)
                except _DECODING_ERRORS as exc:
                    raise _damaged_or_unreachable(exc, f"{where} (from row {offset})") from None
                if batch is None:
                    if offset == split.row_offset:  # no rows: one empty chunk, with the columns, as before
                        yield self._finish(_arrow_as_text(parquet.schema_arrow.empty_table()), [], plan, offset)
                    return
                table = pa.Table.from_batches([batch])
                images = (_embedded_images(table.column(image_source)) if image_source in table.column_names
                          else None)
                if images is not None:
                    data, paths = images
                    # as bytes: a path that was not UTF-8 is kept for its row's quarantine (text_invalid_utf8)
                    table = table.set_column(table.column_names.index(image_source), image_source, pa.array(
                        [p.encode("utf-8", errors="surrogateescape") for p in paths], pa.binary()))
                raw = self._finish(_arrow_as_text(table), [], plan, offset)
                if images is not None:
                    raw.rows[IMAGE_DATA] = data
                offset += table.num_rows
                yield raw

    def read(self) -> RawCatalog:
        """The whole catalog in this process (small catalogs, tests); the clean stage reads splits on executors."""
        plan = self.plan()
        parts = [chunk for split in plan.splits for chunk in self.read_split(plan, split)]
        rows = pd.concat([p.rows for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=plan.columns)
        if plan.format == "jsonl" and rows.empty:
            raise CatalogError("catalog JSON Lines file has no product records")
        return RawCatalog(rows=rows, bad_lines=[b for p in parts for b in p.bad_lines], source=plan.path)

    def _finish(self, df: pd.DataFrame, bad: list[dict], plan: CatalogPlan, offset: int) -> RawCatalog:
        df = _apply_column_mapping(df, plan.mapping)
        for col in plan.columns:
            if col not in df.columns:
                df[col] = ""
        df = df[plan.columns].copy()
        if self.options.image_template:
            no_ref = df["image"].str.strip() == ""
            df.loc[no_ref, "image"] = [self.options.image_template.format(product_id=repaired_product_id(p))
                                       for p in df.loc[no_ref, "product_id"]]
        df.insert(0, "_row", range(offset, offset + len(df)))
        return RawCatalog(rows=df.reset_index(drop=True), bad_lines=bad, source=plan.path)

    def _csv_layout(self, text: str, path: str) -> tuple[list[str], str, dict[str, str]]:
        """The header's columns, the delimiter and the column mapping: the first delimiter whose header holds the
        required columns; else the error of the delimiter that splits the header into the most columns (the file's
        own, most likely: the comma's error would show a semicolon header as one column)."""
        errors = []
        for delimiter in _CSV_DELIMITERS:
            columns = _csv_columns(text, delimiter)
            try:
                return columns, delimiter, self._mapping(columns, path)
            except CatalogError as exc:
                errors.append((len(columns), exc))
        raise max(errors, key=lambda e: e[0])[1]

    def _mapping(self, columns: list[str], path: str) -> dict[str, str]:
        """matcher's column -> the file's: catalog.columns, and for each required or optional column not in the file
        as such, the one column that names it in another case, with spaces around it or with other separators
        between its words ("Product_ID", " Title ", "Product ID", "product-id", "ProductId")."""
        mapping = dict(self.options.columns)
        absent = [src for src in mapping.values() if src not in columns]
        if absent:
            raise CatalogError(f"catalog.columns names columns the catalog lacks: {absent}; it has {columns[:12]}")
        for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
            if name in mapping or name in columns:
                continue
            for key in (_case_key, _column_key):
                like = [c for c in columns if key(c) == key(name) and c not in mapping.values()]
                if like:  # the closer spelling first: "Product_ID" before "Product ID"; two equally close: neither
                    if len(like) == 1:
                        mapping[name] = like[0]
                    break
        mapped = self._mapped_columns(columns, mapping)
        missing = [c for c in REQUIRED_COLUMNS if c not in mapped]
        if missing:
            raise CatalogError(f"catalog file {path} lacks required columns {missing}; it has {columns[:12]}")
        if "image" not in mapping and "image" not in columns and not self.options.image_template:
            # Every row would be quarantined (image_missing) and the night stopped by the gate: say so at once.
            likely = [c for words in _PHOTO_COLUMN_WORDS for c in columns if words.search(c)]
            raise CatalogError(f"catalog file {path} has no image column; it has {columns[:12]}: name the column "
                               f"of photo references with catalog.columns (e.g. image = \"{(likely or ['...'])[0]}\"), "
                               "or build them from the id with catalog.image_template")
        mapping.update({name: column for column, name in passthrough_names(mapped).items()})
        return mapping

    @staticmethod
    def _mapped_columns(columns: list[str], mapping: dict[str, str]) -> list[str]:
        """The columns as matcher names them (`_named_columns`), and the optional ones the file lacks."""
        mapped = [name for name, _ in _named_columns(columns, mapping)]
        return mapped + [c for c in OPTIONAL_COLUMNS if c not in mapped]

    def read_image(self, ref: str, max_bytes: int | None = None) -> bytes:
        """Bytes of an image reference: a path relative to the catalog root, an s3://, file:// or http(s):// URI.
        Only the catalog root, catalog.image_sources and the addresses catalog.http_* allow are read, and of a file
        or object no more than `max_bytes` (image_too_large), so a huge object cannot exhaust an executor's memory.

        Raises ImageRejected with a quarantine reason."""
        ref = ref.strip()
        if not ref:
            raise ImageRejected(Reason.IMAGE_MISSING, "no image reference")
        if len(ref) > _MAX_IMAGE_REF_CHARS or any(ord(ch) < 32 for ch in ref):
            raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{len(ref)} characters: {ref[:200]!r}")
        scheme = _URI_SCHEME.match(ref)
        if scheme:  # a scheme is read in any case (RFC 3986): FILE:// is file://
            ref = scheme.group(1).lower() + ref[scheme.end(1):]
        if is_s3(ref):
            self.sources.check_s3_object(ref)  # before any connection to the store
            fs, path = resolve_uri(ref, self.storage)  # a storage setting's error fails the task, as it should
        elif ref.startswith("file://"):
            fs, path = _resolved(ref, ref, self.storage)
            path = self.sources.local_file(ref, self._file_uri_path(ref, path))
        elif ref.startswith("//") and not ref.startswith("///"):  # protocol-relative, as web pages write them
            return self.read_image("https:" + ref, max_bytes)
        elif ref.lower().startswith(("http://", "https://")):
            o = self.options
            if not o.http_images:
                raise ImageRejected(Reason.IMAGE_SOURCE_NOT_ALLOWED, f"{ref[:200]}: catalog.http_images is off")
            return fetch_image(ref, o.http_timeout, o.http_retries, o.http_max_bytes, policy=self.http_policy)
        elif "://" in ref or ref.lower().startswith("data:"):
            raise ImageRejected(Reason.IMAGE_UNSUPPORTED_URI, ref[:200])
        elif _WINDOWS_ABSOLUTE.match(ref):
            raise ImageRejected(Reason.IMAGE_PATH_ESCAPES_ROOT, f"{ref[:200]}: an absolute Windows path (of the "
                                                                "machine that wrote the catalog); write photo paths "
                                                                "relative to the catalog folder")
        elif ref.startswith("/") and not ref.startswith("//") and self.sources.local_root is not None:
            # An absolute path on a local catalog is read as its file:// URI is: inside the catalog folder or a
            # file:// image source, links resolved first.
            fs, path = _resolved("file://" + ref, ref, self.storage)
            path = self.sources.local_file(ref, path)
        else:
            try:
                return _read_file(self.fs, self._relative_path(ref, ref), ref, max_bytes)
            except ImageRejected as rejected:
                if "%" not in ref or rejected.reason != Reason.IMAGE_MISSING.value:
                    raise
            # Written as a URL path is ("red%20shirt.jpg" for "red shirt.jpg"): decoded, then checked again as any
            # reference is, so an escaped "..%2F" cannot climb out of the root.
            return _read_file(self.fs, self._relative_path(_decoded_reference(ref), ref), ref, max_bytes)
        return _read_file(fs, path, ref, max_bytes)

    def _relative_path(self, rel: str, ref: str) -> str:
        """The path of a reference relative to the catalog root (`ref`: as the row wrote it, for the reason), refused
        when it climbs out of the root, by `..` or, on a local root, by a link."""
        rel = posixpath.normpath(rel.replace("\\", "/"))
        if rel.startswith("/") or rel == ".." or rel.startswith("../"):
            raise ImageRejected(Reason.IMAGE_PATH_ESCAPES_ROOT, ref[:200])
        path = posixpath.join(self.root, rel)
        if self.sources.local_root is not None:  # a symlink inside the root may point out of it
            path = os.path.realpath(path)
            if not _under(path, self.sources.local_root):
                raise ImageRejected(Reason.IMAGE_PATH_ESCAPES_ROOT, f"{ref[:200]}: a link out of the catalog root")
        return path

    def _file_uri_path(self, ref: str, literal: str) -> str:
        """The local path a file:// reference names: percent-decoded as a URI is (Path.as_uri() writes a space
        %20), unless only the name as written exists (a file whose name holds a literal %)."""
        if "%" not in ref:
            return literal
        _, decoded = resolve_uri(_decoded_reference(ref), self.storage)
        return decoded if os.path.exists(decoded) or not os.path.exists(literal) else literal


@dataclass(frozen=True)
class ImageSources:
    """Where absolute image references may point: the catalog root and catalog.image_sources. Local paths are
    compared after resolving links and `..` (the real path is what gets read); S3 keys segment by segment."""
    s3_root: str | None                              # "bucket/prefix" of an S3 catalog
    local_root: str | None                           # the real path of a local catalog
    s3_prefixes: tuple[str, ...] = ()                # "bucket/prefix" of each s3:// source
    local_prefixes: tuple[str, ...] = ()             # the real path of each file:// source

    @classmethod
    def of(cls, s3_root: str | None, local_root: str | None, sources: list[str]) -> "ImageSources":
        s3 = tuple(_s3_key_path(s) for s in sources if is_s3(s))
        local = tuple(os.path.realpath(s[len("file://"):]) for s in sources if s.startswith("file://"))
        return cls(s3_root, os.path.realpath(local_root) if local_root else None, s3, local)

    def local_file(self, ref: str, path: str) -> str:
        """The real path of a file:// reference inside the root or a file:// source; else image_source_not_allowed."""
        real = os.path.realpath(path)
        allowed = [p for p in (self.local_root, *self.local_prefixes) if p]
        if not any(_under(real, p) for p in allowed):
            raise ImageRejected(Reason.IMAGE_SOURCE_NOT_ALLOWED,
                                f"{ref[:200]} is outside the catalog root and catalog.image_sources")
        return real

    def check_s3_object(self, ref: str) -> None:
        """Nothing for an s3:// reference inside the root or an s3:// source; else image_source_not_allowed.
        Keys with . or .. segments (escaped or not) are refused: stores differ on what they mean."""
        path = _s3_key_path(ref)
        if not urllib.parse.urlparse(ref).netloc or "//" in ref.split("://", 1)[1]:
            raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{ref[:200]}: an S3 URI without a bucket or with "
                                                                "an empty key segment")
        segments = urllib.parse.unquote(path).split("/")
        if any(s in (".", "..") for s in segments):
            raise ImageRejected(Reason.IMAGE_SOURCE_NOT_ALLOWED, f"{ref[:200]}: '.' or '..' in an S3 key")
        allowed = [p for p in (self.s3_root, *self.s3_prefixes) if p]
        if not any(_under(path, p) for p in allowed):
            raise ImageRejected(Reason.IMAGE_SOURCE_NOT_ALLOWED,
                                f"{ref[:200]} is outside the catalog root and catalog.image_sources")


# What reading a damaged file raises (pyarrow's ArrowInvalid is a ValueError, a thrift or page error an OSError).
_DECODING_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def _damaged_or_unreachable(exc: Exception, where: str) -> Exception:
    """A catalog read that failed: the store's error as it is (a retry may read it; a missing or forbidden file is
    judged as such), or the file's damage as a CatalogError naming where (a truncated .gz, a damaged Parquet page:
    a retry would read the same bytes)."""
    if (isinstance(exc, (ConnectionError, TimeoutError, FileNotFoundError, PermissionError, CatalogError))
            or "AWS Error" in str(exc)):
        return exc
    detail = " ".join(str(exc).split())[:300]  # not "OSError: ...": the name would read as a storage error's
    return CatalogError(f"{where} cannot be decoded, it is damaged ({detail})")


def _resolved(uri: str, ref: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """storage.resolve_uri of a local photo's file:// URI (`ref`: as the row wrote it); one it cannot resolve (a
    link loop) is image_reference_invalid, not a failed task."""
    try:
        return resolve_uri(uri, storage)
    except (RuntimeError, OSError) as exc:  # Path.resolve raises either on a loop, by Python version
        raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{ref[:200]}: {exc}"[:300]) from None


def _read_file(fs: pafs.FileSystem, path: str, ref: str, max_bytes: int | None) -> bytes:
    """The bytes at `path` (of `ref`, as the row wrote it), at most max_bytes; else ImageRejected with the reason,
    or the store's error where a retry may read it."""
    if isinstance(fs, pafs.LocalFileSystem):
        _require_regular_file(path, ref)
    try:
        with fs.open_input_stream(path) as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    except OSError as exc:  # not found included: on S3 a prefix with objects under it is no object of its own
        try:
            kind = fs.get_file_info(path).type
        except OSError as lookup:  # a path the filesystem cannot even look up (too long, bad characters)
            if isinstance(fs, pafs.S3FileSystem) and classify(lookup).retryable:
                # The store does not answer at all (down, throttling): not this photo's fault. Fail the task
                # so the stage is retried, instead of quarantining every good product read in an outage.
                raise (lookup if isinstance(exc, FileNotFoundError) else exc) from None
            kind = None
        if kind == pafs.FileType.Directory:  # a bucket or a folder named as the photo
            raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{ref[:200]} is a folder, not a file") from None
        if kind == pafs.FileType.NotFound or isinstance(exc, FileNotFoundError):
            raise ImageRejected(Reason.IMAGE_MISSING, ref[:200]) from None
        if isinstance(fs, pafs.S3FileSystem) and classify(exc).retryable:
            raise  # the store answered the lookup but failed the read for now (a reset, a throttle): retried
        raise ImageRejected(Reason.IMAGE_UNREADABLE, str(exc)[:200]) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected(Reason.IMAGE_TOO_LARGE, f"more than {max_bytes} bytes at {ref[:200]}")
    return data


def _decoded_reference(ref: str) -> str:
    """A reference percent-decoded as a URL path is; refused where an escape hides a control character or bytes
    that are no UTF-8 text (no file name can hold them)."""
    decoded = urllib.parse.unquote(ref, errors="surrogateescape")
    if any(ord(ch) < 32 for ch in decoded):
        raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{ref[:200]}: a control character escaped in it")
    try:
        decoded.encode("utf-8")
    except UnicodeEncodeError:
        raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{ref[:200]}: escaped bytes that are not UTF-8") from None
    return decoded


def _s3_key_path(uri: str) -> str:
    """"bucket/prefix" of an s3:// or s3a:// URI, as storage.resolve_uri writes paths."""
    parsed = urllib.parse.urlparse(uri)
    return posixpath.join(parsed.netloc, parsed.path.lstrip("/")).rstrip("/")


def _require_regular_file(path: str, ref: str) -> None:
    """A named pipe, socket or device under the catalog is no photo: opened, a pipe blocks the task for good."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the open says which
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{ref[:200]} is not a regular file")


def _under(path: str, folder: str) -> bool:
    """Is `path` `folder` itself or inside it (whole segments: /srv/photos2 is not inside /srv/photos)?"""
    folder = folder.rstrip("/")
    return path == folder or path.startswith(folder + "/") or folder == ""


def _format_of(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return posixpath.splitext(name)[1][1:]


def _arrow_as_text(table: pa.Table) -> pd.DataFrame:
    """Every column as text, "" for nulls, as the text formats read: integers stay integers (through pandas an int
    column with a null turns float, and id 10000 would read "10000.0"), nested values become JSON, bytes UTF-8."""
    out = {}
    for name, col in zip(table.column_names, table.columns):
        kind = col.type
        if pa.types.is_dictionary(kind):
            col, kind = col.cast(kind.value_type), kind.value_type
        if isinstance(kind, pa.BaseExtensionType) and not isinstance(kind, pa.UuidType):  # e.g. JSON: its storage
            col = pa.chunked_array([c.storage for c in col.chunks], kind.storage_type)
            kind = kind.storage_type
        if isinstance(kind, pa.UuidType):  # DuckDB writes UUIDs as 16 bytes with the UUID logical type
            values = [str(v) if v is not None else "" for v in col.to_pylist()]
        elif pa.types.is_nested(kind):
            values = [json.dumps(v, ensure_ascii=False, default=str) if v is not None else ""
                      for v in _python_values(col)]
        elif (_holds_bytes(kind) or pa.types.is_fixed_size_binary(kind)
              or (_is_text(kind) and not _valid_utf8(col))):
            # Bytes, or strings one of which is not UTF-8: that value costs its row (text_invalid_utf8), not the file.
            raw = col if _holds_bytes(kind) or pa.types.is_fixed_size_binary(kind) else col.cast(pa.large_binary())
            values = [v.decode("utf-8", errors="surrogateescape") if v is not None else "" for v in raw.to_pylist()]
        else:
            values = pc.cast(col, pa.string()).fill_null("").to_pylist()
        out[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(out)


def _embedded_images(col: pa.ChunkedArray) -> tuple[list[bytes | None], list[str]] | None:
    """(bytes, paths) when the image column holds the photos themselves: binary, or a struct with a `bytes` field
    (and maybe a `path`, as Hugging Face datasets write images); else None (references)."""
    kind = col.type
    if _holds_bytes(kind):
        # Each value on its own: a reference written as bytes (Hive, Impala), or a photo (a damaged one: not_an_image).
        # Decided for the whole column, one bad reference made every row of its row group a photo, and lost them.
        values = col.to_pylist()
        refs = [_reference_in_bytes(v) for v in values]
        return [None if r is not None else (v or None) for r, v in zip(refs, values)], [r or "" for r in refs]
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        has_path = kind.get_field_index("path") >= 0

        def photo_and_path(v: dict | str | None) -> tuple[bytes | None, str]:
            if isinstance(v, str):  # a path that is not UTF-8, its bytes as surrogates: refused as such
                return None, v
            return (v or {}).get("bytes") or None, str((v or {}).get("path") or "") if has_path else ""

        photos, paths = zip(*map(photo_and_path, _python_values(col))) if len(col) else ((), ())
        return list(photos), list(paths)
    return None


def _python_values(col: pa.ChunkedArray) -> list:
    """The column's values as Python's; a value holding a string that is not UTF-8 becomes that string's text with
    its bytes kept as surrogates, which costs its row (text_invalid_utf8), not the file."""
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        pass

    def value(scalar: pa.Scalar) -> object:
        try:
            return scalar.as_py()
        except UnicodeDecodeError as exc:
            return bytes(exc.object).decode("utf-8", errors="surrogateescape")

    return [value(chunk[i]) for chunk in col.chunks for i in range(len(chunk))]


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _valid_utf8(col: pa.ChunkedArray) -> bool:
    try:
        col.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _holds_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _ascii_photo(value: bytes) -> bool:
    """A GIF or WebP, whose first bytes are ASCII (a small one may be all valid UTF-8); JPEG and PNG start with bytes
    UTF-8 never does, BMP and TIFF headers hold NUL bytes."""
    return value.startswith((b"GIF87a", b"GIF89a")) or (value[:4] == b"RIFF" and value[8:12] == b"WEBP")


def _reference_in_bytes(value: bytes | None) -> str | None:
    """The image reference a binary value holds: short UTF-8 text without NUL that no photo format starts as (one
    with other control characters is a reference still, which the reference check quarantines as invalid); None
    for a photo's bytes."""
    if not value or len(value) > _MAX_IMAGE_REF_CHARS * 4 or b"\x00" in value or _ascii_photo(value):
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def _case_key(name: str) -> str:
    return name.strip().lower()


def _column_key(name: str) -> str:
    """A column name without case, spaces, underscores or hyphens: how a header's "Product ID" is matched to
    product_id."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def column_notes(columns: list[str], mapping: dict[str, str]) -> tuple[str, ...]:
    """Warnings about how the file's `columns` are read under `mapping`: a column named like a field another
    column is mapped to is not read at all, and an optional field the file lacks may be in a look-alike column."""
    notes, sources = [], {mapping[f] for f in CORE_COLUMNS if f in mapping}  # not the pass-through renames
    for column in CORE_COLUMNS:
        if column in columns and column in mapping and column not in sources:
            notes.append(f"column {column!r} is not read: catalog.columns maps {column} = {mapping[column]!r} (map "
                         f"it to another field to keep it)")
    for name, words in _FIELD_COLUMN_WORDS.items():
        if name in mapping or name in columns:
            continue
        like = [c for c in columns if words.search(c) and c not in sources]
        if like:
            notes.append(f"no {name} column, so every {name} reads as empty; {like[0]!r} may be one: map it with "
                         f"catalog.columns ({name} = {like[0]!r})")
    return tuple(notes)


def _apply_column_mapping(df: pd.DataFrame, mapping: dict[str, str]) -> pd.DataFrame:
    # The plan found every mapped column; a chunk of JSON Lines records may hold none of a sparse key.
    for src in mapping.values():
        if src not in df.columns:
            df[src] = ""
    return pd.DataFrame({name: df[column] for name, column in _named_columns(list(df.columns), mapping)},
                        index=df.index)


def _named_columns(columns: list[str], mapping: dict[str, str]) -> list[tuple[str, str]]:
    """(matcher's name, the file's column) of each column read, in the file's order: a mapped column under each
    field it is mapped to (one column may fill two, e.g. title and description); a column named like a field that
    another column is mapped to is left out (the mapped one replaces it)."""
    sources, named = set(mapping.values()), []
    for column in columns:
        if column in mapping and column not in sources:
            continue
        named += [(dst, column) for dst, src in mapping.items() if src == column] or [(column, column)]
    return named


def _undecodable_as_surrogates(exc: UnicodeDecodeError) -> tuple[str, int]:
    """surrogateescape for any codec (UTF-16 too): each undecodable byte becomes a lone surrogate, U+DC00 + byte
    (U+D800 + byte under 0x80, which surrogateescape refuses), so the clean step quarantines its row."""
    bad = exc.object[exc.start:exc.end]
    return "".join(chr((0xDC00 if b >= 0x80 else 0xD800) + b) for b in bad), exc.end


_ESCAPE = "matcher-escape"
codecs.register_error(_ESCAPE, _undecodable_as_surrogates)


# A field may legitimately be long (a description) or be damage (a runaway title); either way it is read and then
# capped by the clean step, not dropped by the parser (csv's default limit is 128 KiB), up to a size no catalog
# text reaches: past it (a CSV line or field, a JSON Lines line in bytes) the record is a bad line, so that a few
# compressed kilobytes (one field repeated, a quote never closed) cannot hold gigabytes in an executor.
MAX_RECORD_CHARS = 16 << 20
# A chunk of rows ends at this many characters of fields too (at most a record more): 5,000 records of long fields
# would otherwise be held at once.
CHUNK_CHARS = 64 << 20
_CSV_FIELD_LIMIT = MAX_RECORD_CHARS
_RAW_CHARS = 2000


# Around a header's names: a second byte-order mark (a file saved twice with one), zero-width spaces and joiners.
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"


def _csv_header(fields: list[str]) -> list[str]:
    """Column names as pandas names them: blank ones "Unnamed: i", repeated ones "name.1", "name.2"..."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(fields):
        name = name.strip().strip(_INVISIBLE).strip() or f"Unnamed: {i}"
        if name in seen:
            seen[name] += 1
            name = f"{name}.{seen[name]}"
        seen.setdefault(name, 0)
        names.append(name)
    return names


def _looks_binary(sample: str) -> bool:
    """NUL bytes in most of the sample's lines and over 5% of it: a binary file, or UTF-16 read without its mark. A
    NUL in one row, even a zeroed block of them, is that row's damage (its row is repaired or quarantined)."""
    lines = re.split(r"\r\n?|\n", sample)  # LF, CRLF or CR, as the reader takes them
    return sample.count("\x00") * 20 > len(sample) and sum("\x00" in line for line in lines) * 2 > len(lines)


def _first_record(reader: Iterator[list[str]]) -> list[str] | None:
    """The first record that is not a blank line (an export may start with one), or None."""
    return next((fields for fields in reader if any(f.strip() for f in fields)), None)


def _csv_columns(text: str, delimiter: str = ",") -> list[str]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        header = _first_record(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise CatalogError(f"catalog CSV cannot be parsed: {exc}") from None
    if not header or not any(h.strip() for h in header):
        raise CatalogError("catalog CSV has no header row")
    return _csv_header(header)


class _RawLines:
    """The lines the csv module reads, kept until the record they make is taken: that record's raw text, up to
    _KEPT_CHARS characters (a quote left open on a large file's first line is not recovered past them, nor held
    twice). A line is read up to MAX_RECORD_CHARS characters: the rest is read past, not held (`cut`), and the
    csv module gets a line break in its place."""

    def __init__(self, stream: io.TextIOBase):
        self._stream = stream
        self.taken: list[str] = []
        self.read = 0  # lines since the last clear
        self._kept = 0  # characters in taken
        self.overflowed = False
        self.cut = False
        self.cut_lines: set[int] = set()  # the places in `taken` of lines cut (their start kept, no line break)

    def clear(self) -> None:
        self.taken.clear()
        self.cut_lines.clear()
        self.read = self._kept = 0
        self.overflowed = self.cut = False

    def __iter__(self) -> "_RawLines":
        return self

    def __next__(self) -> str:
        line = self._stream.readline(MAX_RECORD_CHARS + 1)
        if not line:
            raise StopIteration
        self.read += 1
        if len(line) > MAX_RECORD_CHARS and not line.endswith(("\n", "\r")):
            self.cut = True
            _skip_to_next_line(self._stream)
            line, kept = "\n", line[:_RAW_CHARS]
        else:
            kept = line
        if self._kept + len(kept) <= _KEPT_CHARS:
            if line is not kept:
                self.cut_lines.add(len(self.taken))
            self.taken.append(kept)
            self._kept += len(kept)
        else:
            self.overflowed = True
        return line


_KEPT_CHARS = 2 * MAX_RECORD_CHARS
_ID_SHAPE = re.compile(r"[0-9]+|[^\W\d_]+")
_ID_SHAPE_RECORDS = 1000  # the ids whose shapes a swallowed line's first field is compared with


def _closes_well_formed(line: str, delimiter: str) -> bool:
    """Does the quote that ends a multi-line value on this line (the first quote not doubled) end its field, as
    in a well-formed CSV? A stray quote is closed wherever the next quote happens to be, mid-field, or never."""
    text, i = line.rstrip("\r\n"), 0
    while True:
        i = text.find('"', i)
        if i < 0:
            return False
        if text.startswith('""', i):
            i += 2
            continue
        return i + 1 == len(text) or text[i + 1] == delimiter


def _id_shape(value: str) -> str:
    """"SKU-0042" -> "a-9": letters and digits as runs, the rest as written (ids of a catalog share a few shapes)."""
    return _ID_SHAPE.sub(lambda m: "9" if m.group()[0].isdigit() else "a", value.strip())


def _stray_quote_swallowed(lines: list[str], width: int, delimiter: str, id_shapes: set[str],
                           cut: set[int] = frozenset()) -> list[list[str] | int]:
    """The records a stray quote swallowed: when a record spans several lines, the quote that ends it does not end
    a field (or none does), and most lines after its first (more than half) look like records of the catalog (the
    header's width, an id shaped as the catalog's ids), its first line opened a quote it never closed: every line
    after it is read as the record it was (a damaged one among them has its own outcome: a wrong field count, no
    id; a line cut at the length limit, in `cut`, is given as its place in `lines`); else [] (a quoted value with
    line breaks, as descriptions have: "42, 43" is no record of five fields)."""
    if _closes_well_formed(lines[-1], delimiter):
        return []
    records = [at if at in cut else fields for at, fields in
               ((at, next(csv.reader([line], strict=False, delimiter=delimiter), []))
                for at, line in enumerate(lines) if at > 0)
               if at in cut or any(f.strip() for f in fields)]  # a blank line is no record, as outside the quote
    whole = [f for f in records if not isinstance(f, int)]
    shaped = sum(len(f) == width and _id_shape(f[0]) in id_shapes and '"' not in f[0] for f in whole)
    return records if 2 * shaped > len(whole) else []


def _records_in(swallowed: list[list[str] | int]) -> int:
    return sum(not isinstance(record, int) for record in swallowed)


def _csv_chunks(stream: io.TextIOBase, chunk_rows: int, delimiter: str = ",") -> Iterator[tuple[pd.DataFrame,
                                                                                               list[dict]]]:
    """Rows of a CSV as string columns, read with the csv module one record at a time, so that one damaged record
    costs only itself: a record with more fields than the header is a bad line; one with fewer is padded with
    empty fields; blank lines are no records; a line whose stray quote swallowed the records after it is a bad
    line, and those records are read. Line endings may be LF, CRLF or CR, mixed."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    lines = _RawLines(stream)
    reader = csv.reader(lines, strict=False, delimiter=delimiter)
    try:
        header = _first_record(reader)
    except csv.Error as exc:
        raise CatalogError(f"catalog CSV cannot be parsed: {exc}") from None
    if header is None:
        return
    header = _csv_header(header)
    width = len(header)
    records: list[list[str]] = []
    bad: list[dict] = []
    id_shapes: set[str] = set()
    shaped = 0  # records whose ids' shapes are in id_shapes
    chars = 0  # in the chunk's records

    def take(fields: list[str]) -> None:
        nonlocal shaped, chars
        if not any(f.strip() for f in fields):
            return
        if len(fields) > width:
            bad.append({"raw": delimiter.join(fields)[:_RAW_CHARS], "reason": Reason.WRONG_FIELD_COUNT,
                        "detail": f"{len(fields)} fields, the header has {width}"})
            return
        records.append(fields + [""] * (width - len(fields)))
        chars += sum(map(len, fields))
        if shaped < _ID_SHAPE_RECORDS:
            id_shapes.add(_id_shape(fields[0]))
            shaped += 1

    def unparseable(detail: str, at: int = 0) -> None:
        """The record just read (its line `at`) is a bad line: that line's text, `detail` after its number."""
        bad.append({"raw": lines.taken[at].rstrip("\r\n")[:_RAW_CHARS] if len(lines.taken) > at else "",
                    "reason": Reason.UNPARSEABLE_LINE,
                    "detail": f"line {reader.line_num - lines.read + 1 + at}: {detail}"})

    def take_swallowed(swallowed: list[list[str] | int]) -> None:
        for record in swallowed:
            if isinstance(record, int):  # a line cut at the limit, its place in the record's lines
                unparseable(f"a line over {MAX_RECORD_CHARS} characters, read no further", record)
            else:
                take(record)

    while True:
        lines.clear()
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # a field past the limit (strict=False leaves few others): resumed at the next line
            # A quote left open is the usual cause: the records it swallowed up to there are read as such.
            first_id = lines.taken[0].split(delimiter, 1)[0] if lines.taken else ""  # the id the quote opened after
            swallowed = (_stray_quote_swallowed(lines.taken, width, delimiter, id_shapes | {_id_shape(first_id)},
                                                lines.cut_lines)
                         if len(lines.taken) > 1 and not lines.overflowed and 0 not in lines.cut_lines else [])
            unparseable(f"{exc}" + (f"; the {_records_in(swallowed)} lines after it are whole records: they are read "
                                    "as such" if swallowed else ""))
            take_swallowed(swallowed)
            continue
        swallowed = (_stray_quote_swallowed(lines.taken, width, delimiter, id_shapes | {_id_shape(fields[0])},
                                            lines.cut_lines)
                     if len(lines.taken) > 1 and fields and not lines.overflowed and 0 not in lines.cut_lines else [])
        if swallowed:
            unparseable(f"a quote opened on it is not closed there, and the {_records_in(swallowed)} lines after it "
                        "are whole records: they are read as such")
            take_swallowed(swallowed)
        elif lines.cut:  # the record held a line past the limit: read past, and not a row
            unparseable(f"a line over {MAX_RECORD_CHARS} characters, read no further")
        else:
            take(fields)
        if len(records) >= chunk_rows or chars >= CHUNK_CHARS:
            yield pd.DataFrame(records, columns=header, dtype=object), bad[:]
            records.clear()
            bad.clear()
            chars = 0
    if records or bad:
        yield pd.DataFrame(records, columns=header, dtype=object), bad[:]


def _jsonl_chunks(stream: io.RawIOBase, chunk_rows: int) -> Iterator[tuple[pd.DataFrame, list[dict]]]:
    """Records of a JSON Lines file: lines end at LF only (a stray CR is damage inside a record, not a line
    break); bytes that are not UTF-8 are kept as surrogates for the clean step to quarantine; control characters
    inside strings are accepted here and repaired there."""
    records: list[dict] = []
    bad: list[dict] = []
    chars = 0  # in the chunk's records
    while raw_line := stream.readline(MAX_RECORD_CHARS + 1):
        if len(raw_line) > MAX_RECORD_CHARS and not raw_line.endswith(b"\n"):
            size = len(raw_line) + _skip_to_next_line(stream)
            bad.append({"raw": raw_line[:_RAW_CHARS].decode("utf-8", errors="surrogateescape"),
                        "reason": Reason.MALFORMED_JSON,
                        "detail": f"a record of {size} bytes, over the {MAX_RECORD_CHARS} a record may take"})
            continue
        line = raw_line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            obj = json.loads(line, strict=False)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            if _nested_deeper_than(obj, _JSON_MAX_DEPTH):  # written back as JSON text below, by recursion
                raise ValueError(f"values nested deeper than {_JSON_MAX_DEPTH} levels")
            record = {str(k): _json_value_text(v) for k, v in obj.items()}
        except (ValueError, RecursionError) as exc:
            bad.append({"raw": line.rstrip("\r\n")[:_RAW_CHARS], "reason": Reason.MALFORMED_JSON,
                        "detail": str(exc)[:200]})
            continue
        records.append(record)
        chars += len(line)
        if len(records) >= chunk_rows or chars >= CHUNK_CHARS:
            yield pd.DataFrame.from_records(records).fillna(""), bad[:]
            records.clear()
            bad.clear()
            chars = 0
    if records or bad:
        yield pd.DataFrame.from_records(records).fillna(""), bad[:]


def _skip_to_next_line(stream) -> int:
    """Read past the rest of the current line, a chunk at a time (a binary or a text stream); what was skipped."""
    skipped = 0
    while chunk := stream.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith((b"\n",) if isinstance(chunk, bytes) else ("\n", "\r")):
            break
    return skipped


# The columns of a JSON Lines catalog: the keys of its first records, up to these many records or bytes.
_JSONL_HEAD_RECORDS, _JSONL_HEAD_BYTES = 1000, 16 << 20


# A record's values are catalog fields: lists and objects in them are kept as JSON text. Deeper than this is no
# catalog's, and the same row is refused wherever the stack happens to be.
_JSON_MAX_DEPTH = 64


def _nested_deeper_than(value: object, limit: int) -> bool:
    """Whether lists and objects nest in `value` more than `limit` levels (a walk without recursion)."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            if depth >= limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _json_value_text(value: object) -> str:
    """A JSON value as catalog text, as a Parquet catalog's typed value reads: null "", a string as it is, true and
    false as JSON writes them, a whole number without ".0" (an export that writes the id 1004 as 1004.0 on some
    rows names the same product), lists and objects as JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _jsonl_columns(stream) -> list[str]:
    """Every key of the first records, in the order they first appear: exporters leave out a record's empty
    fields, and one long or damaged first record says nothing of the others (the reader quarantines it)."""
    keys: dict[str, None] = {}
    records = read = 0
    lines = io.BufferedReader(stream)
    while records < _JSONL_HEAD_RECORDS and read < _JSONL_HEAD_BYTES:
        line = lines.readline(_JSONL_HEAD_BYTES - read)
        if not line:
            break
        read += len(line)
        try:
            obj = json.loads(line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"), strict=False)
        except (ValueError, RecursionError):  # a damaged line, or one cut by the byte limit
            continue
        if isinstance(obj, dict):
            keys.update(dict.fromkeys(str(k) for k in obj))
            records += 1
    if not records:
        raise CatalogError("catalog JSON Lines file has no product records"
                           + (f" in its first {_JSONL_HEAD_BYTES >> 20} MiB" if read >= _JSONL_HEAD_BYTES else ""))
    return list(keys)
