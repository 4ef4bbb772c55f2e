"""Operations under faults and over days, with the real Spark, S3 server and pipeline."""
import csv
import os
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from matcher.app.cli import main
from matcher.app.demo_catalog import make_demo_catalog
from matcher.config import dump_toml, load_config
from matcher.io.lake import Lake
from matcher.io.storage import resolve_uri

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

PUBLISHED = ("recommendations", "embeddings", "categories", "search")


# The pipeline's cost without the pretrained encoders' (the scale profile's weightless ones): for tests about
# nights, reuse and storage, not about what the encoders see (tests/test_extract.py and test_dag_run.py run those).
WEIGHTLESS_ENCODERS = {"clean": {"image_size": 32},
                       "extract": {"image_encoder": "thumbnail-8x8", "text_encoder": "hashing-384",
                                   "second_title_encoder": ""}}


def _setup(s3_server, tmp_path, name, products=24, extra_sections=None):
    sections = {
        "run": {"catalog": f"s3://lake/{name}/catalog", "lake": f"s3://lake/{name}/lake"},
        "storage": {"s3_endpoint": s3_server.endpoint, "s3_access_key": s3_server.access_key,
                    "s3_secret_key": s3_server.secret_key},
        "train": {"epochs": 10, "min_steps": 60, "batch_size": 16},
        "score": {"top_k": 4, "search_queries": ["red dress"]},
        **(extra_sections or {}),
    }
    config = tmp_path / f"{name}.toml"
    config.write_text(dump_toml(sections))
    cfg = load_config(config)
    local = make_demo_catalog(tmp_path / name, products=products, with_bad_rows=False)
    return cfg, config, local


def _upload(cfg, local):
    fs, path = resolve_uri(cfg.run.catalog, cfg.storage)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _tables(lake, date):
    return {name: lake.read_partition(name, date).drop_columns(["model_version"]) for name in PUBLISHED}


def _first_night(s3_server, tmp_path, name, date):
    """A catalog uploaded and one undisturbed night run: (config path, lake, that night's tables)."""
    cfg, config, local = _setup(s3_server, tmp_path, name)
    _upload(cfg, local)
    lake = Lake(cfg.run.lake, cfg.storage)
    assert main(["-q", "run", "--config", str(config), "--date", date]) == 0
    return config, lake, _tables(lake, date)


