"""The callable each Airflow task runs: one stage of the pipeline for the run's logical date."""
from __future__ import annotations

import logging
import os
from typing import Mapping

from jobs.context import RunContext, StageError
from jobs.pipeline import run_stage
from matcher.config import REPO_ROOT, Config, dated, load_config
from matcher.s3server import storage_ready
from matcher.storage import StorageError

log = logging.getLogger("matcher")


CONFIG_ENV = "MATCHER_CONFIG"


def deployment_config(params: dict, environ: Mapping[str, str] = os.environ) -> tuple[Config, str]:
    """(config, its file) of a task: the run's conf "config", else the TOML file the deployment names in
    $MATCHER_CONFIG (scheduled runs get no conf), else the embedded defaults. Read here, at the task's entry, and
    passed down: no other module reads the environment. A deployment must name a catalog and an absolute lake:
    a worker's working directory is not the user's."""
    path = params.get("config") or environ.get(CONFIG_ENV, "")
    cfg = load_config(path or None)
    catalog = params.get("catalog") or cfg.run.catalog
    if not catalog:
        _fail(f"no catalog configured: set run.catalog in the TOML file named by ${CONFIG_ENV} "
              f"(now {path or 'unset'}) or pass conf {{\"catalog\": ...}}")
    lake = params.get("lake") or cfg.run.lake
    if lake.startswith("file://") and not lake[len("file://"):].startswith("/"):
        _fail(f"run.lake {lake} is relative, and Airflow workers run in their own directories: "
              f"give an absolute file:///... or s3:// lake")
    return cfg, path or "embedded defaults"


def _fail(message: str):
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(message)


def run_stage_task(stage: str, ds: str, params: dict | None = None) -> dict:
    """Idempotent for its `ds` partition: it reads only that date's inputs and replaces only that date's outputs.

    params: "config" (a TOML file; empty = $MATCHER_CONFIG, else the embedded defaults), "catalog" and "lake"
    (override the config's; the catalog may contain {ds}), "model" (score with this model version)."""
    params = params or {}
    cfg, source = deployment_config(params)
    log.info("matcher: config %s", source)
    if cfg.runner.mode == "spark_submit":
        return submit_stage(stage, ds, params, cfg.runner.spark_conn_id)
    with storage_ready(cfg) as cfg:
        ctx = RunContext(cfg, ds, catalog=params.get("catalog") or "", lake_uri=params.get("lake") or "",
                         model_version=params.get("model") or "", runner=f"Airflow task {stage} for {ds}")
        try:
            stats = run_stage(stage, ctx)
        except StageError as exc:
            if exc.retryable:
                raise
            # Bad input or a failed gate: retrying would fail the same way, so fail the task now.
            _fail(str(exc))
    # Small, JSON-safe summary for XCom; the full statistics are in the lake.
    return {"stage": stage, "date": ds, "seconds": stats.get("seconds")}


def submit_stage(stage: str, ds: str, params: dict, conn_id: str) -> dict:
    """Run the stage through spark-submit (the Spark provider's hook) on the cluster the connection names."""
    import sys

    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    args = ["--stage", stage, "--date", ds]
    for key in ("config", "catalog", "lake", "model"):
        if params.get(key):
            args += [f"--{key}", params[key]]
    hook = SparkSubmitHook(conn_id=conn_id, name=f"matcher-{stage}-{ds}", application_args=args,
                           # The driver and the Python workers run matcher's interpreter.
                           env_vars={"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})
    hook.submit(application=str(REPO_ROOT / "jobs" / "submit.py"))
    return {"stage": stage, "date": ds, "runner": "spark_submit"}


def catalog_ready(ds: str, params: dict | None = None) -> bool:
    """Sensor check: has the date's catalog snapshot arrived (its products file, and the ready marker when one is
    configured)? A storage error is transient: logged, and the sensor pokes again; a missing configuration fails
    at once."""
    from matcher.catalog import CatalogReader

    params = params or {}
    cfg, _ = deployment_config(params)
    with storage_ready(cfg) as cfg:
        catalog = dated(params.get("catalog") or cfg.run.catalog, ds)
        try:
            if CatalogReader(catalog, cfg.storage, cfg.catalog).ready():
                return True
        except (OSError, StorageError) as exc:
            log.warning("catalog check for %s failed, will poke again: %s", ds, " ".join(str(exc).split())[:300])
            return False
        log.info("catalog for %s not there yet: %s", ds, catalog)
        return False


def log_failure(context: dict) -> None:
    """on_failure_callback: one line with the stage, the date and the cause."""
    ti = context.get("task_instance")
    log.error("matcher stage %s failed for %s: %s", getattr(ti, "task_id", "?"), context.get("ds"),
              " ".join(str(context.get("exception")).split())[:500])
