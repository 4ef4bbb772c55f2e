"""Read what publish made visible: committed partitions (those with a run manifest) of the output tables.

Readers read the files a date's manifest names and never list a folder, so a partition is seen whole, from one
publish. Publish keeps the generation it replaced until the date's next publish: a read that began on the previous
manifest finishes on its files, and one that loses them to a second republish reads the date again from its new
manifest."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from matcher.io.lake import Lake

T = TypeVar("T")
REREADS = 5  # how often a read that lost its files to republishes starts again from the date's newest manifest


class NotPublishedError(LookupError):
    pass


def committed_dates(lake: Lake) -> list[str]:
    return lake.partitions_with_file(lake.MANIFESTS_DIR, lake.MANIFEST_NAME)


def resolve_date(lake: Lake, date: str | None) -> str:
    dates = committed_dates(lake)
    if not dates:
        raise NotPublishedError(f"nothing published in {lake.display('')}: run the pipeline first")
    if date is None:
        return dates[-1]
    if date not in dates:
        raise NotPublishedError(f"no published partition for {date}; published: {', '.join(dates[-5:])}")
    return date


def _with_rereads(lake: Lake, table: str, dt: str, read: Callable[[list[str]], T]) -> T:
    """read(the files the date's manifest names for `table`), again from the newest manifest if the date was
    published again and its files went while they were read."""
    for _ in range(REREADS):
        manifest = lake.manifest(dt)
        files = lake.published_files(table, dt, manifest)
        if files is None:
            raise NotPublishedError(f"table {table} has no partition for {dt}")
        try:
            return read(files)
        except OSError:
            if (lake.manifest(dt) or {}).get("publish_id") == (manifest or {}).get("publish_id"):
                raise  # not a republish: a file its own manifest names is unreadable
    raise NotPublishedError(f"table {table} for {dt} was published again {REREADS} times while it was read")


def read_published(lake: Lake, table: str, date: str | None = None, columns: list[str] | None = None,
                   filters: list[tuple] | None = None) -> pa.Table:
    """A published table of a date (the newest by default): the files one manifest names, all of them; only the
    rows `filters` keep (Lake.read_files)."""
    # only these columns are read from the files
    return _with_rereads(lake, table, resolve_date(lake, date),
                         lambda files: lake.read_files(table, files, columns, filters))


def _file_batches(lake: Lake, files: list[str], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    for path in files:
        with lake.fs.open_input_file(path) as source:
            # Not pre-buffered: pyarrow would read far ahead of the batch (whole files of row groups).
            yield from pq.ParquetFile(source, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=columns)


class NewestManifests:
    """The published tables as the dates' newest manifests show them: what readers read by default
    (delta_tables.TablesAsOf reads them at an earlier version)."""

    def __init__(self, lake: Lake):
        self.lake = lake

    def resolve_date(self, date: str | None) -> str:
        return resolve_date(self.lake, date)

    def read(self, table: str, date: str, columns: list[str] | None = None,
             filters: list[tuple] | None = None) -> pa.Table:
        return read_published(self.lake, table, date, columns, filters)

    def scan(self, table: str, date: str, columns: list[str], consume: Callable[[Iterator[pa.RecordBatch]], T],
             batch_rows: int) -> T:
        """consume(the date's rows of `table` in batches of at most `batch_rows`): one batch in memory at a time
        (a table too large to read whole, such as a million products' embeddings); from the start again if the
        date is published again while it is read."""
        return _with_rereads(self.lake, table, date,
                             lambda files: consume(_file_batches(self.lake, files, columns, batch_rows)))


def published_dataset(lake: Lake, table: str) -> ds.Dataset | None:
    """All committed partitions of a table as one dataset with a `dt` column: the files each date's manifest names
    when the dataset is made (a query on it survives one republish of a date, not two). Its schema unites the
    partitions' (one footer read per date): a column a later release added reads as nulls in older partitions
    instead of vanishing because the oldest file lacks it."""
    by_date = [files for d in committed_dates(lake) if (files := lake.published_files(table, d))]
    if not by_date:
        return None
    dt = pa.schema([("dt", pa.string())])
    schema = pa.unify_schemas([ds.dataset(files[0], filesystem=lake.fs, format="parquet").schema
                               for files in by_date] + [dt])
    return ds.dataset([f for files in by_date for f in files], schema=schema, filesystem=lake.fs, format="parquet",
                      partitioning=ds.partitioning(dt, flavor="hive"), partition_base_dir=lake.path(table))
