"""Read what publish made visible: committed partitions (those with a run manifest) of the output tables."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds

from matcher.lake import Lake

QUERYABLE_TABLES = ("recommendations", "embeddings", "categories", "mismatches", "search", "quarantine", "clean")


class NotPublishedError(LookupError):
    pass


def committed_dates(lake: Lake) -> list[str]:
    return lake.partitions_with_file(lake.MANIFESTS_DIR, "manifest.json")


def resolve_date(lake: Lake, date: str | None) -> str:
    dates = committed_dates(lake)
    if not dates:
        raise NotPublishedError(f"nothing published in {lake.display('')}: run the pipeline first")
    if date is None:
        return dates[-1]
    if date not in dates:
        raise NotPublishedError(f"no published partition for {date}; published: {', '.join(dates[-5:])}")
    return date


def read_published(lake: Lake, table: str, date: str | None = None, columns: list[str] | None = None) -> pa.Table:
    dt = resolve_date(lake, date)
    t = lake.read_partition(table, dt, columns)  # only these columns are read from the files
    if t is None:
        raise NotPublishedError(f"table {table} has no partition for {dt}")
    return t


def published_dataset(lake: Lake, table: str) -> ds.Dataset | None:
    """All committed partitions of a table as one dataset with a `dt` column. Its schema unites the partitions'
    (one footer read per date): a column a later release added reads as nulls in older partitions instead of
    vanishing because the oldest file lacks it."""
    by_date = [files for d in committed_dates(lake) if (files := lake.partition_files(table, d))]
    if not by_date:
        return None
    dt = pa.schema([("dt", pa.string())])
    schema = pa.unify_schemas([ds.dataset(files[0], filesystem=lake.fs, format="parquet").schema
                               for files in by_date] + [dt])
    return ds.dataset([f for files in by_date for f in files], schema=schema, filesystem=lake.fs, format="parquet",
                      partitioning=ds.partitioning(dt, flavor="hive"), partition_base_dir=lake.path(table))
