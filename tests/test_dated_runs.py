"""Backfills you can trust: dated catalogs ({ds}), the catalog sensor, models pinned per date, one writer per date,
and the deployment's configuration for scheduled runs."""
import csv
import logging
import threading
import time

import numpy as np
import pandas as pd
import pytest
from pyarrow import fs

from jobs.context import RunContext, StageError
from jobs.pipeline import run_stage
from matcher.app.cli import main
from matcher.app.demo_catalog import make_demo_catalog
from matcher.app.search import search_text
from matcher.config import dated, dump_toml, load_config
from matcher.io.lake import Lake
from matcher.io.locks import DateLockedError, date_lock
from matcher.io.registry import current_version, model_for_date, promote
from matcher.steps.encoders import text_encoder_version
from matcher.steps.model import ModelError
from matcher.steps.train import train_on_split
from tests.synthetic import write_synthetic_partition

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"


def test_dated_locations():
    assert dated("s3://b/catalog/dt={ds}", D1) == "s3://b/catalog/dt=2026-01-01"
    assert dated("/data/{ds_nodash}/export", D2) == "/data/20260102/export"
    assert dated("/data/fixed", D2) == "/data/fixed"
    from matcher.config import undated_catalog_warning

    assert undated_catalog_warning("s3://b/catalog/dt={ds}") is None
    assert undated_catalog_warning("/data/{ds_nodash}/export") is None
    assert "has no {ds}: every date reads this same snapshot" in undated_catalog_warning("/data/fixed")


def snapshot_ids(folder) -> list[str]:
    with open(folder / "products.csv", newline="", encoding="utf-8") as fh:
        return sorted(r["product_id"] for r in csv.DictReader(fh))


def test_a_backfill_reads_each_dates_own_snapshot_and_a_missing_one_fails_naming_it(tmp_path, capsys, caplog):
    make_demo_catalog(tmp_path / "catalog" / f"dt={D1}", products=8, with_bad_rows=False)
    make_demo_catalog(tmp_path / "catalog" / f"dt={D2}", products=13, seed=4, with_bad_rows=False)
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake",
                                         "catalog": str(tmp_path / "catalog" / "dt={ds}")},
                                 "clean": {"image_size": 32}}))
    assert main(["backfill", "--config", str(config), "--from", D1, "--to", D2, "--steps", "clean"]) == 0
    assert capsys.readouterr().err.startswith(f"matcher: config {config}") and "same snapshot" not in caplog.text
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    for date in (D1, D2):
        clean = sorted(lake.read_partition("clean", date).column("product_id").to_pylist())
        assert clean == snapshot_ids(tmp_path / "catalog" / f"dt={date}")
    assert main(["run", "--config", str(config), "--date", D3, "--steps", "clean"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"matcher: error: stage clean failed: catalog for {D3}: no catalog at ")
    assert f"dt={D3}" in err[-1]
    # An undated catalog: every date of a backfill would read one snapshot, which the backfill says before it runs.
    undated = str(tmp_path / "catalog" / f"dt={D1}")
    assert main(["backfill", "--config", str(config), "--catalog", undated, "--lake", f"file://{tmp_path}/lake2",
                 "--from", D1, "--to", D2, "--steps", "clean"]) == 0
    assert f"catalog {undated} has no {{ds}}: every date reads this same snapshot" in caplog.text


def test_a_configured_ready_marker_holds_back_a_half_copied_snapshot(tmp_path):
    catalog = make_demo_catalog(tmp_path / "catalog", products=4, with_bad_rows=False)
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)},
                                 "catalog": {"ready_marker": "_SUCCESS"}})
    with pytest.raises(StageError, match="not complete: no _SUCCESS marker") as err:
        run_stage("clean", RunContext(cfg, D1))
    assert err.value.retryable  # the producer is still writing: a retry (exit 75) may find it complete
    (catalog / "_SUCCESS").write_text("")
    assert run_stage("clean", RunContext(cfg, D1))["clean_rows"] == 4


