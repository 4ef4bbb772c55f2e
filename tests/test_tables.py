"""The table registry (schemas/tables.json) is the one list of the lake's tables: the score stage has a builder for
each published table its entry does not define by a query, and no other; the query command and the reference show
each one."""
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.score import TABLE_BUILDERS
from jobs.score_queries import query_placeholders
from matcher.config import SCHEMAS_DIR
from matcher.io import tables as registry
from matcher.io.tables import describe_table, parse_registry, published_tables, query_tables, table_schema, tables

ROOT = Path(__file__).resolve().parent.parent


def registry_doc() -> dict:
    return json.loads((SCHEMAS_DIR / "tables.json").read_text(encoding="utf-8"))


def test_each_published_table_is_built_by_its_query_or_by_one_builder():
    assert set(TABLE_BUILDERS).isdisjoint(query_tables())
    assert [t for t in published_tables() if t not in query_tables()] == list(TABLE_BUILDERS)
    assert published_tables()[0] == "embeddings"  # the other builders read the vectors it writes


def test_every_table_has_a_schema_a_stage_and_a_description():
    for name, table in tables().items():
        assert isinstance(table_schema(name), pa.Schema) and len(table_schema(name)) > 0, name
        assert table.stage in ("clean", "extract", "score") and table.description, name
        assert not table.published or table.stage == "score", name
        assert [registry.parse_type(registry.type_name(f.type)) for f in table.schema] == table.schema.types, name
    assert set(registry.run_tables()) | set(published_tables()) == set(registry.queryable_tables())


def test_a_query_table_reads_only_inputs_a_night_has_before_it():
    order = list(published_tables())
    for name in query_tables():
        named = set(query_placeholders(tables()[name].query))
        assert named and named <= {"clean", *order[:order.index(name)]}, (name, named)


def test_the_score_stage_refuses_a_table_built_both_ways_or_neither(monkeypatch):
    from jobs.context import StageError
    from jobs.score import _check_builders

    _check_builders()  # the shipped registry
    monkeypatch.setitem(TABLE_BUILDERS, "exposure", TABLE_BUILDERS["search"])
    with pytest.raises(StageError, match=re.escape("both a query in schemas/tables.json and a builder in "
                                                   "jobs/score.py: ['exposure']; with neither: []")):
        _check_builders()
    monkeypatch.delitem(TABLE_BUILDERS, "exposure")
    monkeypatch.delitem(TABLE_BUILDERS, "search")
    with pytest.raises(StageError, match=re.escape("with neither: ['search']")):
        _check_builders()


@pytest.mark.parametrize("change, says", [
    ({"stage": "clean", "published": False}, "a query builds a published table of the score stage only"),
    ({"published": False}, "a query builds a published table of the score stage only"),
    ({"sql": "SELECT 1"}, "unknown keys ['sql']"),
])
def test_the_registry_refuses_an_entry_no_stage_can_build(change, says):
    doc = registry_doc()
    doc["tables"]["exposure"].update(change)
    with pytest.raises(ValueError, match=re.escape(says)) as err:
        parse_registry(doc)
    assert "table exposure" in str(err.value)