def _start_run_until_extract(config, lake, date) -> subprocess.Popen:
    """`matcher run` in its own process group, returned once the night has passed validate (extract is next)."""
    proc = subprocess.Popen([sys.executable, "-m", "matcher.app.cli", "-q", "run", "--config", str(config),
                             "--date", date], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not lake.exists(f"_runs/dt={date}/validate.json") and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc


def test_a_run_killed_mid_extract_then_rerun_equals_an_undisturbed_run(s3_server, tmp_path):
    config, lake, undisturbed = _first_night(s3_server, tmp_path, "killed", "2026-05-01")

    proc = _start_run_until_extract(config, lake, "2026-05-02")
    time.sleep(3)  # well into extract: Spark workers are embedding
    os.killpg(proc.pid, signal.SIGKILL)  # the task's process and its Spark children die at once
    proc.communicate()
    assert lake.read_json("manifests/dt=2026-05-02/manifest.json") is None
    assert lake.read_partition("recommendations", "2026-05-02") is None

    assert main(["-q", "run", "--config", str(config), "--date", "2026-05-02"]) == 0  # the retry
    retried = _tables(lake, "2026-05-02")
    for name in PUBLISHED:
        assert retried[name].equals(undisturbed[name]), name


def test_five_nights_with_catalog_changes_stay_complete_and_reuse_features(s3_server, tmp_path):
    cfg, config, local = _setup(s3_server, tmp_path, "soak", products=20, extra_sections=WEIGHTLESS_ENCODERS)
    lake = Lake(cfg.run.lake, cfg.storage)
    extra = make_demo_catalog(tmp_path / "extra", products=40, seed=9, with_bad_rows=False)
    rows = list(csv.DictReader(open(local / "products.csv", encoding="utf-8")))
    spare = list(csv.DictReader(open(extra / "products.csv", encoding="utf-8")))[20:]
    expected = []
    for day in range(5):
        added, changed, removed = 0, 0, 0
        if day:
            # Two products added, one title changed, one product removed.
            for new in spare[2 * day - 2:2 * day]:
                new = {**new, "product_id": f"N{day}{new['product_id']}"}
                (local / new["image"]).write_bytes((extra / new["image"]).read_bytes())
                rows.append(new)
                added += 1
            rows[day]["title"] += " (new season)"
            changed = 1
            rows.pop(-3 if day % 2 else 0)
            removed = 1
        with open(local / "products.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        _upload(cfg, local)
        date = f"2026-06-0{day + 1}"
        assert main(["-q", "run", "--config", str(config), "--date", date]) == 0
        expected.append((date, len(rows), added, changed, removed))

    for date, n_rows, added, changed, _removed in expected:
        manifest = lake.read_json(f"manifests/dt={date}/manifest.json")
        assert manifest["counts"]["clean_rows"] == n_rows and manifest["counts"]["quarantined_rows"] == 0
        recs = lake.read_partition("recommendations", date).to_pandas()
        assert len(recs) == n_rows * 4 and recs["product_id"].nunique() == n_rows
        clean_ids = set(lake.read_partition("clean", date).column("product_id").to_pylist())
        assert set(recs["rec_product_id"]) <= clean_ids  # removed products are never recommended
        if date == expected[0][0]:
            assert manifest["features"] == {"embedded": n_rows, "reused": 0}
        else:
            # Only added and changed products are embedded again (a changed title, or an image moved in).
            assert manifest["features"]["embedded"] == added + changed, (date, manifest["features"])
            assert manifest["features"]["reused"] == n_rows - added - changed


def test_the_s3_server_going_away_mid_run_loses_nothing(tmp_path):
    import secrets

    from matcher.io.s3server import EmbeddedS3

    server = EmbeddedS3(tmp_path / "s3", "ops" + secrets.token_hex(3), secrets.token_hex(16)).start()
    try:
        config, lake, night1 = _first_night(server, tmp_path, "outage", "2026-07-01")

        proc = _start_run_until_extract(config, lake, "2026-07-02")
        server.stop()  # the outage: S3 is gone for a few seconds during extract
        time.sleep(4)
        server.start()
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            # It may fail, but only with one clear line, and with nothing of the night visible.
            assert err.strip().count("\n") == 0 and err.startswith("matcher: error: stage "), err
            assert lake.read_json("manifests/dt=2026-07-02/manifest.json") is None
            assert main(["-q", "run", "--config", str(config), "--date", "2026-07-02"]) == 0  # the retry
        for name, table in _tables(lake, "2026-07-01").items():
            assert table.equals(night1[name]), name  # the previous night is intact
        night2 = _tables(lake, "2026-07-02")
        for name in PUBLISHED:
            assert night2[name].equals(night1[name]), name  # same catalog, same tables
    finally:
        server.stop()


def test_stages_run_through_spark_submit_when_the_config_says_so(tmp_path, monkeypatch):
    import json

    from jobs.airflow_tasks import run_stage_task

    catalog = make_demo_catalog(tmp_path / "catalog", products=12, with_bad_rows=False)
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"catalog": str(catalog), "lake": f"file://{tmp_path}/lake"},
                                 "runner": {"mode": "spark_submit", "spark_conn_id": "matcher_local_spark"}}))
    # The Airflow connection spark-submit uses: a local master here, a cluster's in production.
    monkeypatch.setenv("AIRFLOW_CONN_MATCHER_LOCAL_SPARK", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    params = {"config": str(config)}
    assert run_stage_task("clean", "2026-08-01", params)["runner"] == "spark_submit"
    assert run_stage_task("validate", "2026-08-01", params)["runner"] == "spark_submit"
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    assert lake.read_partition("clean", "2026-08-01").num_rows == 12
    assert lake.read_json("validation/dt=2026-08-01/result.json")["success"] is True


def test_a_publish_submitted_to_a_cluster_names_its_rows_and_path_in_the_asset_events(tmp_path, monkeypatch):
    """The submitted driver's statistics stay on the cluster: the task reads the date's manifest for them. The
    submit itself is the test above's; here it is stood in for by the manifest a publish writes."""
    import jobs.airflow_tasks
    from jobs.airflow_tasks import run_stage_task, table_assets

    lake_uri, ds = f"file://{tmp_path}/lake", "2026-08-01"
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"catalog": str(tmp_path / "catalog"), "lake": lake_uri},
                                 "runner": {"mode": "spark_submit"}}))
    path = f"{lake_uri}/recommendations/dt={ds}"
    Lake(lake_uri, load_config().storage).write_json(Lake.manifest_file(ds), {
        "publish_id": "p1", "tables": {"recommendations": {"rows": 120, "path": path, "files": []}}})
    monkeypatch.setattr(jobs.airflow_tasks, "submit_stage", lambda *a, **k: {"runner": "spark_submit"})

    class Events(dict):
        def __missing__(self, asset):
            self[asset] = type("Event", (), {"extra": None})()
            return self[asset]

    events = Events()
    run_stage_task("publish", ds, {"config": str(config)}, run_id="r1", outlet_events=events)
    assets = table_assets()
    assert events[assets["recommendations"]].extra == {"date": ds, "run_id": "r1", "rows": 120, "path": path}
    assert events[assets["embeddings"]].extra == {"date": ds, "run_id": "r1"}  # not in this manifest


def test_the_catalog_sensor_checks_the_catalog_whatever_the_runner(tmp_path):
    from jobs.airflow_tasks import catalog_ready

    catalog = make_demo_catalog(tmp_path / "catalog", products=10, with_bad_rows=False)
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"catalog": str(catalog), "lake": f"file://{tmp_path}/lake"},
                                 "runner": {"mode": "spark_submit"}}))
    assert catalog_ready("2026-01-01", {"config": str(config)}) is True
    assert catalog_ready("2026-01-01", {"config": str(config), "catalog": str(tmp_path / "absent")}) is False
