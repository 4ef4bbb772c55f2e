"""A backfill through Airflow's real scheduler: `airflow standalone` (scheduler, DAG processor, API server) with the
LocalExecutor on a temporary SQLite metadata database, `airflow backfill create` over two dates whose catalogs
differ, the deployment's configuration from $MATCHER_CONFIG. Each date's partitions must come from its own snapshot
and each date must be scored with the model its own night trained; a downstream DAG scheduled on the
recommendations table's Asset runs on the events the nights' publish tasks emit."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matcher.app.demo_catalog import make_demo_catalog
from matcher.config import REPO_ROOT, dump_toml, load_config
from matcher.io.lake import Lake

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

DATES = ("2026-01-01", "2026-01-02")
DAG = "product_matching_nightly"
DOWNSTREAM = "recommendations_landed"
# A downstream DAG as a user of the tables would write it: it runs when the recommendations Asset is updated and
# records the events that triggered it.
DOWNSTREAM_DAG = f'''
import json, os
from datetime import datetime
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, Asset

RECOMMENDATIONS = Asset(name="matcher.recommendations", uri="matcher://tables/recommendations", group="matcher")


def record(triggering_asset_events=None):
    with open(os.environ["LANDED_EVENTS"], "a") as fh:
        for events in (triggering_asset_events or {{}}).values():
            for event in events:
                fh.write(json.dumps(dict(event.extra)) + "\\n")


with DAG(dag_id="{DOWNSTREAM}", schedule=[RECOMMENDATIONS], start_date=datetime(2026, 1, 1), catchup=False):
    PythonOperator(task_id="record", python_callable=record)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _airflow(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _runs(env: dict, dag: str = DAG) -> dict[str, str]:
    out = _airflow(env, "dags", "list-runs", dag, "-o", "json").stdout
    # Airflow may print warnings on stdout before the JSON: take the line that holds the list.
    table = next((line for line in out.splitlines() if line.startswith("[")), "[]")
    try:
        return {r["run_id"]: r["state"] for r in json.loads(table)}
    except ValueError:
        return {}


def _snapshot_ids(folder: Path) -> list[str]:
    with open(folder / "products.csv", newline="", encoding="utf-8") as fh:
        return sorted(r["product_id"] for r in csv.DictReader(fh))


def test_a_backfill_through_the_scheduler_reads_each_dates_snapshot(tmp_path):
    catalogs = tmp_path / "catalog"
    make_demo_catalog(catalogs / f"dt={DATES[0]}", products=8, with_bad_rows=False)
    make_demo_catalog(catalogs / f"dt={DATES[1]}", products=11, seed=3, with_bad_rows=False)
    config = tmp_path / "matcher.toml"
    config.write_text(dump_toml({
        "run": {"catalog": str(catalogs / "dt={ds}"), "lake": f"file://{tmp_path}/lake"},
        "clean": {"image_size": 32},
        "extract": {"image_encoder": "thumbnail-8x8", "text_encoder": "hashing-384", "second_title_encoder": ""},
        "spark": {"master": "local[1]"},
        "train": {"epochs": 2, "dim": 16, "hidden": 32, "min_steps": 10},
        "score": {"top_k": 3},
    }))
    port = _free_port()
    dags = tmp_path / "dags"  # the project's DAG and a downstream one
    dags.mkdir()
    shutil.copy(REPO_ROOT / "dags" / f"{DAG}.py", dags)
    (dags / f"{DOWNSTREAM}.py").write_text(DOWNSTREAM_DAG)
    landed = tmp_path / "landed.jsonl"
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "LANDED_EVENTS": str(landed),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__CORE__PARALLELISM": "2",
           "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "MATCHER_CONFIG": str(config),  # scheduled and backfilled runs get no conf: the deployment's file
           # OpenLineage events of every task, to a file (a deployment points this at Marquez or its own backend)
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(tmp_path / "lineage"),
                                                          "append": True}),
           "AIRFLOW__OPENLINEAGE__NAMESPACE": "matcher-test",
           "PYTHONPATH": str(REPO_ROOT)}
    assert _airflow(env, "db", "migrate", timeout=300).returncode == 0
    # The deployment's pool for the accelerator stages (Airflow never schedules a task whose pool is missing).
    # (the name as a deployment types it: importing jobs.airflow_tasks here would import Airflow at collection)
    assert _airflow(env, "pools", "set", "matcher_gpu", "1", "matcher's accelerator stages").returncode == 0
    # The DAG is parsed into the database and the backfill created before the scheduler starts: SQLite lets one
    # writer in at a time, and a CLI write beside the running scheduler failed with "database is locked" (an
    # upgrade from a read lock is refused at once, whatever the busy timeout).
    parsed = _airflow(env, "dags", "reserialize", timeout=300)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    assert _airflow(env, "dags", "unpause", DAG).returncode == 0
    assert _airflow(env, "dags", "unpause", DOWNSTREAM).returncode == 0
    made = _airflow(env, "backfill", "create", "--dag-id", DAG, "--from-date", DATES[0], "--to-date", DATES[1],
                    "--max-active-runs", "1")
    assert made.returncode == 0, made.stderr[-2000:]
    log = open(tmp_path / "standalone.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wanted = {f"backfill__{d}T00:00:00+00:00" for d in DATES}
        deadline = time.monotonic() + 1200
        while True:
            states = _runs(env)
            done = {r: s for r, s in states.items() if r in wanted and s in ("success", "failed")}
            if len(done) == len(wanted) or time.monotonic() > deadline:
                break
            time.sleep(10)
        assert done == {r: "success" for r in wanted}, (states, (tmp_path / "standalone.log").read_text()[-3000:])
        # Both nights' publish tasks updated the Asset; the downstream DAG ran on those events (one run may take
        # both, if they came before the scheduler's next look).
        deadline = time.monotonic() + 300
        while True:
            seen = [json.loads(line) for line in landed.read_text().splitlines()] if landed.exists() else []
            if {e.get("date") for e in seen} >= set(DATES) or time.monotonic() > deadline:
                break
            time.sleep(10)
        assert {e["date"] for e in seen} == set(DATES), (seen, _runs(env, DOWNSTREAM))
        assert all(e["rows"] > 0 and e["path"].endswith(f"recommendations/dt={e['date']}") for e in seen), seen
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    # Each stage task's COMPLETE event names the lake's tables it read and wrote (the provider's own events).
    events = [json.loads(line) for f in tmp_path.glob("lineage*") for line in f.read_text().splitlines()]
    completed = {(e["job"]["name"], e["run"]["facets"]["airflow"]["dagRun"]["run_id"]): e for e in events
                 if e["eventType"] == "COMPLETE" and e["job"]["name"].startswith(f"{DAG}.")}
    for date in DATES:
        run = f"backfill__{date}T00:00:00+00:00"
        publish = completed[(f"{DAG}.publish", run)]
        assert {("file", lake.path(t)) for t in ("recommendations", "clean", "quarantine")} <= \
            {(d["namespace"], d["name"]) for d in publish["outputs"]}
        assert [d["name"] for d in completed[(f"{DAG}.clean", run)]["inputs"]] == [str(catalogs / f"dt={date}")]
    for date in DATES:
        clean = sorted(lake.read_partition("clean", date).column("product_id").to_pylist())
        assert clean == _snapshot_ids(catalogs / f"dt={date}")
        manifest = lake.manifest(date)
        assert manifest["catalog"] == str(catalogs / f"dt={date}")
        # Scored with the model its own night chose: its new model if promoted, else the one it was compared with.
        train = lake.read_json(Lake.stage_stats_file(date, "train"))
        expected = train["model_version"] if train["promoted"] else train["previous_version"]
        assert manifest["model_version"] == expected, (date, train["decision"])
