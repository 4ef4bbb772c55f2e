"""Lake partitions read and written by Spark executors, through the project's storage layer (pyarrow's file://
and s3:// filesystems in the Python workers, as clip-retrieval's workers do), so no Hadoop S3 connector is needed.

The driver only handles metadata: it lists a partition's files (from its commit point), hands the paths to
executors, and gets back one small row per written part file (path, rows, statistics)."""
from __future__ import annotations

import contextvars
import json
import logging
import posixpath
import threading
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from matcher.io.lake import Lake
from matcher.io.tables import cast_to_table_schema, table_schema
from matcher.logs import progress_bar, progress_terminal

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = logging.getLogger("matcher")

# What a writer's mapper yields: (table name, rows) to write, or (STATS, {name: count}) to add up on the driver.
STATS = "__stats__"
Output = tuple[str, "pa.Table | pa.RecordBatch | dict[str, int]"]
# What executors run over a Spark partition's Arrow batches: for write_parts (yielding (table, rows) outputs), or for
# mapInArrow (yielding batches).
PartMapper = Callable[[Iterator[pa.RecordBatch]], Iterable[Output]]
BatchMapper = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]
_META_SCHEMA = "table string, path string, rows long, stats string"


def spark_schema(schema: pa.Schema) -> StructType:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def read_parts(spark: SparkSession, lake: Lake, files: list[str], schema: pa.Schema, columns: list[str] | None = None,
               batch_rows: int = 1024) -> DataFrame:
    """A DataFrame over Parquet part files (full paths on the lake), read by executors one file per task, a
    record batch at a time. `schema` is the table's Arrow schema (its `columns`, when given, are read)."""
    wanted = pa.schema([schema.field(c) for c in columns]) if columns else schema
    names = wanted.names

    def read_files(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for path in batch.column("path").to_pylist():
                parquet = pq.ParquetFile(path, filesystem=lake.fs)
                for rb in parquet.iter_batches(batch_size=batch_rows, columns=names):
                    yield from pa.Table.from_batches([rb]).select(names).cast(wanted).to_batches()

    paths = spark.createDataFrame([(f,) for f in files], "path string") if files else \
        spark.createDataFrame([], "path string")
    return paths.repartition(max(1, len(files))).mapInArrow(read_files, spark_schema(wanted))


def read_partition(spark: SparkSession, lake: Lake, table: str, dt: str, columns: list[str] | None = None,
                   schema: pa.Schema | None = None) -> DataFrame | None:
    """A committed partition of a lake table as a DataFrame read on executors; None when it does not exist."""
    files = lake.partition_files(table, dt)
    if not files and lake.committed(table, dt) is None and lake.manifest(dt) is None:
        return None
    if schema is None:
        schema = pq.read_schema(files[0], filesystem=lake.fs) if files else table_schema(table)
    return read_parts(spark, lake, files, schema, columns)


@dataclass
class Written:
    """What executors wrote: part files per table (lake-relative) and summed statistics."""
    parts: dict[str, list[str]] = field(default_factory=dict)
    rows: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)


# A part file's row groups: Spark hands a task's rows over in batches of spark.arrow_batch_size (256), and a row group
# each made files several times larger (mostly footers) and every reader's scan slower. The bytes
# bound keeps the clean table's groups (photos) small: the run report reads whole groups to show a few products.
ROW_GROUP_ROWS, ROW_GROUP_BYTES = 65_536, 8 << 20


