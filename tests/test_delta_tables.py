"""The queryable tables are Delta Lake tables: each publish of a date is one version of each, which readers other than
matcher's (deltalake, pandas, DuckDB, Spark SQL) read whole, at any version the vacuum left; a lake published before
the tables had logs migrates by one command; `matcher query --as-of` reads an earlier version."""
import datetime as dt
import json
import shutil
import threading
import time

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable
from pyarrow import fs as pafs

from jobs.context import RunContext, StageError
from jobs.pipeline import run_stage
from jobs.validate import judged_attempt
from matcher.app.cli import main
from matcher.config import load_config
from matcher.io.delta_tables import AsOf, history, open_table, storage_options, table_uri
from matcher.io.lake import Lake
from matcher.io.published import read_published
from matcher.io.tables import queryable_tables
from tests.test_publish_atomic import clean_attempt, publish_night, stage_published_tables, tagged, tags

D1, D2 = "2026-05-01", "2026-05-02"


def delta(lake: Lake, table: str, version: int | None = None) -> DeltaTable:
    return DeltaTable(table_uri(lake, table), version=version, storage_options=storage_options(lake))


def tags_by_date(table) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for pid, date in zip(table.column("product_id").to_pylist(), table.column("dt").to_pylist()):
        out.setdefault(date, set()).add(pid.split("-")[0])
    return out


