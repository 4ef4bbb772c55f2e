"""Spark DataFrames of products and their vectors: numbering rows densely in a key's order on executors, and
reading Arrow list<float> columns as matrices."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.spark_lake import spark_schema

MD5_PREFIX_SPACE = 16 ** 12  # first_by_md5's filter key: md5(product_id)'s first 12 hex digits as a number


def first_by_md5(frame: DataFrame, size: int, n: int, columns: list[str]) -> pa.Table:
    """The `size` rows of `frame` (n rows) first by md5(product_id), then product_id, chosen on executors, as an
    Arrow table (Rows of Python floats take many times its memory): the driver receives `size` rows whatever
    n is (the ordered limit's last merge runs on an executor when collected as Arrow)."""
    if size <= 0:
        return frame.select(*columns).limit(0).toArrow()
    # An ordered limit alone sends every partition's best `size` rows to the driver (Spark's top-k per partition):
    # nearly the whole catalog when partitions hold about `size` rows. A filter on the key's leading hex digits
    # first keeps about twice `size` rows on the executors; it keeps every row below its threshold, so when at
    # least `size` pass, the first `size` are among them (else the threshold doubles).
    key = F.conv(F.substring(F.md5("product_id"), 1, 12), 16, 10).cast("long")
    share = 2.0 * size / max(n, 1)
    candidates = frame
    while share < 1.0:
        kept = frame.filter(key < int(share * MD5_PREFIX_SPACE))
        if kept.count() >= size:
            candidates = kept
            break
        share *= 2
    return candidates.select(*columns).orderBy(F.md5("product_id"), "product_id").limit(size).toArrow()


def with_dense_index(df: DataFrame, key: str | list[str], partitions: int) -> tuple[DataFrame, DataFrame]:
    """`idx` 0..N-1 in the order of `key`, computed on executors: range partitions sorted within, then each
    partition's offset from the per-partition counts (the only thing the driver sees). Returns (the numbered
    rows, the persisted sorted rows they come from: unpersist it when done)."""
    keys = [key] if isinstance(key, str) else key
    ordered = df.repartitionByRange(partitions, *keys).sortWithinPartitions(*keys).persist(StorageLevel.MEMORY_AND_DISK)

    def count(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        rows = sum(b.num_rows for b in batches)
        yield pa.RecordBatch.from_pylist([{"part": TaskContext.get().partitionId(), "rows": rows}])

    counts = dict((r["part"], r["rows"]) for r in ordered.mapInArrow(count, "part long, rows long").collect())
    offsets, total = {}, 0
    for part in sorted(counts):
        offsets[part], total = total, total + counts[part]
    schema = pa.schema([*[pa.field(f.name, _arrow_type(f.dataType)) for f in df.schema.fields], ("idx", pa.int64())])

    def number(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        next_idx = offsets.get(TaskContext.get().partitionId(), 0)
        for b in batches:
            yield b.append_column("idx", pa.array(np.arange(next_idx, next_idx + b.num_rows), pa.int64()))
            next_idx += b.num_rows

    return ordered.mapInArrow(number, spark_schema(schema)), ordered


def _arrow_type(spark_type) -> pa.DataType:
    from pyspark.sql.pandas.types import to_arrow_type

    return to_arrow_type(spark_type)