def test_the_sensor_waits_for_the_dates_snapshot_and_its_marker_and_pokes_again_after_storage_errors(
        tmp_path, monkeypatch):
    from jobs.airflow_tasks import catalog_ready
    from matcher.io.catalog import CatalogReader

    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake",
                                         "catalog": str(tmp_path / "catalog" / "dt={ds}")},
                                 "catalog": {"ready_marker": "_SUCCESS"}}))
    params = {"config": str(config)}
    assert catalog_ready(D1, params) is False
    snapshot = make_demo_catalog(tmp_path / "catalog" / f"dt={D1}", products=4, with_bad_rows=False)
    assert catalog_ready(D1, params) is False  # files there, marker not yet
    (snapshot / "_SUCCESS").write_text("")
    assert catalog_ready(D1, params) is True
    assert catalog_ready(D2, params) is False  # another date's snapshot does not count

    def hiccup(self):
        raise OSError("When reading information for key 'catalog': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(CatalogReader, "ready", hiccup)  # an injected storage fault
    assert catalog_ready(D1, params) is False


@pytest.mark.parametrize("run, message", [
    ({}, "no catalog configured: set run.catalog in the TOML file named by $MATCHER_CONFIG"),
    ({"catalog": "/data/c", "lake": "file://.matcher/lake"}, "is relative, and Airflow workers run"),
    ({"catalog": "/data/c", "lake": "~/lake"}, "run.lake starts with ~, which only a shell expands"),
    ({"catalog": "data/c", "lake": "s3://b/lake"}, "run.catalog data/c is relative"),
    ({"catalog": "s3://b/c/dt={{ ds }}", "lake": "s3://b/lake"}, "placeholders {ds} and {ds_nodash} only"),
])
def test_a_scheduled_run_without_a_usable_deployment_config_fails_in_one_line(tmp_path, run, message):
    from airflow.sdk.exceptions import AirflowFailException

    from jobs.airflow_tasks import deployment_config

    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": run}))
    with pytest.raises(AirflowFailException, match=message.replace("$", r"\$")):
        deployment_config({}, environ={"MATCHER_CONFIG": str(config)})


def test_scheduled_runs_take_their_config_from_matcher_config(tmp_path):
    from jobs.airflow_tasks import deployment_config

    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"catalog": "s3://b/c/dt={ds}", "lake": "s3://b/lake"},
                                 "score": {"top_k": 7}}))
    cfg, source = deployment_config({}, environ={"MATCHER_CONFIG": str(config)})
    assert (cfg.score.top_k, source) == (7, str(config))
    other = tmp_path / "other.toml"
    other.write_text(dump_toml({"run": {"catalog": "/c", "lake": "file:///l"}, "score": {"top_k": 3}}))
    cfg, source = deployment_config({"config": str(other)}, environ={"MATCHER_CONFIG": str(config)})
    assert (cfg.score.top_k, source) == (3, str(other))  # a run's conf wins


def test_model_for_date_prefers_the_dates_own_model():
    trained = {"model_version": "m2", "promoted": True, "previous_version": "m1"}
    refused = {"model_version": "m3", "promoted": False, "previous_version": "m1"}
    pinned = {"model_version": "m1"}
    assert model_for_date("m9", trained, pinned, lambda: "m5")[0] == "m9"
    assert model_for_date(None, trained, pinned, lambda: "m5")[0] == "m2"
    assert model_for_date(None, refused, None, lambda: "m5")[0] == "m1"
    assert model_for_date(None, None, pinned, lambda: "m5")[0] == "m1"
    assert model_for_date(None, None, None, lambda: "m5")[0] == "m5"
    with pytest.raises(ModelError, match="no promoted model"):
        model_for_date(None, None, None, lambda: None)

    def unreadable() -> str:  # models/current.json damaged: a date whose model is named never reads it
        raise ModelError("models/current.json is unreadable")

    assert model_for_date(None, trained, pinned, unreadable)[0] == "m2"
    assert model_for_date(None, None, pinned, unreadable)[0] == "m1"


def _ctx(tmp_path, date, **kw):
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"},
                                 "train": {"epochs": 3, "batch_size": 64, "dim": 16, "hidden": 32, "min_steps": 0}})
    return RunContext(cfg, date, **kw)


def _tables(lake: Lake, date: str) -> dict:
    return {t: lake.read_partition(t, date).to_pandas().sort_values(list(
        {"recommendations": ["product_id", "rank"], "categories": ["product_id"]}[t])).reset_index(drop=True)
        for t in ("recommendations", "categories")}