def cli_json(config, *argv: str, capsys) -> object:
    """A matcher command's --json output, on a local lake."""
    capsys.readouterr()
    assert main([*argv, "--lake", config.run.lake, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.integration
def test_two_nights_are_two_versions_that_deltalake_pandas_and_duckdb_read_after_the_second_replaced_the_first(
        lake_config):
    config = lake_config
    lake = Lake(config.run.lake, config.storage)
    first = publish_night(config, "g1", D1)
    second = publish_night(config, "g2", D1)  # the date published again: the first night's tables replaced
    for table in queryable_tables():
        assert first["tables"][table]["delta_version"] == 0 and second["tables"][table]["delta_version"] == 1

    # deltalake (and pandas through it): the newest version is the second night, version 0 still the first
    assert tags_by_date(delta(lake, "recommendations").to_pyarrow_table()) == {D1: {"g2"}}
    assert tags_by_date(delta(lake, "recommendations", 0).to_pyarrow_table()) == {D1: {"g1"}}
    frame = delta(lake, "quarantine", 0).to_pandas()
    assert {p.split("-")[0] for p in frame["product_id"]} == {"g1"} and len(frame) == 2

    # DuckDB, on the Arrow datasets deltalake opens at each version (its own delta extension is downloaded on
    # first use, which a machine without the internet cannot)
    con = duckdb.connect()
    con.register("recs_v0", delta(lake, "recommendations", 0).to_pyarrow_dataset())
    con.register("recs_now", delta(lake, "recommendations").to_pyarrow_dataset())
    rows = con.sql("SELECT split_part(product_id, '-', 1) AS tag, dt, count(*) FROM recs_v0 GROUP BY ALL "
                   "UNION ALL SELECT split_part(product_id, '-', 1), dt, count(*) FROM recs_now GROUP BY ALL "
                   "ORDER BY 1").fetchall()
    assert rows == [("g1", D1, 6), ("g2", D1, 6)]  # each night whole: both of its part files, no file of the other

    # matcher's own readers agree with the newest version
    assert tags(read_published(lake, "recommendations", D1)) == {"g2"}


def replayed_in_order(lake: Lake, table: str) -> dict[str, set[str]]:
    """The live files of each date as a reader applying every commit's actions in order (as Spark's log replay and
    Delta Kernel do) sees them: not deltalake's reading, which keeps a file a commit both adds and removes."""
    live: dict[str, str] = {}
    log = sorted(lake.fs.get_file_info(pafs.FileSelector(lake.path(f"{table}/_delta_log"))), key=lambda i: i.path)
    for info in (i for i in log if i.path.endswith(".json")):
        for line in lake.read_bytes(lake.relative(info.path)).decode().splitlines():
            action = json.loads(line)
            if "add" in action:
                live[action["add"]["path"]] = action["add"]["partitionValues"]["dt"]
            elif "remove" in action:
                live.pop(action["remove"]["path"], None)
    out: dict[str, set[str]] = {}
    for path, date in live.items():
        out.setdefault(date, set()).add(path)
    return out


@pytest.mark.integration
def test_a_rescore_republishing_the_clean_stages_files_keeps_them_for_readers_replaying_the_log(lake_config):
    config = lake_config
    lake = Lake(config.run.lake, config.storage)
    first = publish_night(config, "g1", D1)
    publish_night(config, "g2", D2)
    stage_published_tables(lake, D1, "r1")  # score and publish again, clean not rerun: its files as logged
    run_stage("publish", RunContext(config, D1))
    second = lake.manifest(D1)
    for table in queryable_tables():  # every table one version more: the version numbers stay in step
        assert second["tables"][table]["delta_version"] == 2, (table, second["tables"][table])
    for table in ("clean", "quarantine"):
        assert second["tables"][table]["files"] == first["tables"][table]["files"]
        replayed = replayed_in_order(lake, table)
        assert replayed[D1] == {f.removeprefix(f"{table}/") for f in first["tables"][table]["files"]}, table
        assert len(delta(lake, table).to_pyarrow_table().filter(pc.field("dt") == D1)) == \
            first["tables"][table]["rows"]
    assert tags_by_date(delta(lake, "recommendations").to_pyarrow_table()) == {D1: {"r1"}, D2: {"g2"}}
    assert replayed_in_order(lake, "recommendations")[D1] == {
        f.removeprefix("recommendations/") for f in second["tables"]["recommendations"]["files"]}


@pytest.mark.integration
def test_a_night_keeping_some_of_a_dates_logged_files_and_replacing_others_commits_no_table(lake_config):
    config = lake_config
    lake = Lake(config.run.lake, config.storage)
    first = publish_night(config, "g1", D1)
    # clean's commit names one logged file and one new one (no stage writes that): an overwrite would add and
    # remove the kept path in one commit
    logged = first["tables"]["clean"]["files"][0]
    extra = logged.replace(".parquet", "-extra.parquet")
    lake.write_bytes(extra, lake.read_bytes(logged))
    lake.write_json(f"clean/dt={D1}/_committed.json", lake.committed("clean", D1) | {"files": [logged, extra]})
    lake.write_json(f"{Lake.validation_dir(D1)}/result.json",
                    {"success": True, "clean_attempt": judged_attempt(lake, D1)})
    stage_published_tables(lake, D1, "r1")
    with pytest.raises(StageError, match=r"table clean: the night keeps .* and replaces others"):
        run_stage("publish", RunContext(config, D1))
    for table in queryable_tables():  # checked before any table commits: none did
        assert delta(lake, table).version() == first["tables"][table]["delta_version"], table


@pytest.mark.integration
def test_spark_sql_reads_both_versions_through_the_files_each_version_names(tmp_path):
    from jobs.spark import get_spark

    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)
    publish_night(config, "g1", D2)
    publish_night(config, "g2", D1)
    spark = get_spark(config.spark)
    seen = {}
    for version in (1, 2):
        files = delta(lake, "recommendations", version).file_uris()
        frame = spark.read.option("basePath", table_uri(lake, "recommendations")).parquet(*files)
        frame.createOrReplaceTempView("recs")
        seen[version] = {(r.tag, r.dt) for r in spark.sql(
            "SELECT DISTINCT split(product_id, '-')[0] AS tag, CAST(dt AS STRING) AS dt FROM recs").collect()}
    assert seen == {1: {("g1", D1), ("g1", D2)}, 2: {("g2", D1), ("g1", D2)}}


@pytest.mark.integration
def test_a_delta_reader_looping_during_republishes_never_fails_and_never_mixes(lake_config):
    config = lake_config
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g0", D1)
    stop = threading.Event()
    seen: list[dict] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(tags_by_date(delta(lake, "recommendations").to_pyarrow_table()))
            except BaseException as exc:  # noqa: BLE001 -- any error at all fails the test
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for night in range(1, 5):
            publish_night(config, f"g{night}", D1)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert all(list(s) == [D1] and len(s[D1]) == 1 for s in seen), [s for s in seen if len(s.get(D1, ())) != 1][:3]
    assert len({g for s in seen for g in s[D1]}) >= 2  # reads did overlap republishes


@pytest.mark.integration
def test_dates_published_at_once_each_land_in_their_own_version(lake_config):
    """On a local disk and on S3 (no atomic rename: deltalake's unsafe rename under the lake's tables lock)."""
    config = lake_config
    lake = Lake(config.run.lake, config.storage)
    errors: list[BaseException] = []

    def night(date: str) -> None:
        try:
            publish_night(config, "g1", date)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=night, args=(d,)) for d in (D1, D2, "2026-05-03")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    table = delta(lake, "recommendations")
    assert table.version() == 2
    assert set(tags_by_date(table.to_pyarrow_table())) == {D1, D2, "2026-05-03"}
    assert sorted(h["dates"] for h in history(lake, "recommendations")) == [D1, D2, "2026-05-03"]


