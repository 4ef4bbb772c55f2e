"""The table registry (schemas/tables.json) is the one list of the lake's tables: the score stage has a builder for
each published table and no other, the query command and the reference show each one."""
import re
from pathlib import Path

import pyarrow as pa

from jobs.score import TABLE_BUILDERS
from matcher.io.tables import published_tables, queryable_tables, run_tables, table_schema, tables

ROOT = Path(__file__).resolve().parent.parent


def test_the_score_stage_builds_exactly_the_published_tables():
    assert list(TABLE_BUILDERS) == list(published_tables())
    assert published_tables()[0] == "embeddings"  # the other builders read the vectors it writes


def test_every_table_has_a_schema_a_stage_and_a_description():
    for name, table in tables().items():
        assert isinstance(table_schema(name), pa.Schema) and len(table_schema(name)) > 0, name
        assert table.stage in ("clean", "extract", "score") and table.description, name
        assert not table.published or table.stage == "score", name
    assert set(run_tables()) | set(published_tables()) == set(queryable_tables())


def test_the_lake_reference_lists_every_table():
    doc = (ROOT / "docs" / "lake.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(\w+)/dt=D/`", doc, flags=re.M))
    listed |= set(re.findall(r"`(\w+)/dt=D/`", doc))
    assert set(tables()) <= listed, sorted(set(tables()) - listed)
