"""The callable each Airflow task runs: one stage of the pipeline for the run's logical date."""
from __future__ import annotations

import logging

from jobs.context import RunContext, StageError
from jobs.pipeline import run_stage
from matcher.config import REPO_ROOT, load_config
from matcher.s3server import storage_ready

log = logging.getLogger("matcher")


def run_stage_task(stage: str, ds: str, params: dict | None = None) -> dict:
    """Idempotent for its `ds` partition: it reads only that date's inputs and replaces only that date's outputs.

    params: "config" (a TOML file; empty = embedded defaults), "catalog" and "lake" (override the config's)."""
    params = params or {}
    cfg = load_config(params.get("config") or None)
    if cfg.runner.mode == "spark_submit":
        return submit_stage(stage, ds, params, cfg.runner.spark_conn_id)
    with storage_ready(cfg) as cfg:
        ctx = RunContext(cfg, ds, catalog=params.get("catalog") or "", lake_uri=params.get("lake") or "")
        try:
            stats = run_stage(stage, ctx)
        except StageError as exc:
            if exc.retryable:
                raise
            # Bad input or a failed gate: retrying would fail the same way, so fail the task now.
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(exc)) from exc
    # Small, JSON-safe summary for XCom; the full statistics are in the lake.
    return {"stage": stage, "date": ds, "seconds": stats.get("seconds")}


def submit_stage(stage: str, ds: str, params: dict, conn_id: str) -> dict:
    """Run the stage through spark-submit (the Spark provider's hook) on the cluster the connection names."""
    import sys

    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    args = ["--stage", stage, "--date", ds]
    for key in ("config", "catalog", "lake"):
        if params.get(key):
            args += [f"--{key}", params[key]]
    hook = SparkSubmitHook(conn_id=conn_id, name=f"matcher-{stage}-{ds}", application_args=args,
                           # The driver and the Python workers run matcher's interpreter.
                           env_vars={"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})
    hook.submit(application=str(REPO_ROOT / "jobs" / "submit.py"))
    return {"stage": stage, "date": ds, "runner": "spark_submit"}


def catalog_ready(params: dict | None = None) -> bool:
    """Sensor check: has the catalog file arrived (local folder or S3 prefix)? Reads nothing else."""
    from matcher.catalog import CatalogError, CatalogReader

    params = params or {}
    cfg = load_config(params.get("config") or None)
    with storage_ready(cfg) as cfg:
        catalog = params.get("catalog") or cfg.run.catalog
        try:
            CatalogReader(catalog, cfg.storage, cfg.catalog).find_products_file()
            return True
        except CatalogError:
            log.info("catalog not there yet: %s", catalog)
            return False


def log_failure(context: dict) -> None:
    """on_failure_callback: one line with the stage, the date and the cause."""
    ti = context.get("task_instance")
    log.error("matcher stage %s failed for %s: %s", getattr(ti, "task_id", "?"), context.get("ds"),
              " ".join(str(context.get("exception")).split())[:500])