def write_parts(df: DataFrame, mapper: PartMapper, lake: Lake, dt: str,
                attempt: str, tables: Iterable[str], progress: "Progress | None" = None) -> Written:
    """Run `mapper` over each Spark partition of `df` on executors; each task writes what it yields as one Parquet
    part file per table under the attempt's work folder, cast to the table's schema (schemas/tables.json, extra
    columns kept). The driver gets back only (table, path, rows, stats) per part."""
    tables = list(tables)
    counter, rows_of = (progress.accumulator, progress.rows_of) if progress else (None, None)

    def write_task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        tc = TaskContext.get()
        tag = f"{tc.partitionId():05d}-{tc.attemptNumber()}-{uuid.uuid4().hex[:6]}" if tc else uuid.uuid4().hex
        writers: dict[str, tuple[pq.ParquetWriter, str]] = {}
        pending: dict[str, list[pa.Table]] = {}  # a table's batches not yet written: one row group when written
        rows: Counter = Counter()
        stats: Counter = Counter()

        def flush(name: str) -> None:
            batch = pa.concat_tables(pending.pop(name))
            if name not in writers:
                rel = Lake.part_file(name, dt, attempt, tag)
                lake.fs.create_dir(lake.path(posixpath.dirname(rel)), recursive=True)
                writers[name] = (pq.ParquetWriter(lake.path(rel), batch.schema, filesystem=lake.fs,
                                                  compression="zstd"), rel)
            writers[name][0].write_table(batch)
            rows[name] += batch.num_rows

        def counted(source: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for rb in source:
                yield rb
                if counter is not None:
                    counter.add(rows_of(rb))

        for name, data in mapper(counted(batches)):
            if name == STATS:
                stats.update(data)
                continue
            table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
            if table.num_rows == 0:
                continue
            pending.setdefault(name, []).append(cast_to_table_schema(name, table))
            if sum(t.num_rows for t in pending[name]) >= ROW_GROUP_ROWS or \
                    sum(t.nbytes for t in pending[name]) >= ROW_GROUP_BYTES:
                flush(name)
        for name in list(pending):
            flush(name)
        out = []
        for name, (writer, rel) in writers.items():
            writer.close()
            out.append({"table": name, "path": rel, "rows": rows[name], "stats": ""})
        out.append({"table": STATS, "path": "", "rows": 0, "stats": json.dumps(dict(stats))})
        yield pa.RecordBatch.from_pylist(out, schema=pa.schema([("table", pa.string()), ("path", pa.string()),
                                                                ("rows", pa.int64()), ("stats", pa.string())]))

    written = Written(parts={t: [] for t in tables})
    with progress or nullcontext():
        for row in df.mapInArrow(write_task, _META_SCHEMA).collect():
            if row["table"] == STATS:
                written.stats.update(json.loads(row["stats"]))
            else:
                written.parts.setdefault(row["table"], []).append(row["path"])
                written.rows[row["table"]] += row["rows"]
    return written


class Progress:
    """Products done / total and the rate, and the running Spark stage's tasks, logged every few seconds while a
    job runs (tasks report products through an accumulator as they finish); on a terminal (matcher.logs), a bar
    redrawn in place instead, and one log line at the end."""

    def __init__(self, spark: SparkSession, label: str, total: int, every: float = 5.0, unit: str = "products",
                 rows_of: Callable[[pa.RecordBatch], int] | None = None):
        self.sc = spark.sparkContext
        self.unit = unit
        self.rows_of = rows_of or (lambda batch: batch.num_rows)  # how many `unit` an input batch holds
        self.accumulator = self.sc.accumulator(0)
        self.label, self.total, self.every = label, total, every
        self._stop = threading.Event()
        # In the stage's log context (matcher.logs), so its lines name the stage and date too.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._report,), daemon=True)

    def _tasks(self) -> str:
        try:
            tracker = self.sc.statusTracker()
            infos = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
            return "; ".join(f"Spark stage {i.stageId}: {i.numCompletedTasks}/{i.numTasks} tasks" for i in infos if i)
        except Exception:  # progress is best effort: never fail a stage over it
            return ""

    def _done_and_rate(self) -> tuple[int, float]:
        done, seconds = self.accumulator.value, time.perf_counter() - self._started
        return done, done / seconds if seconds else 0.0

    def _line(self, tasks: bool = True) -> str:
        done, rate = self._done_and_rate()
        of = f"/{self.total:,} {self.unit} ({100 * done / self.total:.0f}%)" if self.total else f" {self.unit}"
        running = self._tasks() if tasks else ""
        return f"{self.label}: {done:,}{of}, {rate:.1f}/s" + (f" ({running})" if running else "")

    def _report(self) -> None:
        terminal = progress_terminal()
        if terminal is None:
            while not self._stop.wait(self.every):
                log.info(self._line())
            return
        while not self._stop.wait(0.5):
            done, rate = self._done_and_rate()
            bar = progress_bar(self.label, done, self.total, rate, self.unit)
            terminal.write("\r" + bar + "\033[K")
            terminal.flush()
        terminal.write("\r\033[K")  # the bar gives way to the closing log line
        terminal.flush()

    def __enter__(self) -> "Progress":
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        # Accumulator updates reach the driver's Python side just after the job ends.
        deadline = time.perf_counter() + 2.0
        while exc == (None, None, None) and self.total and self.accumulator.value < self.total \
                and time.perf_counter() < deadline:
            time.sleep(0.05)
        log.info(self._line(tasks=False))