@pytest.mark.integration
def test_a_lake_published_before_the_tables_had_logs_migrates_by_one_command(tmp_path, capsys):
    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)
    publish_night(config, "g1", D2)
    publish_night(config, "g2", D1)
    for table in queryable_tables():  # what the code before the logs left: the same folders, no _delta_log
        shutil.rmtree(lake.path(Lake.delta_log_dir(table)))
    assert open_table(lake, "recommendations") is None
    assert main(["query", "select 1", "--as-of", "0", "--lake", config.run.lake]) == 1
    assert "run `matcher tables migrate`" in capsys.readouterr().err
    assert main(["-q", "recommend", "g2-0", "--as-of", "0", "--lake", config.run.lake]) == 1  # the same reason
    assert "have no Delta logs yet (published before they had them): run `matcher tables migrate`" in \
        capsys.readouterr().err

    migrated = cli_json(config, "tables", "migrate", capsys=capsys)["versions_written"]
    assert migrated == {t: 0 for t in queryable_tables()}
    for table in queryable_tables():  # the log's one version is what each date's manifest names
        for date in (D1, D2):
            assert tags(delta(lake, table).to_pyarrow_table(filters=[("dt", "=", date)])) == \
                tags(read_published(lake, table, date)), (table, date)
    assert cli_json(config, "tables", "migrate", capsys=capsys)["versions_written"] == {}  # idempotent

    publish_night(config, "g3", D2)  # the next night adds a version on top of the migrated one
    assert tags_by_date(delta(lake, "recommendations").to_pyarrow_table()) == {D1: {"g2"}, D2: {"g3"}}
    assert tags_by_date(delta(lake, "recommendations", 0).to_pyarrow_table()) == {D1: {"g2"}, D2: {"g1"}}


@pytest.mark.integration
def test_a_publish_on_an_unmigrated_lake_keeps_its_earlier_dates_in_the_log(tmp_path):
    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)
    for table in queryable_tables():
        shutil.rmtree(lake.path(Lake.delta_log_dir(table)))
    publish_night(config, "g2", D2)
    assert tags_by_date(delta(lake, "clean").to_pyarrow_table()) == {D1: {"g1"}, D2: {"g2"}}


