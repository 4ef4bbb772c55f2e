"""score: the published tables that schemas/tables.json defines by a `query`, so that such a table is one registry
entry and no code. The query is Spark SQL run on executors; it names its inputs in braces: `{clean}` (the date's
cleaned catalog, its photo bytes left out) and each published table built before it in the registry's order
(`{embeddings}`, `{recommendations}`, ...), as this night's attempt staged them. A literal brace is written twice.

Every query is checked against its inputs' schemas before the night's scoring starts (its columns and their types
must be the entry's), so a wrong entry fails the stage in its first seconds, naming the table, not after the
all-pairs pass."""
from __future__ import annotations

import re
import uuid
from string import Formatter

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession

from jobs.context import StageError
from jobs.spark_lake import read_parts, spark_schema
from matcher.io.lake import Lake
from matcher.io.tables import published_tables, query_tables, table_schema, tables

CATALOG_INPUT = "clean"


def clean_input_schema(lake: Lake, date: str) -> tuple[list[str], pa.Schema]:
    """The date's clean part files and the schema a query sees of them: every column (the catalog's pass-through
    columns included) except binary ones, the photos' bytes."""
    files = lake.partition_files(CATALOG_INPUT, date)
    schema = pq.read_schema(files[0], filesystem=lake.fs) if files else table_schema(CATALOG_INPUT)
    return files, pa.schema([f for f in schema if not pa.types.is_binary(f.type)])


def table_inputs(name: str) -> list[str]:
    """The inputs the query of table `name` may read: the clean catalog and the published tables before it."""
    order = list(published_tables())
    return [CATALOG_INPUT] + order[:order.index(name)]


def query_placeholders(query: str) -> list[str]:
    """The inputs a query names, in order, parsed as str.format (and pyspark) parse braces; a ValueError for a
    brace that is not a placeholder or a placeholder that is not a plain name."""
    try:
        fields = [f for _, f, _, _ in Formatter().parse(query) if f is not None]
    except ValueError:
        raise ValueError("a single { or }: a literal brace is written twice") from None
    odd = [f for f in fields if not f.isidentifier()]
    if odd:
        raise ValueError(f"placeholders are plain input names such as {{embeddings}}, got {{{odd[0]}}}")
    return list(dict.fromkeys(fields))


def table_from_query(spark: SparkSession, name: str, inputs: dict[str, DataFrame]) -> DataFrame:
    """Table `name`'s rows by its registry query over `inputs` (lazy: Spark analyses the query here and runs it
    when the table is written), its columns in the registry's order. A query that does not parse or resolve, or
    whose columns or types are not the entry's, is a StageError naming the table."""
    query = tables()[name].query
    if query is None:
        raise ValueError(f"table {name} has no query in schemas/tables.json")
    where = f"the query of table {name} in schemas/tables.json"
    try:
        named = query_placeholders(query)
    except ValueError as exc:
        raise StageError("score", f"{where}: {exc}") from None
    unknown = [u for u in named if u not in inputs]
    if unknown:
        allowed = table_inputs(name)
        raise StageError("score", f"{where} reads {', '.join('{' + u + '}' for u in unknown)}, not among its "
                                  f"inputs ({', '.join('{' + i + '}' for i in allowed)})")
    # Views named after the inputs (pyspark's own formatter names them _pyspark_<uuid>), so that Spark's messages
    # say which input they mean; dropped once Spark has analysed the query, which holds the plans it needs.
    tag = uuid.uuid4().hex[:8]
    views = {i: f"input_{i}_{tag}" for i in named}
    try:
        for i, view in views.items():
            inputs[i].createOrReplaceTempView(view)
        frame = spark.sql(query.format(**views))
    except Exception as exc:  # noqa: BLE001 (Spark's parse and analysis errors have no common Python base)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError("score", f"{where} fails: {first} (its inputs: "
                                  f"{', '.join('{' + i + '} as ' + v for i, v in views.items())})") from exc
    finally:
        for view in views.values():
            spark.catalog.dropTempView(view)
    twice = sorted({c for c in frame.columns if frame.columns.count(c) > 1})
    if twice:
        raise StageError("score", f"{where} returns columns {twice} more than once")
    declared = spark_schema(table_schema(name))
    got = {f.name: f.dataType.simpleString() for f in frame.schema}
    want = {f.name: f.dataType.simpleString() for f in declared}
    if set(got) != set(want):
        raise StageError("score", f"{where} returns columns {list(got)}; its entry declares {list(want)}")
    wrong = [f"{c} is {got[c]}, declared {t}" for c, t in want.items() if got[c] != t]
    if wrong:
        raise StageError("score", f"{where} returns {'; '.join(wrong)} (CAST it in the query)")
    return frame.select(*want)


def input_schemas(name: str, clean_schema: pa.Schema) -> dict[str, pa.Schema]:
    """The schema of each input that table `name`'s query names, as it is read: only the columns its text names
    (every column where it has a `*`, a NATURAL join or a PIVOT, which read columns it does not name), since the
    inputs are read by executors column by column and the photo vectors of every product are no small read. The
    check analyses the query over these same schemas, so a column left out here would fail the check, not the
    night."""
    # Comments and string literals name no column; COUNT(*) reads none.
    text = re.sub(r"/\*.*?\*/|--[^\n]*|'(?:[^'\\]|\\.)*'", " ", tables()[name].query or "", flags=re.S)
    text = re.sub(r"\bcount\s*\(\s*\*\s*\)", "count(1)", text, flags=re.I)
    every = "*" in text or re.search(r"\b(natural|pivot|unpivot)\b", text, re.I) is not None
    try:
        named_inputs = set(query_placeholders(tables()[name].query or ""))
    except ValueError:
        named_inputs = set()  # table_from_query says what is wrong with the braces
    schemas = {}
    for table in [t for t in table_inputs(name) if t in named_inputs]:
        schema = clean_schema if table == CATALOG_INPUT else table_schema(table)
        named = [f for f in schema if every or re.search(rf"(?<!\w){re.escape(f.name)}(?!\w)", text, re.I)]
        schemas[table] = pa.schema(named or list(schema))
    return schemas


def check_table_queries(spark: SparkSession, clean_schema: pa.Schema) -> None:
    """Analyse every registry query over empty inputs of the night's schemas; runs no Spark job."""
    for name in query_tables():
        schemas = input_schemas(name, clean_schema)
        table_from_query(spark, name, {i: spark.createDataFrame([], spark_schema(s)) for i, s in schemas.items()})


def night_inputs(spark: SparkSession, lake: Lake, clean_files: list[str], clean_schema: pa.Schema,
                 staged: dict[str, list[str]], name: str) -> dict[str, DataFrame]:
    """Table `name`'s inputs as DataFrames read on executors: the clean partition and the part files this attempt
    wrote of each published table before it (`staged`, lake-relative)."""
    return {table: read_parts(spark, lake, clean_files if table == CATALOG_INPUT else
                              [lake.path(p) for p in staged[table]], schema)
            for table, schema in input_schemas(name, clean_schema).items()}