def _search(lake: Lake, as_of: str | None = None) -> pd.DataFrame:
    return search_text(lake, "product 7", k=5, date=D1, as_of=as_of)


def test_rescoring_an_old_date_after_newer_models_reproduces_its_tables(tmp_path, monkeypatch):
    # The hashing text encoder (numpy, no weights) lets search embed its query text the way the features were made.
    texts = {"text_encoder": text_encoder_version("hashing-384"), "text_dim": 384}
    first = _ctx(tmp_path, D1)
    write_synthetic_partition(first.lake, D1, n=120, **texts)
    v1 = run_stage("train", first)["model_version"]
    for stage in ("score", "publish"):
        run_stage(stage, first)
    before = _tables(first.lake, D1)
    searched = _search(first.lake)  # the embeddings table's version 0, scored by v1

    second = _ctx(tmp_path, D2)
    write_synthetic_partition(second.lake, D2, n=120, seed=7, **texts)
    v2 = run_stage("train", second)["model_version"]
    promote(second.lake, v2, D2)  # a newer model is current, whatever the gate said
    assert current_version(second.lake) == v2 != v1

    again = _ctx(tmp_path, D1)
    # Training D1 again would train the same model: the date keeps its first night's decision, not a gate against
    # v2, and v1's files as they were (other hardware may give other bits), without training it again.
    import jobs.train

    def rewrite(*args, **kwargs):
        raise AssertionError("a saved model version was written again")

    def train_again(*args, **kwargs):
        raise AssertionError("a date's saved and judged model was trained again")

    monkeypatch.setattr(jobs.train, "save_model", rewrite)
    monkeypatch.setattr(jobs.train, "train_on_split", train_again)
    retrained = run_stage("train", again)
    assert retrained["model_version"] == v1 and retrained["date_model"] == v1, retrained["decision"]
    assert retrained["decision"].startswith(f"rerun of {D1}: the model its earlier night trained")
    assert current_version(again.lake) == v2
    stats = run_stage("score", again)
    run_stage("publish", again)
    assert stats["model_version"] == v1 and "trained and promoted for this date" in stats["model_source"]
    after = _tables(again.lake, D1)
    for table in before:
        assert before[table].equals(after[table]), table
    assert again.lake.manifest(D1)["model_version"] == v1

    # A date first scored without training keeps the model its manifest records.
    third = _ctx(tmp_path, D3)
    write_synthetic_partition(third.lake, D3, n=120, seed=9, **texts)
    assert run_stage("score", third)["model_version"] == v2
    run_stage("publish", third)
    promote(third.lake, v1, D3)
    stats = run_stage("score", _ctx(tmp_path, D3))
    assert stats["model_version"] == v2 and stats["model_source"] == "pinned by this date's manifest"

    # --model overrides the pin, trains nothing, and moves neither current.json nor the date's own train record.
    registry, own = again.lake.read_bytes("models/current.json"), again.lake.read_bytes(
        Lake.stage_stats_file(D1, "train"))
    models = sorted(i.path for i in again.lake.fs.get_file_info(fs.FileSelector(again.lake.path("models"))))
    rescore = _ctx(tmp_path, D1, model_version=v2)
    assert "skipped" in run_stage("train", rescore)
    assert run_stage("score", rescore)["model_version"] == v2
    run_stage("publish", rescore)
    assert again.lake.manifest(D1)["model_version"] == v2
    assert again.lake.read_bytes("models/current.json") == registry and current_version(again.lake) == v1
    assert again.lake.read_bytes(Lake.stage_stats_file(D1, "train")) == own
    assert sorted(i.path for i in again.lake.fs.get_file_info(fs.FileSelector(again.lake.path("models")))) == models
    # search reads the date's embeddings, and the model that scored them, as the tables' log held them: versions 0
    # and 1 are D1's nights with v1, 2 is D3's publish (D1 still v1's), 3 this rescore with v2.
    rescored = _search(again.lake)
    assert not np.allclose(rescored["score"], searched["score"]), (rescored, searched)
    pd.testing.assert_frame_equal(_search(again.lake, as_of="2"), searched)
    pd.testing.assert_frame_equal(_search(again.lake, as_of="3"), rescored)

    # A night that saved its model and stopped before its statistics: the rerun trains (nothing says what was
    # decided), and keeps the saved version's files.
    again.lake.delete_file_quietly(Lake.stage_stats_file(D1, "train"))
    trained = []
    monkeypatch.setattr(jobs.train, "train_on_split", lambda *a, **kw: trained.append(1) or train_on_split(*a, **kw))
    assert run_stage("train", _ctx(tmp_path, D1))["model_version"] == v1 and trained == [1]