@pytest.mark.integration
def test_query_as_of_reads_an_earlier_version_and_the_vacuum_keeps_what_the_policy_says(tmp_path, capsys):
    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    for night in range(1, 4):
        publish_night(config, f"g{night}", D1)  # versions 0, 1, 2 (default keep_nights: every file stays)
    sql = "SELECT DISTINCT split_part(product_id, '-', 1) AS tag FROM recommendations"
    assert cli_json(config, "query", sql, capsys=capsys) == [{"tag": "g3"}]
    assert cli_json(config, "query", sql, "--as-of", "0", capsys=capsys) == [{"tag": "g1"}]
    tomorrow = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).date().isoformat()
    assert cli_json(config, "query", sql, "--as-of", tomorrow, capsys=capsys) == [{"tag": "g3"}]
    assert main(["query", sql, "--as-of", "2020-01-01", "--lake", config.run.lake]) == 1  # before the first version
    assert "table recommendations has no version as of 2020-01-01" in capsys.readouterr().err  # the table it reads
    assert main(["-q", "query", sql, "--as-of", "9", "--lake", config.run.lake]) == 1  # after the newest
    assert capsys.readouterr().err.strip() == ("matcher: error: table recommendations has no version as of 9 (its log "
                                               "holds versions 0 to 2): no publish has made that version yet")
    versions = cli_json(config, "tables", "history", "--table", "recommendations", capsys=capsys)["recommendations"]
    assert [v["version"] for v in versions] == [2, 1, 0] and all(v["dates"] == D1 for v in versions)

    deleted = cli_json(config, "tables", "vacuum", "--keep-nights", "0", capsys=capsys)["files_deleted"]
    assert deleted["recommendations"] == 2  # g1's two part files; g2's stay (the version before the newest)
    assert tags(delta(lake, "recommendations", 1).to_pyarrow_table()) == {"g2"}
    with pytest.raises(OSError):  # version 0's files are gone: its log entry remains, its data does not
        delta(lake, "recommendations", 0).to_pyarrow_table()
    # matcher query says so in one line (it printed DuckDB's traceback)
    assert main(["-q", "query", sql, "--as-of", "0", "--lake", config.run.lake]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--as-of 0: a file of that version is gone" in err[0] and "vacuum" in err[0], err
    assert main(["-q", "recommend", "g1-0", "--as-of", "0", "--lake", config.run.lake]) == 1  # and recommend
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--as-of 0: a file of that version is gone" in err[0], err


@pytest.mark.integration
def test_recommend_as_of_reads_a_products_recommendations_and_titles_from_an_earlier_version(tmp_path, capsys):
    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    publish_night(config, "g1", D1)  # version 0: products g1-*, their titles and model_version "g1"
    publish_night(config, "g2", D1)  # version 1 replaces the night: products g2-*
    publish_night(config, "g3", D2)  # version 2: a later date
    assert main(["-q", "recommend", "g1-0", "--lake", config.run.lake]) == 1  # the newest publish has no g1 products
    assert "no recommendations on " + D2 in capsys.readouterr().err
    old = cli_json(config, "recommend", "g1-0", "--as-of", "0", capsys=capsys)
    assert old["date"] == D1 and old["title"] == "g1", old  # the date then newest, and the title of that night
    assert {r["model_version"] for r in old["recommendations"]} == {"g1"} and len(old["recommendations"]) == 2
    newest = cli_json(config, "recommend", "g3-0", capsys=capsys)  # the same columns either way
    assert set(old["recommendations"][0]) == set(newest["recommendations"][0])
    assert cli_json(config, "recommend", "g2-1", "--as-of", "1", capsys=capsys)["title"] == "g2"
    assert cli_json(config, "recommend", "g2-1", "--date", D1, capsys=capsys)["title"] == "g2"
    assert main(["-q", "recommend", "g2-1", "--date", D2, "--as-of", "1", "--lake", config.run.lake]) == 1
    assert f"no published partition for {D2} as of 1" in capsys.readouterr().err
    assert main(["-q", "recommend", "g1-0", "--as-of", "2020-01-01", "--lake", config.run.lake]) == 1
    assert "has no version as of 2020-01-01" in capsys.readouterr().err


@pytest.mark.integration
def test_a_date_whose_quarantine_empties_reads_as_zero_rows_in_the_new_version(tmp_path):
    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)
    ctx = RunContext(config, D1)
    lake.write_partition("clean", D1, tagged("clean", "g2", 4))
    lake.commit_parts("quarantine", D1, [], "empty")  # a night with nothing quarantined writes no part file
    lake.write_json(Lake.validation_result_file(D1), {"success": True, "clean_attempt": judged_attempt(lake, D1)})
    stage_published_tables(lake, D1, "g2")
    run_stage("publish", ctx)
    assert delta(lake, "quarantine").to_pyarrow_table(filters=[("dt", "=", D1)]).num_rows == 0
    assert delta(lake, "quarantine", 0).to_pyarrow_table().num_rows == 2


def test_as_of_takes_a_version_a_date_or_a_time():
    assert AsOf.parse("3") == AsOf(version=3)
    end = AsOf.parse("2026-01-02").time
    assert end.tzinfo is not None and end.isoformat().startswith("2026-01-02T23:59:59.999999")
    assert AsOf.parse("2026-01-02T06:00:00Z").time == dt.datetime(2026, 1, 2, 6, tzinfo=dt.timezone.utc)
    assert AsOf.parse("2026-01-02T06:00:00").time == dt.datetime(2026, 1, 2, 6, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError, match="--as-of takes"):
        AsOf.parse("yesterday")


@pytest.mark.integration
def test_a_publish_that_dies_after_moving_its_files_in_leaves_every_delta_reader_on_the_previous_version(
        tmp_path, monkeypatch):
    import jobs.publish

    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)

    def crash(*args, **kwargs):  # the driver dies between moving the new files in and committing them
        raise SystemExit("driver lost")

    monkeypatch.setattr(jobs.publish, "commit_night", crash)
    with pytest.raises(SystemExit):
        publish_night(config, "g2", D1)
    # The folder now holds both nights' files (what a glob over it would read) ...
    glob = lake.partition_path("recommendations", D1) + "/*.parquet"
    assert {p.split("-")[0] for (p,) in duckdb.execute("SELECT product_id FROM read_parquet(?)", [glob]).fetchall()} \
        == {"g1", "g2"}
    # ... and every Delta reader still sees the first night whole
    assert tags_by_date(delta(lake, "recommendations").to_pyarrow_table()) == {D1: {"g1"}}
    assert delta(lake, "recommendations").version() == 0


