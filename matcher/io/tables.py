"""The registry of the lake's tables, read from schemas/tables.json: each table's schema, the stage that writes
it, whether publish makes it visible and whether `matcher query` shows it. Everything that lists tables (publish,
the manifest, the score stage's builders, the CLI, the report) reads this registry. A published table is built by
the score stage either from its entry's `query` (Spark SQL over the tables built before it: one entry is the whole
table) or, where a query cannot say it (executor kernels over vectors), by a builder in jobs/score.py."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd
import pyarrow as pa

from matcher.config import SCHEMAS_DIR

_SCALARS = {
    "string": pa.string(), "binary": pa.binary(), "bool": pa.bool_(), "int32": pa.int32(),
    "int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64(),
}


@dataclass(frozen=True)
class Table:
    name: str
    stage: str          # the stage that writes it
    published: bool     # staged by score and made visible by publish
    queryable: bool     # a view of `matcher query`
    description: str
    schema: pa.Schema
    query: str | None = None  # Spark SQL that builds a published table (jobs/score_queries.py runs it)


def parse_type(spec: str) -> pa.DataType:
    spec = spec.strip()
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(parse_type(spec[5:-1]))
    try:
        return _SCALARS[spec]
    except KeyError:
        raise ValueError(f"unknown column type {spec!r} in schemas/tables.json") from None


def type_name(kind: pa.DataType) -> str:
    """A column type as schemas/tables.json spells it (parse_type's inverse)."""
    if pa.types.is_list(kind):
        return f"list<{type_name(kind.value_type)}>"
    return next((name for name, scalar in _SCALARS.items() if scalar == kind), str(kind))


def describe_table(name: str) -> dict:
    """A table's registry entry as a plain document (what `matcher tables describe` prints)."""
    t = tables()[name]
    return {"table": name, "stage": t.stage, "published": t.published, "queryable": t.queryable,
            "description": t.description, "columns": {f.name: type_name(f.type) for f in t.schema},
            "query": t.query}


@lru_cache(maxsize=None)
def tables() -> dict[str, Table]:
    """Every table of the lake, in the order the registry lists them."""
    with open(SCHEMAS_DIR / "tables.json", encoding="utf-8") as fh:
        return parse_registry(json.load(fh))


def parse_registry(doc: dict) -> dict[str, Table]:
    """The tables of a registry document (schemas/tables.json's form), refusing an entry the stages cannot build."""
    out = {}
    for name, t in doc["tables"].items():
        unknown = set(t) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"table {name} in schemas/tables.json: unknown keys {sorted(unknown)}")
        query = t.get("query")
        if isinstance(query, list):  # the lines of a long query, for the file's readers
            query = "\n".join(query)
        if query is not None and not (t["published"] and t["stage"] == "score"):
            raise ValueError(f"table {name} in schemas/tables.json: a query builds a published table of the score "
                             "stage only (stage \"score\", published true)")
        out[name] = Table(name, t["stage"], bool(t["published"]), bool(t["queryable"]), t["description"],
                          pa.schema([(col, parse_type(kind)) for col, kind in t["columns"].items()]), query)
    return out


_ENTRY_KEYS = {"stage", "published", "queryable", "description", "columns", "query"}


def query_tables() -> tuple[str, ...]:
    """The published tables built from their registry entry's query."""
    return tuple(name for name, t in tables().items() if t.query is not None)


def published_tables() -> tuple[str, ...]:
    """The tables the score stage stages and publish makes visible."""
    return tuple(name for name, t in tables().items() if t.published)


def run_tables() -> tuple[str, ...]:
    """The tables a run's clean stage commits, made visible to readers by the manifest (queryable, not staged)."""
    return tuple(name for name, t in tables().items() if not t.published and t.queryable)


def queryable_tables() -> tuple[str, ...]:
    return tuple(name for name, t in tables().items() if t.queryable)


def table_schema(name: str) -> pa.Schema:
    try:
        return tables()[name].schema
    except KeyError:
        raise KeyError(f"no schema for table {name!r}") from None


def cast_to_table_schema(name: str, table: pa.Table) -> pa.Table:
    """Cast a table's declared columns to schemas/tables.json (declared first, extra columns after); a table the
    registry does not declare, as it is."""
    try:
        schema = table_schema(name)
    except KeyError:
        return table
    declared = [c for c in schema.names if c in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    target = pa.schema([schema.field(c) for c in declared] + [table.schema.field(c) for c in extra])
    return table.select(declared + extra).cast(target)


def to_arrow(name: str, df: pd.DataFrame) -> pa.Table:
    """Convert a DataFrame to the table's schema: declared columns first with their types, extra columns after."""
    schema = table_schema(name)
    missing = [c for c in schema.names if c not in df.columns]
    if missing:
        raise ValueError(f"table {name}: missing columns {missing}")
    extra = [c for c in df.columns if c not in schema.names]
    arrays = [pa.array(df[c].tolist(), type=schema.field(c).type) for c in schema.names]
    fields_ = list(schema)
    for c in extra:
        arr = pa.array(df[c].tolist())
        arrays.append(arr)
        fields_.append(pa.field(c, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields_))
