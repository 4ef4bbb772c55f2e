"""Read a catalog (products.csv | .parquet | .jsonl, local or S3) and the image bytes it references."""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from matcher.config import CatalogConfig, StorageConfig
from matcher.images import ImageRejected
from matcher.storage import exists, read_bytes, resolve_uri

CATALOG_FILES = ("products.csv", "products.parquet", "products.jsonl")
REQUIRED_COLUMNS = ("product_id", "title")
OPTIONAL_COLUMNS = ("description", "category", "image")


class CatalogError(ValueError):
    """The input is not a catalog at all: the run stops with this message."""


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
        self.options = options or CatalogConfig(file="", image_template="", columns={})
        self.fs, self.root = resolve_uri(uri, storage)

    def find_products_file(self) -> str:
        if self.options.file:
            p = posixpath.join(self.root, self.options.file)
            if not exists(self.fs, p):
                raise CatalogError(f"no catalog file {self.options.file} at {self.uri}")
            if not p.endswith((".csv", ".parquet", ".jsonl")):
                raise CatalogError(f"catalog file {self.options.file} must end in .csv, .parquet or .jsonl")
            return p
        for name in CATALOG_FILES:
            p = posixpath.join(self.root, name)
            if exists(self.fs, p):
                return p
        raise CatalogError(f"no catalog at {self.uri}: expected one of {', '.join(CATALOG_FILES)}")

    def read(self) -> RawCatalog:
        path = self.find_products_file()
        data = read_bytes(self.fs, path)
        if not data.strip():
            raise CatalogError(f"catalog file {path} is empty")
        bad: list[dict] = []
        if path.endswith(".csv"):
            df = _read_csv(data, bad)
        elif path.endswith(".parquet"):
            try:
                df = pq.read_table(io.BytesIO(data)).to_pandas()
            except Exception as exc:
                raise CatalogError(f"catalog file {path} is not readable Parquet: {exc}") from None
            df = df.astype(object).where(df.notna(), "").astype(str)
        else:
            df = _read_jsonl(data, bad)
        df = self._apply_column_mapping(df)
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise CatalogError(f"catalog file {path} lacks required columns {missing}; it has {list(df.columns)[:12]}")
        for col in OPTIONAL_COLUMNS:
            if col not in df.columns:
                df[col] = ""
        if self.options.image_template:
            no_ref = df["image"].str.strip() == ""
            df.loc[no_ref, "image"] = [self.options.image_template.format(product_id=str(p).strip())
                                       for p in df.loc[no_ref, "product_id"]]
        df.insert(0, "_row", range(len(df)))
        return RawCatalog(rows=df.reset_index(drop=True), bad_lines=bad, source=path)

    def _apply_column_mapping(self, df: pd.DataFrame) -> pd.DataFrame:
        mapping = self.options.columns
        absent = [src for src in mapping.values() if src not in df.columns]
        if absent:
            raise CatalogError(f"catalog.columns names columns the catalog lacks: {absent}; "
                               f"it has {list(df.columns)[:12]}")
        # A source column mapped to a matcher field replaces any column already named like that field.
        renamed = df.drop(columns=[c for c in mapping if c in df.columns and c not in mapping.values()])
        return renamed.rename(columns={src: dst for dst, src in mapping.items()})

    def read_image(self, ref: str) -> bytes:
        """Bytes of an image reference: a path relative to the catalog root, an s3:// URI or a file:// URI.

        Raises ImageRejected with a quarantine reason."""
        ref = ref.strip()
        if not ref:
            raise ImageRejected("image_missing", "no image reference")
        if ref.startswith(("s3://", "s3a://", "file://")):
            fs, path = resolve_uri(ref, self.storage)
        elif "://" in ref:
            raise ImageRejected("image_unsupported_uri", ref[:200])
        else:
            rel = posixpath.normpath(ref.replace("\\", "/"))
            if rel.startswith("/") or rel == ".." or rel.startswith("../"):
                raise ImageRejected("image_path_escapes_root", ref[:200])
            fs, path = self.fs, posixpath.join(self.root, rel)
        try:
            return read_bytes(fs, path)
        except FileNotFoundError:
            raise ImageRejected("image_missing", ref[:200]) from None
        except OSError as exc:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise ImageRejected("image_missing", ref[:200]) from None
            raise ImageRejected("image_unreadable", str(exc)[:200]) from None


def _read_csv(data: bytes, bad: list[dict]) -> pd.DataFrame:
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if "\x00" in text[:4096]:
        raise CatalogError("catalog CSV looks binary (NUL bytes)")

    def on_bad_line(fields: list[str]) -> None:
        bad.append({"raw": ",".join(fields)[:2000], "reason": "wrong_field_count",
                    "detail": f"{len(fields)} fields"})
        return None

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, engine="python",
                         on_bad_lines=on_bad_line)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CatalogError(f"catalog CSV cannot be parsed: {exc}") from None
    return df


def _read_jsonl(data: bytes, bad: list[dict]) -> pd.DataFrame:
    records = []
    for line in data.decode("utf-8-sig", errors="surrogateescape").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            bad.append({"raw": line[:2000], "reason": "malformed_json", "detail": str(exc)[:200]})
            continue
        records.append({k: "" if v is None else str(v) for k, v in obj.items()})
    if not records:
        raise CatalogError("catalog JSON Lines file has no product records")
    return pd.DataFrame.from_records(records).fillna("")