def test_one_writer_per_date(tmp_path):
    catalog = make_demo_catalog(tmp_path / "catalog", products=4, with_bad_rows=False)
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)}})
    ctx = RunContext(cfg, D1)
    with date_lock(ctx.lake, D1, holder="Airflow task score for 2026-01-01"):
        with pytest.raises(StageError, match="date 2026-01-01 is being run by Airflow task score") as err:
            run_stage("clean", ctx)
        assert err.value.retryable  # Airflow retries later, by when the other run may be done
        with date_lock(ctx.lake, D2, holder="another date"):
            pass  # other dates are free
    assert run_stage("clean", ctx)["clean_rows"] == 4  # released
    assert list((tmp_path / "lake" / "_locks" / f"dt={D1}").glob("[0-9]*.json")) == []


def test_matcher_run_exits_75_for_a_busy_date_and_1_for_bad_input(tmp_path, capsys):
    """A scheduler (cron, Airflow's BashOperator) can tell a failure worth retrying from one that is not."""
    catalog = make_demo_catalog(tmp_path / "catalog", products=4, with_bad_rows=False)
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)}}))
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    with date_lock(lake, D1, holder="another run"):
        assert main(["-q", "run", "--config", str(config), "--date", D1, "--steps", "clean"]) == 75
    assert "is being run by another run" in capsys.readouterr().err
    assert main(["-q", "run", "--config", str(config), "--date", D1, "--steps", "train"]) == 1  # not validated
    err = capsys.readouterr().err
    assert "no validation result for 2026-01-01: run the validate stage first" in err and "bug" not in err, err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "products.csv").write_text("sku,name\n1,a shirt\n", encoding="utf-8")  # no product_id, title, image
    config.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(bad)}}))
    assert main(["-q", "run", "--config", str(config), "--date", D2, "--steps", "clean"]) == 1
    err = capsys.readouterr().err
    assert "lacks required columns" in err and "bug" not in err and "Traceback" not in err, err


def test_two_airflow_runs_of_one_date_cannot_interleave_stages(tmp_path, monkeypatch):
    """Airflow runs each stage in its own process: the DAG run's id claims the date from its first stage until
    publish, so another run's stage (or a `matcher run`) is refused between them, and a stage of the same run is
    not. A permanent failure ends the run, and its claim with it."""
    from jobs.airflow_tasks import run_stage_task

    catalog = make_demo_catalog(tmp_path / "catalog", products=4, with_bad_rows=False)
    params = {"catalog": str(catalog), "lake": f"file://{tmp_path}/lake"}
    seen: list[str] = []
    kept = logging.Handler()
    kept.emit = lambda record: seen.append(record.getMessage())  # Airflow's logging set-up bypasses caplog
    ours = logging.getLogger("matcher")
    ours.addHandler(kept)
    try:
        assert run_stage_task("clean", D1, params, run_id="scheduled__2026-01-01")["stage"] == "clean"
    finally:
        ours.removeHandler(kept)
    # The task's first line (which config) carries its context too: Airflow's log shows the message alone.
    first = next(m for m in seen if m.startswith("matcher: config"))
    assert first.endswith(f" [stage=clean] [date={D1}] [run_id=scheduled__2026-01-01]"), first
    with pytest.raises(StageError, match="between the stages of run scheduled__2026-01-01") as err:
        run_stage_task("clean", D1, params, run_id="manual__2026-01-01T10")
    assert err.value.retryable
    cfg = load_config(overrides={"run": params})
    with pytest.raises(StageError, match="between the stages of run scheduled__2026-01-01"):
        run_stage("clean", RunContext(cfg, D1))  # a plain `matcher run` too
    assert run_stage_task("clean", D1, params, run_id="scheduled__2026-01-01")["stage"] == "clean"  # its own rerun
    # A stage cut off at its execution_timeout (or killed): Airflow retries it, so the run keeps the date.
    from airflow.sdk.exceptions import AirflowTaskTimeout

    import jobs.pipeline

    def cut_off(ctx: RunContext) -> dict:
        raise AirflowTaskTimeout("Timeout, PID: 1")  # the injected fault

    with monkeypatch.context() as patched:
        patched.setitem(jobs.pipeline.STAGE_RUNNERS, "validate", cut_off)
        with pytest.raises(AirflowTaskTimeout):
            run_stage_task("validate", D1, params, run_id="scheduled__2026-01-01")
    with pytest.raises(StageError, match="between the stages of run scheduled__2026-01-01"):
        run_stage_task("clean", D1, params, run_id="manual__2026-01-01T10")
    # The run's train fails for good (it has no features): Airflow will not retry it, so the date is free again.
    from airflow.sdk.exceptions import AirflowFailException
    with pytest.raises(AirflowFailException):
        run_stage_task("train", D1, params, run_id="scheduled__2026-01-01")
    assert run_stage_task("clean", D1, params, run_id="manual__2026-01-01T10")["stage"] == "clean"