@pytest.mark.integration
def test_a_column_a_later_release_adds_reads_as_nulls_in_the_dates_published_before_it(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import matcher.io.delta_tables as delta_tables

    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)
    released = delta_tables.delta_schema  # the release after adds a column to `search`
    monkeypatch.setattr(delta_tables, "delta_schema",
                        lambda name, others=(): released(name, others).append(pa.field("explanation", pa.string())))
    part = f"{Lake.partition_dir('search', D2)}/part-new-00000.parquet"
    lake.fs.create_dir(lake.partition_path("search", D2), recursive=True)
    rows = tagged("search", "g2", 2).append_column("explanation", pa.array(["why", "because"]))
    pq.write_table(rows, lake.path(part), filesystem=lake.fs)
    delta_tables.commit_night(lake, D2, {"search": [part]}, "the next release")

    table = delta(lake, "search").to_pyarrow_table()
    explanations: dict[str, set] = {}
    for date, text in zip(table.column("dt").to_pylist(), table.column("explanation").to_pylist()):
        explanations.setdefault(date, set()).add(text)
    assert explanations == {D1: {None}, D2: {"why", "because"}}


def test_a_catalogs_pass_through_columns_are_in_the_clean_tables_log_for_every_delta_reader(tmp_path):
    """Each date's clean files hold that night's catalog columns beyond the registry's; the log names them all, so
    deltalake (and DuckDB on its dataset) reads them, as nulls in the dates whose catalog lacked them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matcher.io.delta_tables import commit_night

    lake = Lake(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}).run.lake, load_config().storage)
    for date, column, value in ((D1, "brand", "ACME"), (D2, "Product_Type", "lamp")):
        part = f"{Lake.partition_dir('clean', date)}/part-00000.parquet"
        lake.fs.create_dir(lake.partition_path("clean", date), recursive=True)
        pq.write_table(tagged("clean", date, 2).append_column(column, pa.array([value] * 2)), lake.path(part),
                       filesystem=lake.fs)
        commit_night(lake, date, {"clean": [part]}, "a night")
    table = delta(lake, "clean").to_pyarrow_table()
    seen = set(zip(table["dt"].to_pylist(), table["brand"].to_pylist(), table["Product_Type"].to_pylist()))
    assert seen == {(D1, "ACME", None), (D2, None, "lamp")}
    dataset = delta(lake, "clean").to_pyarrow_dataset()  # noqa: F841 - DuckDB finds it by its name
    assert duckdb.sql("select count(brand), count(Product_Type) from dataset").fetchall() == [(2, 2)]


def test_a_column_in_another_case_is_refused_before_any_table_commits_and_the_clean_stage_takes_the_logs(tmp_path):
    """Delta Lake holds names without case: "Color" one night after "color" failed the clean table's commit after
    the score tables had committed theirs, and every later night's versions differed between the tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matcher.io.catalog import CatalogReader
    from matcher.io.delta_tables import commit_night, logged_columns

    lake = Lake(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}).run.lake, load_config().storage)

    def part(table: str, date: str, extra: dict | None = None) -> str:
        path = f"{Lake.partition_dir(table, date)}/part-00000.parquet"
        lake.fs.create_dir(lake.partition_path(table, date), recursive=True)
        rows = tagged(table, date, 2)
        for name, value in (extra or {}).items():
            rows = rows.append_column(name, pa.array([value] * 2))
        pq.write_table(rows, lake.path(path), filesystem=lake.fs)
        return path

    commit_night(lake, D1, {"recommendations": [part("recommendations", D1)],
                            "clean": [part("clean", D1, {"color": "red"})]}, "night 1")
    before = delta(lake, "recommendations").version()
    with pytest.raises(ValueError, match="'color' and 'Color'"):
        commit_night(lake, D2, {"recommendations": [part("recommendations", D2)],
                                "clean": [part("clean", D2, {"Color": "blue"})]}, "night 2")
    assert delta(lake, "recommendations").version() == before  # nothing committed
    # The clean stage reads the catalog's column under the logged spelling, so the night commits.
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "products.csv").write_text("product_id,title,Color,image\nP1,Lamp,blue,lamp.jpg\n")
    plan = CatalogReader(str(catalog), load_config().storage).plan().spelled_as(logged_columns(lake, "clean"))
    assert "color" in plan.columns and "Color" not in plan.columns and plan.renamed_columns() == {"Color": "color"}
    raw = next(CatalogReader(str(catalog), load_config().storage).read_split(plan, plan.splits[0]))
    assert raw.rows["color"].tolist() == ["blue"]
    logged = commit_night(lake, D2, {"recommendations": [part("recommendations", D2)],
                                     "clean": [part("clean", D2, {"color": "blue"})]}, "night 2")
    assert logged["clean"].version == logged["recommendations"].version == before + 1