def test_the_reference_documents_every_table_built_by_code_and_describe_shows_every_table(capsys):
    """A table built by code is explained in docs/lake.md; a table defined by its query is explained by its entry
    (description, columns, query), which `matcher tables describe` prints."""
    from matcher.app.cli import main

    doc = (ROOT / "docs" / "lake.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(\w+)/dt=D/`", doc))
    assert set(tables()) - set(query_tables()) <= listed, sorted(set(tables()) - set(query_tables()) - listed)

    assert main(["tables", "describe", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert [d["table"] for d in described] == list(tables())
    assert described == [describe_table(name) for name in tables()]
    assert main(["tables", "describe", "--table", "exposure"]) == 0
    text = capsys.readouterr().out
    entry = tables()["exposure"]
    assert entry.description in text and all(line in text for line in entry.query.splitlines())
    assert "times_recommended int32" in text


def _flat(doc: str) -> str:
    return " ".join((ROOT / "docs" / doc).read_text(encoding="utf-8").split())


def test_the_docs_name_each_tables_columns_assets_and_query_views_as_the_registry_does():
    from jobs.airflow_tasks import table_assets
    from matcher.io.tables import queryable_tables

    lake = (ROOT / "docs" / "lake.md").read_text(encoding="utf-8")
    documented = {name: [re.sub(r"\s*\(.*?\)", "", c).strip() for c in columns.split(",")]
                  for name, columns in re.findall(r"^\| `(\w+)/dt=D/` \| `([^`]*)`", lake, re.M)}
    documented.update(re.findall(r"`(\w+)/dt=D/` \(`([^`]*)`\)", lake))  # a table defined by a query, in prose
    documented = {n: c.split(", ") if isinstance(c, str) else c for n, c in documented.items()
                  if n in tables()}  # not validation/ (files, not a table)
    assert set(documented) >= set(published_tables()), sorted(set(published_tables()) - set(documented))
    for name, columns in documented.items():
        assert columns == table_schema(name).names, name

    assets = re.findall(r"`matcher\.(\w+)`", _flat("operations.md").split("URI `matcher://tables/")[0])
    assert sorted(assets) == sorted(a.name.removeprefix("matcher.") for a in table_assets().values())

    views = re.search(r"views `([^`]*)`", _flat("running.md")).group(1).split(", ")
    assert sorted(views) == sorted(queryable_tables())


def columns_read(query: str, table: str, clean: pa.Schema) -> pa.Schema:
    """What the night reads of input `table` for exposure's entry with this query."""
    from jobs.score_queries import input_schemas

    doc = registry_doc()
    doc["tables"]["exposure"]["query"] = query
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("jobs.score_queries.tables", lambda: parse_registry(doc))
        return input_schemas("exposure", clean)[table]


def test_a_query_tables_inputs_are_read_with_only_the_columns_its_query_names():
    from jobs.score_queries import input_schemas

    clean = table_schema("clean")
    read = {t: s.names for t, s in input_schemas("exposure", clean).items()}
    assert read == {"categories": ["product_id", "category", "model_version"],  # only the inputs it names
                    "recommendations": ["product_id", "rank", "rec_product_id", "model_version"]}
    embeddings = table_schema("embeddings")
    # A count, a string and a comment read no column: none named, so all.
    assert columns_read("SELECT COUNT(*) AS n, '--image_vec' AS s FROM {embeddings} /* text_vec */", "embeddings",
                        clean) == embeddings
    assert columns_read("SELECT COUNT(*) AS n, fused_vec FROM {embeddings} -- text_vec", "embeddings",
                        clean).names == ["fused_vec"]
    assert columns_read("SELECT e.* FROM {embeddings} e", "embeddings", clean) == embeddings  # a star reads all
    assert columns_read("SELECT category FROM {categories} NATURAL JOIN {embeddings}", "embeddings",
                        clean) == embeddings  # joins unnamed columns
    odd = pa.schema(list(clean) + [("price ($)", pa.float64())])  # a catalog's pass-through column, as it came
    assert columns_read("SELECT `price ($)` FROM {clean}", "clean", odd).names == ["price ($)"]


@pytest.mark.parametrize("query, named", [
    ("SELECT 1 FROM {a} JOIN {b} USING (x) JOIN {a}", ["a", "b"]),
    ("SELECT '{{not}}' FROM {{{a}}}", ["a"]),
])
def test_query_placeholders_are_read_as_pysparks_formatter_reads_them(query, named):
    assert query_placeholders(query) == named


@pytest.mark.parametrize("query, says", [
    ("SELECT '{' FROM {a}", "a single { or }"),
    ("SELECT 1 FROM {a.b}", "got {a.b}"),
    ("SELECT 1 FROM {}", "got {}"),
])
def test_a_brace_that_is_no_plain_input_name_is_refused(query, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        query_placeholders(query)