def test_a_dead_holders_lock_expires(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    folder = tmp_path / "lake" / Lake.lock_dir(D1)

    def planted(name: str, doc: dict, age: float = 0.0) -> None:
        lake.write_json(f"{Lake.lock_dir(D1)}/{name}", doc)
        if age:  # the lake's clock judges leases: the file's mtime is what ages
            then = time.time() - age
            os.utime(folder / name, (then, then))

    planted("000000000001-old.json", {"holder": "elsewhere", "host": "other-host", "pid": 1}, age=3600)
    with date_lock(lake, D1, holder="me", stale_after=300):
        pass
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    planted("000000000002-killed.json", {"holder": "killed", "host": socket.gethostname(), "pid": int(gone.stdout)})
    with date_lock(lake, D1, holder="me", stale_after=300):  # fresh file, but its process is gone
        pass
    planted("000000000003-alive.json", {"holder": "alive", "host": "other-host", "pid": 1,
                                        "heartbeat": time.time() - 3600})  # its own clock's stamp does not count
    with pytest.raises(DateLockedError, match="being run by alive"):
        with date_lock(lake, D1, holder="me", stale_after=300):
            pass


def test_racing_holders_never_both_hold_the_date(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    holding, overlaps, held = [], [], []
    start = threading.Barrier(4)

    def contender(n: int) -> None:
        start.wait()
        for _ in range(15):
            try:
                with date_lock(lake, D1, holder=f"t{n}"):
                    holding.append(n)
                    held.append(n)
                    if len(holding) > 1:
                        overlaps.append(list(holding))
                    time.sleep(0.002)
                    holding.remove(n)
            except DateLockedError:
                time.sleep(0.001)

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and held  # mutual exclusion, and the date was held now and then


@pytest.mark.parametrize("stage,after", [("extract", 1.0), ("clean", 3.0)])  # clean: while Spark starts, here
def test_matcher_run_interrupted_by_ctrl_c_exits_130_and_the_date_reruns(tmp_path, stage, after):
    """Ctrl-C reaches Spark's JVM too, so the error that stops the stage may be a Py4J one: still "interrupted"
    and 130 (it said "most likely a bug" and 1; while Spark started, "stage clean failed: Py4JError" and 1), and
    the date's lock is free for the rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    catalog = make_demo_catalog(tmp_path / "catalog", products=4 if stage == "extract" else 100, with_bad_rows=False)
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)}}))
    run = [sys.executable, "-m", "matcher.app.cli", "run", "--config", str(config), "--date", D1]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(run, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while f"stage {stage} for" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(after)  # inside the stage: Spark starting, or running the encoders
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    said = [line for line in log.read_text().splitlines() if line.startswith("matcher:")]
    assert said[-1] == "matcher: interrupted", said  # the last word of matcher's; a worker's may come after it
    # Py4J logs the connection Spark's JVM dropped at Ctrl-C with a traceback each (about 45 lines): not shown
    assert "Exception while sending command" not in log.read_text(), log.read_text()[-3000:]
    assert subprocess.run(run + ["--steps", "clean"], capture_output=True, timeout=300).returncode == 0