@pytest.mark.integration
def test_as_of_a_version_only_some_tables_have_refuses_only_a_query_that_reads_the_others(tmp_path, capsys):
    import pyarrow.parquet as pq

    from matcher.io.delta_tables import commit_night

    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)  # version 0 of every table
    part = f"{Lake.partition_dir('recommendations', D2)}/part-00000.parquet"
    lake.fs.create_dir(lake.partition_path("recommendations", D2), recursive=True)
    pq.write_table(tagged("recommendations", "g2", 2), lake.path(part), filesystem=lake.fs)
    commit_night(lake, D2, {"recommendations": [part]}, "recommendations alone")  # its version 1, no one else's
    sql = "SELECT count(*) AS n FROM recommendations"
    assert cli_json(config, "query", sql, "--as-of", "1", capsys=capsys) == [{"n": 2 * 3 + 2}]  # two parts of 3
    assert main(["-q", "query", "SELECT count(*) FROM clean", "--as-of", "1", "--lake", config.run.lake]) == 1
    assert "table clean has no version as of 1" in capsys.readouterr().err


@pytest.mark.integration
def test_each_files_bounds_are_in_the_log_so_delta_readers_skip_files_on_a_filter(tmp_path):
    """The log records each part's row count, nulls, and smallest and largest product_id and rank (from its
    footer, over every row group): a Delta reader filtering on a product opens only the parts that may hold it."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    ctx = RunContext(config, D1)
    clean_attempt(lake, D1, "a")
    stage_published_tables(lake, D1, "a")
    for name in ("recommendations", "embeddings"):  # parts of other products than the staged ones, 2 row groups
        extra = [f"_work/dt={D1}/extra/{name}-{x}.parquet" for x in "xy"]
        for part, first in zip(extra, (100, 200)):
            table = tagged(name, "a", 6)
            table = table.set_column(0, "product_id", pa.array([f"z{first + i}" for i in range(6)]))
            lake.fs.create_dir(lake.path(f"_work/dt={D1}/extra"), recursive=True)
            pq.write_table(table, lake.path(part), filesystem=lake.fs, row_group_size=3)
        lake.stage_parts(name, D1, lake.staged_parts(name, D1) + extra)
    run_stage("publish", ctx)
    actions = pa.table(delta(lake, "recommendations").get_add_actions(flatten=True)).to_pylist()
    assert len(actions) == 4
    for action in actions:
        part = pq.read_table(lake.path(f"recommendations/{action['path']}"), filesystem=lake.fs)
        ids = part.column("product_id")
        assert action["num_records"] == part.num_rows
        assert (action["min.product_id"], action["max.product_id"]) == (pc.min(ids).as_py(), pc.max(ids).as_py())
        assert action["null_count.rank"] == part.num_rows  # the staged rows have no rank
        assert "min.similarity" not in action or action["min.similarity"] is None  # floats: no bounds
    dataset = delta(lake, "recommendations").to_pyarrow_dataset()
    wanted = pc.field("product_id") == "z201"
    assert len(list(dataset.get_fragments(filter=wanted))) == 1
    assert dataset.to_table(filter=wanted).column("product_id").to_pylist() == ["z201"]
    assert isinstance(dataset, pads.Dataset)


@pytest.mark.integration
def test_as_of_a_version_never_mixes_two_nights_across_tables(tmp_path, capsys):
    """Every publish commits each table once and the vacuum commits nothing, so version N is the same night in
    every table; where the numbers differ (a lake an earlier release vacuumed with deltalake's own vacuum, which
    committed to some tables only) a query over several tables is refused, not answered from two nights."""
    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)  # version 0
    publish_night(config, "g2", D1)  # version 1
    publish_night(config, "g3", D2)  # version 2 of every table
    deleted = cli_json(config, "tables", "vacuum", "--keep-nights", "0", capsys=capsys)["files_deleted"]
    assert deleted["recommendations"] == 2  # g1's parts: the vacuum deleted files, and committed nothing
    assert {t: delta(lake, t).version() for t in queryable_tables()} == dict.fromkeys(queryable_tables(), 2)
    tags_of = "array_to_string(list_sort(list(DISTINCT split_part(product_id, '-', 1))), ',')"
    both = f"SELECT (SELECT {tags_of} FROM clean) AS clean, (SELECT {tags_of} FROM recommendations) AS recs"  # noqa: S608
    assert cli_json(config, "query", both, "--as-of", "2", capsys=capsys) == [{"clean": "g2,g3", "recs": "g2,g3"}]

    publish_night(config, "g4", D1)  # version 3: g2's parts of D1 replaced
    DeltaTable(lake.path("recommendations")).vacuum(retention_hours=0, dry_run=False,
                                                     enforce_retention_duration=False)  # as an earlier release did
    assert delta(lake, "recommendations").version() == 5  # VACUUM START and END, in this table alone
    publish_night(config, "g5", D2)  # recommendations version 6, clean version 4
    assert main(["-q", "query", both, "--as-of", "4", "--lake", config.run.lake]) == 1
    err = capsys.readouterr().err
    assert "as of 4 table clean shows another publish than recommendations" in err, err
    alone = f"SELECT {tags_of} AS recs FROM recommendations"  # noqa: S608
    assert cli_json(config, "query", alone, "--as-of", "4", capsys=capsys) == [{"recs": "g3,g4"}]


@pytest.mark.integration
def test_as_of_a_time_while_a_publish_committed_the_tables_in_turn_never_mixes_them(tmp_path, capsys, monkeypatch):
    import matcher.io.delta_tables as delta_tables

    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    lake = Lake(config.run.lake, config.storage)
    publish_night(config, "g1", D1)
    commit = delta_tables._commit

    def slow_commit(*args, **kwargs):  # the tables' commits 0.3 s apart, so a time falls between two of them
        time.sleep(0.3)
        return commit(*args, **kwargs)

    monkeypatch.setattr(delta_tables, "_commit", slow_commit)
    publish_night(config, "g2", D1)
    committed = sorted(delta(lake, t).history(limit=1)[0]["timestamp"] for t in ("clean", "recommendations"))
    between = dt.datetime.fromtimestamp((committed[0] + committed[1]) / 2000, dt.timezone.utc).isoformat()
    tags_of = "array_to_string(list_sort(list(DISTINCT split_part(product_id, '-', 1))), ',')"
    both = f"SELECT (SELECT {tags_of} FROM clean) AS clean, (SELECT {tags_of} FROM recommendations) AS recs"  # noqa: S608
    assert main(["-q", "query", both, "--as-of", between, "--lake", config.run.lake]) == 1
    assert "a publish was committing the tables at that time" in capsys.readouterr().err
    after = dt.datetime.fromtimestamp(committed[1] / 1000 + 1, dt.timezone.utc).isoformat()
    assert cli_json(config, "query", both, "--as-of", after, capsys=capsys) == [{"clean": "g2", "recs": "g2"}]


def test_a_row_group_without_bounds_leaves_its_files_column_unbounded(tmp_path):
    """A writer keeps no bounds for a row group holding a very long value: the file's bounds from its other row
    groups would rule out rows it holds, and a Delta reader would skip them."""
    import pyarrow.parquet as pq

    from matcher.io.delta_tables import file_statistics

    table = pa.table({"title": ["m", "n", "a", "z" * 5000], "rank": pa.array([1, 2, None, None], pa.int32()),
                      "note": pa.array([None, None, None, None], pa.string())})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    stats = file_statistics(pq.read_metadata(tmp_path / "p.parquet"))
    assert "title" not in stats["minValues"] and "title" not in stats["maxValues"]
    assert (stats["minValues"]["rank"], stats["maxValues"]["rank"]) == (1, 2)  # a group of nulls alone is no bound
    assert stats["nullCount"] == {"title": 0, "rank": 2, "note": 4} and "note" not in stats["minValues"]
