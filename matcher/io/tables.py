"""Arrow schemas of the lake's tables, read from schemas/tables.json."""
from __future__ import annotations

import json
from functools import lru_cache

import pandas as pd
import pyarrow as pa

from matcher.config import SCHEMAS_DIR

_SCALARS = {
    "string": pa.string(), "binary": pa.binary(), "bool": pa.bool_(), "int32": pa.int32(),
    "int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64(),
}


def parse_type(spec: str) -> pa.DataType:
    spec = spec.strip()
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(parse_type(spec[5:-1]))
    try:
        return _SCALARS[spec]
    except KeyError:
        raise ValueError(f"unknown column type {spec!r} in schemas/tables.json") from None


@lru_cache(maxsize=None)
def table_schema(name: str) -> pa.Schema:
    with open(SCHEMAS_DIR / "tables.json", encoding="utf-8") as fh:
        spec = json.load(fh)
    if name not in spec:
        raise KeyError(f"no schema for table {name!r}")
    return pa.schema([(col, parse_type(t)) for col, t in spec[name].items()])


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
