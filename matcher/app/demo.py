"""`matcher demo`: the embedded S3 server, a drawn demo catalog, and the nightly DAG run through Airflow itself."""
from __future__ import annotations

import datetime as dt
import os
import secrets
import shlex
import sys
import time
import tomllib
from pathlib import Path

from matcher.config import DAGS_DIR, WORKSPACE_CONFIG, dump_toml, load_config

DAG_ID = "product_matching_nightly"


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _demo_credentials(config_path: Path) -> tuple[str, str]:
    """Reuse the keys of an earlier demo (its S3 data stays readable), else make new ones."""
    if config_path.is_file():
        with open(config_path, "rb") as fh:
            storage = tomllib.load(fh).get("storage", {})
        if storage.get("s3_access_key") and storage.get("s3_secret_key"):
            return storage["s3_access_key"], storage["s3_secret_key"]
    return "matcher" + secrets.token_hex(4), secrets.token_urlsafe(24)


def demo_config_sections(workdir: Path, access_key: str, secret_key: str) -> dict:
    return {
        "run": {"catalog": "s3://lake/catalog/demo", "lake": "s3://lake/demo"},
        "storage": {"embedded": True, "data_dir": str(workdir / "seaweedfs"), "s3_access_key": access_key,
                    "s3_secret_key": secret_key},
        # The demo's titles are half Chinese: use the multilingual text encoder.
        "extract": {"text_encoder": "multilingual-e5-small"},
        "score": {"search_queries": ["red dress", "红色 连衣裙", "black sneakers", "黄色 手提包", "watch"]},
    }


def configure_airflow(airflow_home: Path) -> None:
    """Airflow reads its settings from the environment at import time, so this runs before any airflow import."""
    airflow_home.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(airflow_home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_DIR)
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def run_dag_for_date(date: str, conf: dict) -> str:
    """Run the nightly DAG for one logical date in-process with dag.test(); returns the run's final state."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.pool import Pool
    from airflow.utils import db

    from jobs.airflow_tasks import GPU_POOL, GPU_POOL_DESCRIPTION, GPU_POOL_SLOTS

    db.upgradedb()
    if Pool.get_pool(GPU_POOL) is None:  # an operator's own size of an existing pool stays
        Pool.create_or_update_pool(GPU_POOL, GPU_POOL_SLOTS, GPU_POOL_DESCRIPTION, include_deferred=False)
    bag = DagBag(str(DAGS_DIR))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    dag = bag.dags[DAG_ID]
    logical = dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc)
    run = dag.test(logical_date=logical, run_conf=conf)
    return str(getattr(run, "state", "unknown"))


def run_demo(workdir: Path, products: int = 300, date: str | None = None) -> int:
    import pyarrow.fs as pafs

    from matcher.app.demo_catalog import make_demo_catalog
    from matcher.app.search import recommendations_for
    from matcher.io.lake import Lake
    from matcher.io.s3server import EmbeddedS3
    from matcher.io.storage import resolve_uri

    started = time.perf_counter()
    date = date or dt.date.today().isoformat()
    workdir = workdir.resolve()
    config_path = workdir / "config.toml"
    access_key, secret_key = _demo_credentials(config_path)
    sections = demo_config_sections(workdir, access_key, secret_key)
    # The workspace config: later `matcher recommend/search/query` start the embedded server from it.
    _write_private(config_path, dump_toml(sections))

    _say("1/5 starting the embedded S3 server (SeaweedFS)")
    with EmbeddedS3(workdir / "seaweedfs", access_key, secret_key) as server:
        _say(f"    S3 endpoint {server.endpoint}, bucket lake")
        run_sections = {**sections, "storage": {**sections["storage"], "embedded": False,
                                                 "s3_endpoint": server.endpoint}}
        run_config = workdir / "run-config.toml"
        _write_private(run_config, dump_toml(run_sections))
        cfg = load_config(run_config)

        _say(f"2/5 drawing a demo catalog of {products} products (English and Chinese) and uploading it")
        local_catalog = make_demo_catalog(workdir / "demo-catalog", products=products)
        s3fs, catalog_path = resolve_uri(cfg.run.catalog, cfg.storage)
        if s3fs.get_file_info(catalog_path).type != pafs.FileType.NotFound:
            s3fs.delete_dir(catalog_path)
        pafs.copy_files(str(local_catalog), catalog_path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3fs)

        _say(f"3/5 running the Airflow DAG {DAG_ID} for {date} (dag.test): clean, validate, extract, train, "
             "score, publish")
        configure_airflow(workdir / "airflow")
        state = run_dag_for_date(date, {"config": str(run_config)})
        if state != "success":
            _say(f"the DAG run ended in state {state}; see the log above")
            return 1

        _say("4/5 recommendations (top 5 of each) for a few products")
        lake = Lake(cfg.run.lake, cfg.storage)
        sample = ["D00000", "D00001", "D00002", "D00005"]
        for pid in sample:
            recs = recommendations_for(lake, pid, date).head(5)
            print(f"\n  {pid}  {recs.attrs['query_title']}")
            for row in recs.itertuples():
                print(f"     {row.rank}. {row.rec_product_id}  {row.score:.3f}  {row.title}")
        manifest = lake.manifest(date)
        print()
        _say("5/5 tables published for dt=" + date)
        width = max(map(len, manifest["tables"]))
        for name, info in manifest["tables"].items():
            print(f"     {name:<{width}} {info['rows']:>7} rows  {info['path']}")
        counts = manifest["counts"]
        print(f"     catalog rows {counts['input_rows']}: {counts['clean_rows']} clean, {counts['quarantined_rows']} "
              f"quarantined {counts['quarantine_by_reason']}")
        print(f"     model {manifest['model_version']}: {manifest['promotion']}")
    _say(f"done in {time.perf_counter() - started:.0f}s. Try: {later_commands_hint(config_path)}")
    sys.stdout.flush()
    return 0


def later_commands_hint(config_path: Path) -> str:
    """The commands to try next. Run in this folder they find `.matcher/config.toml` on their own; a demo kept
    elsewhere (--workdir) is named with --config, or they would read the embedded defaults' lake, not the demo's."""
    flag = "" if config_path.resolve() == WORKSPACE_CONFIG.resolve() else f" --config {shlex.quote(str(config_path))}"
    count = "select count(*) from recommendations"  # noqa: S608 (a hint printed for the user)
    return (f".venv/bin/matcher recommend D00003{flag} | .venv/bin/matcher search '红色 连衣裙'{flag} | "
            f".venv/bin/matcher query \"{count}\"{flag}")
